// Validation shared by the CPU and CUDA kernels of the cone ops (dual_cone_weights,
// mgda_weights), so both devices reject exactly the same inputs with the same messages.
#pragma once

#include <optional>
#include <tuple>

#include "gram/cone_solve.h"
#include "gram/gram_common.h"

namespace hrgrad_ext {

// U [T, K] with G [K, K], or U [B, T, K] with G [B, K, K]: returns a contiguous [B, T, K].
inline Tensor as_batched_targets(const Tensor& U, const Tensor& G, const char* op) {
  HRGRAD_CHECK_SAME_DEVICE(op, G, "G", U, "U");
  HRGRAD_CHECK(U.scalar_type() == G.scalar_type(), op, ": U has dtype ", U.scalar_type(), " but G has ",
              G.scalar_type());
  HRGRAD_CHECK(U.dim() == G.dim(), op, ": U must be [T, K] for G [K, K] or [B, T, K] for G [B, K, K]; got G ",
              shape_str(G), " and U ", shape_str(U));
  HRGRAD_CHECK(U.size(-1) == G.size(-1), op, ": U has ", U.size(-1), " weights per target but G has K = ",
              G.size(-1), " tasks");
  HRGRAD_CHECK(U.dim() == 2 || U.size(0) == G.size(0), op, ": U has batch size ", U.size(0), " but G has ",
              G.size(0));
  return make_contiguous(U.dim() == 2 ? unsqueeze(U, 0) : U);
}

// One dual_cone_weights call as both kernels see it: the checked, batched inputs, the rcond,
// the allocated outputs W [B, T, K] and status [B, T], and the result in the caller's shapes.
struct DualConeCall {
  Tensor Gb, Ub, W, status;
  double rtol;
  int64_t B, K, T;
  bool unbatched;
  DualConeCall(const Tensor& G, const Tensor& U, std::optional<double> rcond)
      : Gb(as_batched_gram(G, "dual_cone_weights")),
        Ub(as_batched_targets(U, G, "dual_cone_weights")),
        rtol(resolve_rcond(rcond, G, "dual_cone_weights")),
        B(Gb.size(0)),
        K(Gb.size(1)),
        T(Ub.size(1)),
        unbatched(G.dim() == 2) {
    W = empty_on(Gb, {B, T, K});
    status = empty_on(Gb, {B, T}, kInt);
  }
  std::tuple<Tensor, Tensor> result() const {
    if (unbatched) return {squeeze(W, 0), squeeze(status, 0)};
    return {W, status};
  }
};

// One mgda_weights call: checked G [B, K, K], rcond, outputs w [B, K] and status [B].
struct MgdaCall {
  Tensor Gb, w, status;
  double rtol;
  int64_t B, K;
  bool unbatched;
  MgdaCall(const Tensor& G, std::optional<double> rcond)
      : Gb(as_batched_gram(G, "mgda_weights")),
        rtol(resolve_rcond(rcond, G, "mgda_weights")),
        B(Gb.size(0)),
        K(Gb.size(1)),
        unbatched(G.dim() == 2) {
    w = empty_on(Gb, {B, K});
    status = empty_on(Gb, {B}, kInt);
  }
  std::tuple<Tensor, Tensor> result() const {
    if (unbatched) return {squeeze(w, 0), squeeze(status, 0)};
    return {w, status};
  }
};

}  // namespace hrgrad_ext
