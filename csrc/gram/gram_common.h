// Validation and shape logic shared by the CPU and CUDA kernels of the gram family, so both
// devices reject exactly the same inputs with the same messages.
#pragma once
#include <optional>
#include <string>

#include "common/checks.h"
#include "common/tensor.h"
#include "gram/hrgrad_solve.h"

namespace hrgrad_ext {

// J [K, n] or [B, K, n]: returns J viewed as a contiguous [B, K, n] tensor.
inline Tensor as_batched_jacobian(const Tensor& J, const char* op) {
  HRGRAD_CHECK(J.dim() == 2 || J.dim() == 3, op, ": J must be [K, n] or [B, K, n], got shape ",
              shape_str(J));
  HRGRAD_CHECK_FLOAT(op, "J", J);
  const Tensor Jb = J.dim() == 2 ? unsqueeze(J, 0) : J;
  HRGRAD_CHECK(Jb.size(1) > 0, op, ": J has K = 0 tasks (shape ", shape_str(J), ")");
  HRGRAD_CHECK(Jb.size(2) > 0, op, ": J has n = 0 parameters (shape ", shape_str(J), ")");
  return make_contiguous(Jb);
}

inline ScalarType gram_out_dtype(const Tensor& J, std::optional<ScalarType> dtype) {
  const ScalarType out = dtype.has_value() ? *dtype : acc_type_of(J.scalar_type());
  HRGRAD_CHECK(out == kFloat || out == kDouble,
              "gram: dtype must be torch.float32 or torch.float64, got ", out);
  return out;
}

// G [K, K] or [B, K, K] (float32/float64, square, K >= 1): returns a contiguous [B, K, K] view.
inline Tensor as_batched_gram(const Tensor& G, const char* op = "hrgrad_weights") {
  HRGRAD_CHECK(G.dim() == 2 || G.dim() == 3, op, ": G must be [K, K] or [B, K, K], got shape ", shape_str(G));
  HRGRAD_CHECK(G.scalar_type() == kFloat || G.scalar_type() == kDouble, op,
              ": G must be float32 or float64, got ", G.scalar_type());
  HRGRAD_CHECK(G.size(-1) == G.size(-2), op, ": G must be square, got shape ", shape_str(G));
  HRGRAD_CHECK(G.size(-1) > 0, op, ": G has K = 0 tasks");
  return make_contiguous(G.dim() == 2 ? unsqueeze(G, 0) : G);
}

inline int parse_length_model(const std::string& name) {
  if (name == "projection") return kLengthProjection;
  if (name == "min") return kLengthMin;
  if (name == "max") return kLengthMax;
  if (name == "harmonic") return kLengthHarmonic;
  if (name == "arithmetic") return kLengthArithmetic;
  if (name == "geometric") return kLengthGeometric;
  HRGRAD_CHECK(false, "hrgrad_weights: unknown length_model '", name,
              "' (expected projection, min, max, harmonic, arithmetic or geometric)");
  return -1;
}

// Default cut-off of the pseudo-inverse, relative to the largest eigenvalue of C: ten times
// K times the unit round-off of G's dtype (rounding noise in C is of that size).
inline double resolve_rcond(std::optional<double> rcond, const Tensor& G, const char* op = "hrgrad_weights") {
  if (rcond.has_value()) {
    HRGRAD_CHECK(*rcond >= 0.0 && *rcond < 1.0, op, ": rcond must be in [0, 1), got ", *rcond);
    return *rcond;
  }
  const double eps = G.scalar_type() == kDouble ? 2.220446049250313e-16 : 1.1920928955078125e-07;
  return 10.0 * static_cast<double>(G.size(-1)) * eps;
}

// Whether w's shape is J's without the last dimension.
inline bool is_leading_shape(const Tensor& w, const Tensor& J) {
  if (w.dim() != J.dim() - 1) return false;
  for (int64_t d = 0; d < w.dim(); ++d) {
    if (w.size(d) != J.size(d)) return false;
  }
  return true;
}

// J [B, K, n] and w [B, K] (or [K] with B == 1) for combine.
inline Tensor check_combine_weights(const Tensor& J, const Tensor& w, const char* op) {
  HRGRAD_CHECK_SAME_DEVICE(op, J, "J", w, "w");
  HRGRAD_CHECK(w.scalar_type() == kFloat || w.scalar_type() == kDouble ||
                  w.scalar_type() == kHalf || w.scalar_type() == kBFloat16,
              op, ": w must be a floating tensor, got ", w.scalar_type());
  HRGRAD_CHECK(w.dim() == J.dim() - 1, op, ": w must be [..., K] matching J [..., K, n]; got J ",
              shape_str(J), " and w ", shape_str(w));
  HRGRAD_CHECK(is_leading_shape(w, J), op, ": w ", shape_str(w),
              " does not match the leading dimensions of J ", shape_str(J));
  return w;
}

// combine_accumulate_: out (any shape with n elements, contiguous, J's dtype and device)
// += J^T w for J [K, ...] with n elements per task. Returns J as a contiguous [1, K, n].
inline Tensor check_combine_accumulate(const Tensor& out, const Tensor& J, const Tensor& w) {
  constexpr const char* op = "combine_accumulate_";
  HRGRAD_CHECK(J.dim() >= 1, op, ": J must have a leading task dimension K");
  const Tensor J2 = reshape(J, {J.size(0), -1});
  const Tensor Jb = as_batched_jacobian(J2, op);
  check_combine_weights(J2, w, op);
  HRGRAD_CHECK_SAME_DEVICE(op, out, "out", J, "J");
  HRGRAD_CHECK(out.scalar_type() == J.scalar_type(), op, ": out has dtype ", out.scalar_type(), " but J has ",
              J.scalar_type());
  HRGRAD_CHECK(out.numel() == Jb.size(2), op, ": out has ", out.numel(), " elements but each row of J has ",
              Jb.size(2));
  HRGRAD_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  return Jb;
}

}  // namespace hrgrad_ext
