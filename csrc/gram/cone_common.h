// Validation shared by the CPU and CUDA kernels of the cone ops (dual_cone_weights,
// mgda_weights), so both devices reject exactly the same inputs with the same messages.
#pragma once
#include <ATen/ATen.h>

#include "gram/cone_solve.h"
#include "gram/gram_common.h"

namespace hrgrad_ext {

// U [T, K] with G [K, K], or U [B, T, K] with G [B, K, K]: returns a contiguous [B, T, K].
inline at::Tensor as_batched_targets(const at::Tensor& U, const at::Tensor& G, const char* op) {
  HRGRAD_CHECK_SAME_DEVICE(op, G, "G", U, "U");
  TORCH_CHECK(U.scalar_type() == G.scalar_type(), op, ": U has dtype ", U.scalar_type(), " but G has ",
              G.scalar_type());
  TORCH_CHECK(U.dim() == G.dim(), op, ": U must be [T, K] for G [K, K] or [B, T, K] for G [B, K, K]; got G ",
              G.sizes(), " and U ", U.sizes());
  TORCH_CHECK(U.size(-1) == G.size(-1), op, ": U has ", U.size(-1), " weights per target but G has K = ",
              G.size(-1), " tasks");
  TORCH_CHECK(U.dim() == 2 || U.size(0) == G.size(0), op, ": U has batch size ", U.size(0), " but G has ",
              G.size(0));
  return (U.dim() == 2 ? U.unsqueeze(0) : U).contiguous();
}

}  // namespace hrgrad_ext
