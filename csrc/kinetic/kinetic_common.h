// Validation shared by the CPU and CUDA kernels of the kinetic family, so that both devices
// reject exactly the same inputs with the same messages.
//
// Conventions of the family (see python/hrgrad_ext/ops/kinetic.py for the formulas):
//   N rows (collocation points), V velocity nodes v [V] with quadrature weights w [V].
//   [N, V] fields (F, Ft, Fx, Graw, ...), [N] per-row quantities (rho, u, ...), per-row
//   parameters kn / eps that are [N] or 0-d (broadcast over rows).
// dtypes: float32 or float64, the same for every tensor argument. float16/bfloat16 are
// rejected on purpose: the residuals are differences of O(1) terms that must cancel to the
// size of the network error, which half precision cannot resolve.
// N = 0 is allowed (an empty task segment of a multi-task batch) and gives empty outputs;
// V = 0 is an error (there is no quadrature rule).
#pragma once

#include "common/checks.h"

namespace hrgrad_ext {
namespace kinetic {

inline void check_dtype(const char* op, const char* name, const Tensor& t) {
  HRGRAD_CHECK(t.scalar_type() == kFloat || t.scalar_type() == kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type(),
              " (float16/bfloat16 are not supported: the residuals cancel O(1) terms; cast to float32)");
}

// Same dtype and device as the reference tensor `ref` (the first [N, V] argument).
inline void check_like(const char* op, const char* name, const Tensor& t, const char* ref_name,
                       const Tensor& ref) {
  HRGRAD_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; all tensors must have the same dtype");
  HRGRAD_CHECK_SAME_DEVICE(op, t, name, ref, ref_name);
}

// An [N, V] field; returns N.
inline void check_field(const char* op, const char* name, const Tensor& t) {
  check_dtype(op, name, t);
  HRGRAD_CHECK(t.dim() == 2, op, ": ", name, " must be a 2-D [N, V] tensor, got shape ", shape_str(t));
  HRGRAD_CHECK(t.size(1) > 0, op, ": ", name, " has V = 0 velocity nodes (shape ", shape_str(t), ")");
}

inline void check_same_field(const char* op, const char* name, const Tensor& t, const char* ref_name,
                             const Tensor& ref) {
  check_like(op, name, t, ref_name, ref);
  HRGRAD_CHECK(same_shape(t, ref), op, ": ", name, " has shape ", shape_str(t), " but ", ref_name,
              " has shape ", shape_str(ref), "; they must be the same [N, V]");
}

// Quadrature nodes and weights: v [V], w [V].
inline void check_nodes(const char* op, const Tensor& v, const Tensor& w, int64_t V,
                        const char* ref_name, const Tensor& ref) {
  check_like(op, "v", v, ref_name, ref);
  check_like(op, "w", w, ref_name, ref);
  HRGRAD_CHECK(v.dim() == 1 && v.size(0) == V, op, ": v must be [V] = [", V, "] to match ", ref_name, " ",
              shape_str(ref), ", got shape ", shape_str(v));
  HRGRAD_CHECK(w.dim() == 1 && w.size(0) == V, op, ": w must be [V] = [", V, "] to match ", ref_name, " ",
              shape_str(ref), ", got shape ", shape_str(w));
}

// A per-row quantity [N].
inline void check_row(const char* op, const char* name, const Tensor& t, int64_t N, const char* ref_name,
                      const Tensor& ref) {
  check_like(op, name, t, ref_name, ref);
  HRGRAD_CHECK(t.dim() == 1 && t.size(0) == N, op, ": ", name, " must be [N] = [", N, "], got shape ",
              shape_str(t));
}

// A per-row parameter: [N] or 0-d (one value for every row). Returns its row stride (0 or 1).
inline int64_t check_row_param(const char* op, const char* name, const Tensor& t, int64_t N,
                               const char* ref_name, const Tensor& ref) {
  check_like(op, name, t, ref_name, ref);
  HRGRAD_CHECK(t.dim() == 0 || (t.dim() == 1 && t.size(0) == N), op, ": ", name,
              " must be [N] = [", N, "] or a 0-d tensor, got shape ", shape_str(t));
  return t.dim() == 0 ? 0 : 1;
}

// ---- per-op validation (one place, used by both devices) ----------------------------------

inline void check_velocity_moments(const Tensor& F, const Tensor& v, const Tensor& w,
                                   int64_t order) {
  const char* op = "velocity_moments";
  check_field(op, "F", F);
  check_nodes(op, v, w, F.size(1), "F", F);
  HRGRAD_CHECK(order >= 0, op, ": order must be >= 0, got ", order);
}

inline void check_velocity_moments_backward(const Tensor& grad, const Tensor& v, const Tensor& w) {
  const char* op = "velocity_moments_backward";
  check_dtype(op, "grad", grad);
  HRGRAD_CHECK(grad.dim() == 2 && grad.size(1) > 0, op, ": grad must be [N, order + 1], got shape ",
              shape_str(grad));
  check_like(op, "v", v, "grad", grad);
  check_like(op, "w", w, "grad", grad);
  HRGRAD_CHECK(v.dim() == 1 && v.size(0) > 0, op, ": v must be [V] with V > 0, got shape ", shape_str(v));
  HRGRAD_CHECK(same_shape(w, v), op, ": w must have the shape of v ", shape_str(v), ", got ", shape_str(w));
}

inline void check_maxwellian(const char* op, const Tensor& rho, const Tensor& u, const Tensor& T,
                             const Tensor& v) {
  check_dtype(op, "rho", rho);
  HRGRAD_CHECK(rho.dim() == 1, op, ": rho must be [N], got shape ", shape_str(rho));
  const int64_t N = rho.size(0);
  check_row(op, "u", u, N, "rho", rho);
  check_row(op, "T", T, N, "rho", rho);
  check_like(op, "v", v, "rho", rho);
  HRGRAD_CHECK(v.dim() == 1, op, ": v must be [V], got shape ", shape_str(v));
  HRGRAD_CHECK(v.size(0) > 0, op, ": v has V = 0 velocity nodes");
}

inline void check_maxwellian_backward(const Tensor& grad, const Tensor& rho, const Tensor& u,
                                      const Tensor& T, const Tensor& v) {
  const char* op = "maxwellian_backward";
  check_maxwellian(op, rho, u, T, v);
  check_like(op, "grad", grad, "rho", rho);
  HRGRAD_CHECK(grad.dim() == 2 && grad.size(0) == rho.size(0) && grad.size(1) == v.size(0), op,
              ": grad must be [N, V] = [", rho.size(0), ", ", v.size(0), "], got shape ", shape_str(grad));
}

// bgk_residuals and its backward share the per-row part; returns kn's row stride.
inline int64_t check_bgk_rows(const char* op, const Tensor& ref, const char* ref_name, const Tensor& rho,
                              const Tensor& u, const Tensor& T, const Tensor& rho_t,
                              const Tensor& u_t, const Tensor& T_t, const Tensor& v,
                              const Tensor& w, const Tensor& kn) {
  const int64_t N = ref.size(0), V = ref.size(1);
  check_row(op, "rho", rho, N, ref_name, ref);
  check_row(op, "u", u, N, ref_name, ref);
  check_row(op, "T", T, N, ref_name, ref);
  check_row(op, "rho_t", rho_t, N, ref_name, ref);
  check_row(op, "u_t", u_t, N, ref_name, ref);
  check_row(op, "T_t", T_t, N, ref_name, ref);
  check_nodes(op, v, w, V, ref_name, ref);
  return check_row_param(op, "kn", kn, N, ref_name, ref);
}

inline int64_t check_bgk(const Tensor& F, const Tensor& Ft, const Tensor& Fx, const Tensor& rho,
                         const Tensor& u, const Tensor& T, const Tensor& rho_t,
                         const Tensor& u_t, const Tensor& T_t, const Tensor& v,
                         const Tensor& w, const Tensor& kn, const char* op = "bgk_residuals") {
  check_field(op, "F", F);
  check_same_field(op, "Ft", Ft, "F", F);
  check_same_field(op, "Fx", Fx, "F", F);
  return check_bgk_rows(op, F, "F", rho, u, T, rho_t, u_t, T_t, v, w, kn);
}

// grad_conservation and grad_consistency, [N, 3] each.
inline void check_bgk_row_grads(const char* op, const Tensor& gC, const Tensor& gS, int64_t N, const char* ref_name,
                                const Tensor& ref) {
  check_like(op, "grad_conservation", gC, ref_name, ref);
  check_like(op, "grad_consistency", gS, ref_name, ref);
  HRGRAD_CHECK(gC.dim() == 2 && gC.size(0) == N && gC.size(1) == 3, op, ": grad_conservation must be [N, 3] = [",
              N, ", 3], got shape ", shape_str(gC));
  HRGRAD_CHECK(gS.dim() == 2 && gS.size(0) == N && gS.size(1) == 3, op, ": grad_consistency must be [N, 3] = [",
              N, ", 3], got shape ", shape_str(gS));
}

inline int64_t check_bgk_backward(const Tensor& gK, const Tensor& gC, const Tensor& gS,
                                  const Tensor& Ft, const Tensor& Fx, const Tensor& rho,
                                  const Tensor& u, const Tensor& T, const Tensor& rho_t,
                                  const Tensor& u_t, const Tensor& T_t, const Tensor& v,
                                  const Tensor& w, const Tensor& kn) {
  const char* op = "bgk_residuals_backward";
  check_field(op, "Ft", Ft);
  check_same_field(op, "Fx", Fx, "Ft", Ft);
  check_same_field(op, "grad_kinetic", gK, "Ft", Ft);
  check_bgk_row_grads(op, gC, gS, Ft.size(0), "Ft", Ft);
  return check_bgk_rows(op, Ft, "Ft", rho, u, T, rho_t, u_t, T_t, v, w, kn);
}

inline int64_t check_transport(const Tensor& G, const Tensor& Gt, const Tensor& Gx,
                               const Tensor& rho_t, const Tensor& rho_x, const Tensor& v,
                               const Tensor& w, const Tensor& eps, const char* op = "transport_mm_residuals") {
  check_field(op, "Graw", G);
  check_same_field(op, "Graw_t", Gt, "Graw", G);
  check_same_field(op, "Graw_x", Gx, "Graw", G);
  const int64_t N = G.size(0);
  check_row(op, "rho_t", rho_t, N, "Graw", G);
  check_row(op, "rho_x", rho_x, N, "Graw", G);
  check_nodes(op, v, w, G.size(1), "Graw", G);
  return check_row_param(op, "eps", eps, N, "Graw", G);
}

inline int64_t check_transport_backward(const Tensor& gg, const Tensor& gm, const Tensor& gc,
                                        const Tensor& Gt, const Tensor& Gx, const Tensor& v,
                                        const Tensor& w, const Tensor& eps) {
  const char* op = "transport_mm_residuals_backward";
  check_field(op, "Graw_t", Gt);
  check_same_field(op, "Graw_x", Gx, "Graw_t", Gt);
  check_same_field(op, "grad_g", gg, "Graw_t", Gt);
  check_same_field(op, "grad_micro", gm, "Graw_t", Gt);
  const int64_t N = Gt.size(0);
  check_row(op, "grad_macro", gc, N, "Graw_t", Gt);
  check_nodes(op, v, w, Gt.size(1), "Graw_t", Gt);
  return check_row_param(op, "eps", eps, N, "Graw_t", Gt);
}

// ---- the loss forms (*_sq ops) ---------------------------------------------------------------
// The gradient of a row sum of squares is a row [N].

inline int64_t check_bgk_sq(const Tensor& F, const Tensor& Ft, const Tensor& Fx, const Tensor& rho,
                            const Tensor& u, const Tensor& T, const Tensor& rho_t, const Tensor& u_t,
                            const Tensor& T_t, const Tensor& v, const Tensor& w, const Tensor& kn) {
  return check_bgk(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn, "bgk_residuals_sq");
}

// grad_kinetic_sq [N], grad_conservation / grad_consistency [N, 3], then bgk_residuals_sq's inputs.
inline int64_t check_bgk_sq_backward(const Tensor& gQ, const Tensor& gC, const Tensor& gS, const Tensor& F,
                                     const Tensor& Ft, const Tensor& Fx, const Tensor& rho, const Tensor& u,
                                     const Tensor& T, const Tensor& rho_t, const Tensor& u_t, const Tensor& T_t,
                                     const Tensor& v, const Tensor& w, const Tensor& kn) {
  const char* op = "bgk_residuals_sq_backward";
  const int64_t ks = check_bgk(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn, op);
  check_row(op, "grad_kinetic_sq", gQ, F.size(0), "F", F);
  check_bgk_row_grads(op, gC, gS, F.size(0), "F", F);
  return ks;
}

inline int64_t check_transport_sq(const Tensor& G, const Tensor& Gt, const Tensor& Gx, const Tensor& rho_t,
                                  const Tensor& rho_x, const Tensor& v, const Tensor& w, const Tensor& eps) {
  return check_transport(G, Gt, Gx, rho_t, rho_x, v, w, eps, "transport_mm_residuals_sq");
}

// grad_micro_sq, grad_macro [N], then Graw, Graw_t, Graw_x, rho_x, v, w, eps.
inline int64_t check_transport_sq_backward(const Tensor& gQ, const Tensor& gc, const Tensor& G, const Tensor& Gt,
                                           const Tensor& Gx, const Tensor& rho_x, const Tensor& v, const Tensor& w,
                                           const Tensor& eps) {
  const char* op = "transport_mm_residuals_sq_backward";
  check_field(op, "Graw", G);
  check_row(op, "grad_micro_sq", gQ, G.size(0), "Graw", G);
  check_row(op, "grad_macro", gc, G.size(0), "Graw", G);
  // The forward's checks; grad_macro, checked above under its own name, stands in for rho_t
  // (which the gradients do not depend on).
  return check_transport(G, Gt, Gx, gc, rho_x, v, w, eps, op);
}

}  // namespace kinetic
}  // namespace hrgrad_ext
