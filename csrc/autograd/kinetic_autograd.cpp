// Autograd of the kinetic family (velocity_moments, maxwellian, bgk_residuals,
// transport_mm_residuals and the loss forms *_sq): see autograd_common.h for the scheme. First-order backward: one
// call of the fused *_backward kernel. Differentiable backward and forward mode: the formulas
// below, in ATen ops and in the (differentiable) forward ops themselves. Formulas of the ops:
// python/hrgrad_ext/ops/kinetic.py. Rows are collocation points [N], columns velocity nodes [V].
#include "autograd/autograd_common.h"

#include <tuple>

namespace hrgrad_ext::autograd {
namespace {

using torch::autograd::collect_next_edges;
using torch::autograd::compute_requires_grad;
using torch::autograd::set_history;

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

constexpr const char* kNodesWhy = "v and w are a fixed quadrature rule";

at::Tensor col(const at::Tensor& row) { return row.unsqueeze(1); }                        // [N] -> [N, 1]
at::Tensor per_row(const at::Tensor& p) { return p.dim() == 0 ? p : p.unsqueeze(1); }     // kn / eps
at::Tensor node_row(const at::Tensor& v) { return v.unsqueeze(0); }                        // [V] -> [1, V]
at::Tensor param_grad(const at::Tensor& rows, const at::Tensor& p) { return p.dim() == 0 ? rows.sum() : rows; }

at::Tensor velocity_moments_call(const at::Tensor& F, const at::Tensor& v, const at::Tensor& w, int64_t order) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>(
      "hrgrad_ext::velocity_moments");
  return op.call(F, v, w, order);
}

at::Tensor maxwellian_call(const at::Tensor& rho, const at::Tensor& u, const at::Tensor& T, const at::Tensor& v) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "hrgrad_ext::maxwellian");
  return op.call(rho, u, T, v);
}

// --- velocity_moments: m[i, k] = sum_j w_j v_j^k F[i, j] ---------------------------------

struct MomentsBackward : public OpBackward {
  MomentsBackward() : OpBackward("velocity_moments") {}
  SavedVariable v_, w_;
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor& g = grads[0];
    if (!g.defined() || !task_should_compute_output(0)) return {at::Tensor()};
    const at::Tensor v = v_.unpack(), w = w_.unpack();
    if (backward_must_be_differentiable({g})) {
      // dF = g P with P[k, j] = w_j v_j^k
      const at::Tensor k = at::arange(g.size(1), v.options()).unsqueeze(1);
      return {at::matmul(g, at::pow(node_row(v), k) * node_row(w))};
    }
    static const auto bw = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
        "hrgrad_ext::velocity_moments_backward");
    return {bw.call(g, v, w)};
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    v_.reset_data();
    w_.reset_data();
  }
};

at::Tensor velocity_moments_autograd(c10::DispatchKeySet ks, const at::Tensor& F, const at::Tensor& v,
                                     const at::Tensor& w, int64_t order) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>(
      "hrgrad_ext::velocity_moments");
  check_not_differentiable("velocity_moments", "v", v, kNodesWhy);
  check_not_differentiable("velocity_moments", "w", w, kNodesWhy);
  NodePtr<MomentsBackward> node;
  if (compute_requires_grad(F)) {
    node = make_node<MomentsBackward>();
    node->set_next_edges(collect_next_edges(F));
    node->v_ = SavedVariable(v, false);
    node->w_ = SavedVariable(w, false);
  }
  at::Tensor m;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    m = op.redispatch(below_autograd(ks), F, v, w, order);
  }
  if (node) set_history(m, node);
  if (has_tangent(F)) set_tangent(m, velocity_moments_call(F._fw_grad(0), v, w, order));  // linear in F
  return m;
}

// --- maxwellian: M = rho / sqrt(2 pi T) exp(-(v - u)^2 / (2 T)) -----------------------------
// d log M = drho / rho + (v - u) du / T + ((v - u)^2 / T - 1) dT / (2 T).

Tensor3 maxwellian_vjp(const at::Tensor& gM, const at::Tensor& rho, const at::Tensor& u, const at::Tensor& T,
                       const at::Tensor& v) {
  const at::Tensor M = maxwellian_call(rho, u, T, v);
  const at::Tensor c = node_row(v) - col(u);
  const at::Tensor gMM = gM * M;
  return {gMM.sum(1) / rho, (gMM * c).sum(1) / T, (gMM * (c * c / col(T) - 1)).sum(1) / (2 * T)};
}

at::Tensor maxwellian_jvp(const at::Tensor& M, const at::Tensor& rho, const at::Tensor& u, const at::Tensor& T,
                          const at::Tensor& v, const at::Tensor& drho, const at::Tensor& du, const at::Tensor& dT) {
  const at::Tensor c = node_row(v) - col(u);
  return M * (col(drho / rho) + c * col(du / T) + (c * c / col(T) - 1) * col(dT / (2 * T)));
}

struct MaxwellianBackward : public OpBackward {
  MaxwellianBackward() : OpBackward("maxwellian") {}
  SavedVariable rho_, u_, T_, v_;
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const at::Tensor rho = rho_.unpack(), u = u_.unpack(), T = T_.unpack(), v = v_.unpack();
    if (backward_must_be_differentiable({g, rho, u, T})) {
      auto [drho, du, dT] = maxwellian_vjp(g, rho, u, T, v);
      return {drho, du, dT};
    }
    static const auto bw = op_handle<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&)>("hrgrad_ext::maxwellian_backward");
    auto [drho, du, dT] = bw.call(g, rho, u, T, v);
    return {drho, du, dT};
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    rho_.reset_data();
    u_.reset_data();
    T_.reset_data();
    v_.reset_data();
  }
};

at::Tensor maxwellian_autograd(c10::DispatchKeySet ks, const at::Tensor& rho, const at::Tensor& u,
                               const at::Tensor& T, const at::Tensor& v) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "hrgrad_ext::maxwellian");
  check_not_differentiable("maxwellian", "v", v, "v are fixed velocity nodes");
  NodePtr<MaxwellianBackward> node;
  if (compute_requires_grad(rho, u, T)) {
    node = make_node<MaxwellianBackward>();
    node->set_next_edges(collect_next_edges(rho, u, T));
    save_inputs({&node->rho_, &node->u_, &node->T_, &node->v_},
                {rho, u, T, v});
  }
  at::Tensor M;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    M = op.redispatch(below_autograd(ks), rho, u, T, v);
  }
  if (node) set_history(M, node);
  if (any_tangent({rho, u, T})) {
    set_tangent(M, maxwellian_jvp(M, primal(rho), primal(u), primal(T), v, tangent_or_zeros(rho), tangent_or_zeros(u),
                                  tangent_or_zeros(T)));
  }
  return M;
}

// --- bgk_residuals ---------------------------------------------------------------------------
//   kinetic      = kn (Ft + v Fx) - (M - F)
//   conservation = (rho_t + <v Fx>, rho_t u + rho u_t + <v^2 Fx>, E_t + <v^3 Fx> / 2)
//   consistency  = (rho - <F>, rho u - <v F>, E - <v^2 F> / 2),     <.> = sum_j w_j (.)
//   E = rho (u^2 + T) / 2,  E_t = rho_t (u^2 + T) / 2 + rho (2 u u_t + T_t) / 2.

// The vector-Jacobian product of bgk_residuals in differentiable ATen ops (double backward,
// torch.func); gradients of F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, kn.
variable_list bgk_vjp(const at::Tensor& gK, const at::Tensor& gC, const at::Tensor& gS, const at::Tensor& Ft,
                      const at::Tensor& Fx, const at::Tensor& rho, const at::Tensor& u, const at::Tensor& T,
                      const at::Tensor& rho_t, const at::Tensor& u_t, const at::Tensor& T_t, const at::Tensor& v,
                      const at::Tensor& w, const at::Tensor& kn) {
  const at::Tensor vv = node_row(v), ww = node_row(w), knb = per_row(kn);
  const at::Tensor gC0 = gC.select(1, 0), gC1 = gC.select(1, 1), gC2 = gC.select(1, 2);
  const at::Tensor gS0 = gS.select(1, 0), gS1 = gS.select(1, 1), gS2 = gS.select(1, 2);
  const at::Tensor dF = gK - ww * (col(gS0) + col(gS1) * vv + col(gS2) * (vv * vv * 0.5));
  const at::Tensor dFt = knb * gK;
  const at::Tensor dFx = knb * vv * gK + ww * vv * (col(gC0) + col(gC1) * vv + col(gC2) * (vv * vv * 0.5));
  const at::Tensor dkn = param_grad((gK * (Ft + vv * Fx)).sum(1), kn);
  auto [mrho, mu, mT] = maxwellian_vjp(-gK, rho, u, T, v);
  const at::Tensor E2 = u * u + T;
  const at::Tensor drho = mrho + gS0 + gS1 * u + gS2 * E2 * 0.5 + gC1 * u_t + gC2 * (2 * u * u_t + T_t) * 0.5;
  const at::Tensor du = mu + gS1 * rho + gS2 * rho * u + gC1 * rho_t + gC2 * (rho_t * u + rho * u_t);
  const at::Tensor dT = mT + (gS2 * rho + gC2 * rho_t) * 0.5;
  const at::Tensor drho_t = gC0 + gC1 * u + gC2 * E2 * 0.5;
  const at::Tensor du_t = gC1 * rho + gC2 * rho * u;
  const at::Tensor dT_t = gC2 * rho * 0.5;
  return {dF, dFt, dFx, drho, du, dT, drho_t, du_t, dT_t, dkn};
}

struct BgkBackward : public OpBackward {
  BgkBackward() : OpBackward("bgk_residuals") {}
  SavedVariable Ft_, Fx_, rho_, u_, T_, rho_t_, u_t_, T_t_, v_, w_, kn_;
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor Ft = Ft_.unpack(), Fx = Fx_.unpack(), rho = rho_.unpack(), u = u_.unpack(), T = T_.unpack();
    const at::Tensor rho_t = rho_t_.unpack(), u_t = u_t_.unpack(), T_t = T_t_.unpack();
    const at::Tensor v = v_.unpack(), w = w_.unpack(), kn = kn_.unpack();
    const int64_t N = Ft.size(0);
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) return variable_list(10);
    const at::Tensor gK = zeros_if_undefined(grads[0], Ft, Ft.sizes());
    const at::Tensor gC = zeros_if_undefined(grads[1], Ft, {N, 3});
    const at::Tensor gS = zeros_if_undefined(grads[2], Ft, {N, 3});
    if (!backward_must_be_differentiable({gK, gC, gS, Ft, Fx, rho, u, T, rho_t, u_t, T_t, kn})) {
      using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor, at::Tensor>;
      static const auto bw = op_handle<Out(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>("hrgrad_ext::bgk_residuals_backward");
      auto [dF, dFt, dFx, drho, du, dT, drho_t, du_t, dT_t, dkn] =
          bw.call(gK, gC, gS, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn);
      return {dF, dFt, dFx, drho, du, dT, drho_t, du_t, dT_t, param_grad(dkn, kn)};
    }
    return bgk_vjp(gK, gC, gS, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn);
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* s : {&Ft_, &Fx_, &rho_, &u_, &T_, &rho_t_, &u_t_, &T_t_, &v_, &w_, &kn_}) s->reset_data();
  }
};

// The tangents of bgk_residuals' outputs for inputs carrying forward-mode tangents (primal
// values and tangents are taken from the dual tensors).
Tensor3 bgk_jvp(const at::Tensor& F, const at::Tensor& Ft, const at::Tensor& Fx, const at::Tensor& rho,
                const at::Tensor& u, const at::Tensor& T, const at::Tensor& rho_t, const at::Tensor& u_t,
                const at::Tensor& T_t, const at::Tensor& v, const at::Tensor& w, const at::Tensor& kn) {
  const at::Tensor pFt = primal(Ft), pFx = primal(Fx), prho = primal(rho), pu = primal(u), pT = primal(T);
  const at::Tensor prho_t = primal(rho_t), pu_t = primal(u_t), pT_t = primal(T_t), pkn = primal(kn);
  const at::Tensor dF = tangent_or_zeros(F), dFt = tangent_or_zeros(Ft), dFx = tangent_or_zeros(Fx);
  const at::Tensor drho = tangent_or_zeros(rho), du = tangent_or_zeros(u), dT = tangent_or_zeros(T);
  const at::Tensor drho_t = tangent_or_zeros(rho_t), du_t = tangent_or_zeros(u_t), dT_t = tangent_or_zeros(T_t);
  const at::Tensor dkn = tangent_or_zeros(kn);
  const at::Tensor vv = node_row(v);
  const at::Tensor M = maxwellian_call(prho, pu, pT, v);
  const at::Tensor dM = maxwellian_jvp(M, prho, pu, pT, v, drho, du, dT);
  const at::Tensor tkin = per_row(dkn) * (pFt + vv * pFx) + per_row(pkn) * (dFt + vv * dFx) - dM + dF;
  const at::Tensor mx = velocity_moments_call(dFx, v, w, 3);  // <v^k dFx>, k = 0..3
  const at::Tensor mf = velocity_moments_call(dF, v, w, 2);   // <v^k dF>,  k = 0..2
  const at::Tensor E2 = pu * pu + pT, dE2 = 2 * pu * du + dT;
  const at::Tensor dC0 = drho_t + mx.select(1, 1);
  const at::Tensor dC1 = drho_t * pu + prho_t * du + drho * pu_t + prho * du_t + mx.select(1, 2);
  const at::Tensor dEt = (drho_t * E2 + prho_t * dE2 + drho * (2 * pu * pu_t + pT_t) +
                          prho * (2 * du * pu_t + 2 * pu * du_t + dT_t)) * 0.5;
  const at::Tensor tcons = at::stack({dC0, dC1, dEt + mx.select(1, 3) * 0.5}, 1);
  const at::Tensor dS0 = drho - mf.select(1, 0);
  const at::Tensor dS1 = drho * pu + prho * du - mf.select(1, 1);
  const at::Tensor dS2 = (drho * E2 + prho * dE2 - mf.select(1, 2)) * 0.5;
  return {tkin, tcons, at::stack({dS0, dS1, dS2}, 1)};
}

Tensor3 bgk_residuals_autograd(c10::DispatchKeySet ks, const at::Tensor& F, const at::Tensor& Ft, const at::Tensor& Fx,
                               const at::Tensor& rho, const at::Tensor& u, const at::Tensor& T, const at::Tensor& rho_t,
                               const at::Tensor& u_t, const at::Tensor& T_t, const at::Tensor& v, const at::Tensor& w,
                               const at::Tensor& kn) {
  static const auto op = op_handle<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "hrgrad_ext::bgk_residuals");
  check_not_differentiable("bgk_residuals", "v", v, kNodesWhy);
  check_not_differentiable("bgk_residuals", "w", w, kNodesWhy);
  NodePtr<BgkBackward> node;
  if (compute_requires_grad(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, kn)) {
    node = make_node<BgkBackward>();
    node->set_next_edges(collect_next_edges(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, kn));
    // F itself is not needed: every derivative is linear in F or independent of it.
    save_inputs({&node->Ft_, &node->Fx_, &node->rho_, &node->u_, &node->T_, &node->rho_t_, &node->u_t_, &node->T_t_,
                 &node->v_, &node->w_, &node->kn_},
                {Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn});
  }
  at::Tensor kin, cons, consis;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(kin, cons, consis) = op.redispatch(below_autograd(ks), F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn);
  }
  if (node) set_history({kin, cons, consis}, node);
  if (any_tangent({F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, kn})) {
    auto [tkin, tcons, tconsis] = bgk_jvp(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn);
    set_tangent(kin, tkin);
    set_tangent(cons, tcons);
    set_tangent(consis, tconsis);
  }
  return {kin, cons, consis};
}

// --- bgk_residuals_sq: (sum_j kinetic_ij^2, conservation, consistency) --------------------------
// Its derivatives are those of bgk_residuals with grad_kinetic = 2 grad_kinetic_sq kinetic: the
// first-order backward is the fused kernel (which recomputes kinetic); the differentiable one
// recomputes kinetic with the differentiable op and applies bgk_vjp.

using BgkSignature = Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

struct BgkSqBackward : public OpBackward {
  BgkSqBackward() : OpBackward("bgk_residuals_sq") {}
  SavedVariable F_, Ft_, Fx_, rho_, u_, T_, rho_t_, u_t_, T_t_, v_, w_, kn_;
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor F = F_.unpack(), Ft = Ft_.unpack(), Fx = Fx_.unpack(), rho = rho_.unpack(), u = u_.unpack();
    const at::Tensor T = T_.unpack(), rho_t = rho_t_.unpack(), u_t = u_t_.unpack(), T_t = T_t_.unpack();
    const at::Tensor v = v_.unpack(), w = w_.unpack(), kn = kn_.unpack();
    const int64_t N = F.size(0);
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) return variable_list(10);
    const at::Tensor gQ = zeros_if_undefined(grads[0], F, {N});
    const at::Tensor gC = zeros_if_undefined(grads[1], F, {N, 3});
    const at::Tensor gS = zeros_if_undefined(grads[2], F, {N, 3});
    if (!backward_must_be_differentiable({gQ, gC, gS, F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, kn})) {
      using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor, at::Tensor>;
      static const auto bw = op_handle<Out(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "hrgrad_ext::bgk_residuals_sq_backward");
      auto [dF, dFt, dFx, drho, du, dT, drho_t, du_t, dT_t, dkn] =
          bw.call(gQ, gC, gS, F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn);
      return {dF, dFt, dFx, drho, du, dT, drho_t, du_t, dT_t, param_grad(dkn, kn)};
    }
    static const auto fwd = op_handle<BgkSignature>("hrgrad_ext::bgk_residuals");
    const at::Tensor kin = std::get<0>(fwd.call(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn));
    return bgk_vjp(2 * col(gQ) * kin, gC, gS, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn);
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* s : {&F_, &Ft_, &Fx_, &rho_, &u_, &T_, &rho_t_, &u_t_, &T_t_, &v_, &w_, &kn_}) s->reset_data();
  }
};

Tensor3 bgk_residuals_sq_autograd(c10::DispatchKeySet ks, const at::Tensor& F, const at::Tensor& Ft,
                                  const at::Tensor& Fx, const at::Tensor& rho, const at::Tensor& u, const at::Tensor& T,
                                  const at::Tensor& rho_t, const at::Tensor& u_t, const at::Tensor& T_t,
                                  const at::Tensor& v, const at::Tensor& w, const at::Tensor& kn) {
  static const auto op = op_handle<BgkSignature>("hrgrad_ext::bgk_residuals_sq");
  check_not_differentiable("bgk_residuals_sq", "v", v, kNodesWhy);
  check_not_differentiable("bgk_residuals_sq", "w", w, kNodesWhy);
  NodePtr<BgkSqBackward> node;
  if (compute_requires_grad(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, kn)) {
    node = make_node<BgkSqBackward>();
    node->set_next_edges(collect_next_edges(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, kn));
    save_inputs({&node->F_, &node->Ft_, &node->Fx_, &node->rho_, &node->u_, &node->T_, &node->rho_t_, &node->u_t_,
                 &node->T_t_, &node->v_, &node->w_, &node->kn_},
                {F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn});
  }
  at::Tensor ksq, cons, consis;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(ksq, cons, consis) = op.redispatch(below_autograd(ks), F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn);
  }
  if (node) set_history({ksq, cons, consis}, node);
  if (any_tangent({F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, kn})) {
    static const auto fwd = op_handle<BgkSignature>("hrgrad_ext::bgk_residuals");
    const at::Tensor kin = std::get<0>(fwd.call(primal(F), primal(Ft), primal(Fx), primal(rho), primal(u), primal(T),
                                                primal(rho_t), primal(u_t), primal(T_t), v, w, primal(kn)));
    auto [tkin, tcons, tconsis] = bgk_jvp(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn);
    set_tangent(ksq, 2 * (kin * tkin).sum(1));
    set_tangent(cons, tcons);
    set_tangent(consis, tconsis);
  }
  return {ksq, cons, consis};
}

// --- transport_mm_residuals --------------------------------------------------------------------
// With the average <x> = sum_j w_j x_j / sum_j w_j and the projection P x = x - <x>:
//   g = P Graw,   micro = eps^2 P Graw_t + eps P(v P Graw_x) + v rho_x + g,   macro = rho_t + <v P Graw_x>.
// P is linear with adjoint P* y = y - (w / sum w) sum_j y_j.

struct Averages {
  at::Tensor pw;  // [1, V] w / sum w
  at::Tensor P(const at::Tensor& x) const { return x - (x * pw).sum(1, true); }
  at::Tensor P_adjoint(const at::Tensor& y) const { return y - pw * y.sum(1, true); }
};

Averages averages(const at::Tensor& w) { return {node_row(w / w.sum())}; }

// The vector-Jacobian product of transport_mm_residuals in differentiable ATen ops; gradients of
// Graw, Graw_t, Graw_x, rho_t, rho_x, eps. gg = grad_g may be undefined (zero).
variable_list transport_vjp(const at::Tensor& gg, const at::Tensor& gm, const at::Tensor& gc, const at::Tensor& Gt,
                            const at::Tensor& Gx, const at::Tensor& v, const at::Tensor& w, const at::Tensor& eps) {
  const Averages avg = averages(w);
  const at::Tensor vv = node_row(v), e = per_row(eps);
  const at::Tensor dG = avg.P_adjoint(gg.defined() ? gg + gm : gm);
  const at::Tensor dGt = avg.P_adjoint(e * e * gm);
  const at::Tensor dGx = avg.P_adjoint(vv * (avg.P_adjoint(e * gm) + col(gc) * avg.pw));
  const at::Tensor drho_x = (gm * vv).sum(1);
  const at::Tensor deps = param_grad((gm * (2 * e * avg.P(Gt) + avg.P(vv * avg.P(Gx)))).sum(1), eps);
  return {dG, dGt, dGx, gc, drho_x, deps};
}

using TransportSignature = Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

// The tangents of transport_mm_residuals' outputs for inputs carrying forward-mode tangents.
// Linear in every input but eps: the op itself at the tangents, plus the eps term.
Tensor3 transport_jvp(const at::Tensor& G, const at::Tensor& Gt, const at::Tensor& Gx, const at::Tensor& rho_t,
                      const at::Tensor& rho_x, const at::Tensor& v, const at::Tensor& w, const at::Tensor& eps) {
  static const auto op = op_handle<TransportSignature>("hrgrad_ext::transport_mm_residuals");
  const at::Tensor peps = primal(eps);
  auto [tg, tmicro, tmacro] = op.call(tangent_or_zeros(G), tangent_or_zeros(Gt), tangent_or_zeros(Gx),
                                      tangent_or_zeros(rho_t), tangent_or_zeros(rho_x), v, w, peps);
  if (has_tangent(eps)) {
    const Averages avg = averages(w);
    const at::Tensor e = per_row(peps);
    tmicro = tmicro + per_row(eps._fw_grad(0)) * (2 * e * avg.P(primal(Gt)) + avg.P(node_row(v) * avg.P(primal(Gx))));
  }
  return {tg, tmicro, tmacro};
}

struct TransportBackward : public OpBackward {
  TransportBackward() : OpBackward("transport_mm_residuals") {}
  SavedVariable Gt_, Gx_, v_, w_, eps_;
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor Gt = Gt_.unpack(), Gx = Gx_.unpack(), v = v_.unpack(), w = w_.unpack(), eps = eps_.unpack();
    const int64_t N = Gt.size(0);
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) return variable_list(6);
    const at::Tensor gg = zeros_if_undefined(grads[0], Gt, Gt.sizes());
    const at::Tensor gm = zeros_if_undefined(grads[1], Gt, Gt.sizes());
    const at::Tensor gc = zeros_if_undefined(grads[2], Gt, {N});
    if (!backward_must_be_differentiable({gg, gm, gc, Gt, Gx, eps})) {
      using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
      static const auto bw =
          op_handle<Out(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
              "hrgrad_ext::transport_mm_residuals_backward");
      auto [dG, dGt, dGx, drho_x, deps] = bw.call(gg, gm, gc, Gt, Gx, v, w, eps);
      // macro = rho_t + ...: its gradient passes through unchanged.
      return {dG, dGt, dGx, gc, drho_x, param_grad(deps, eps)};
    }
    return transport_vjp(gg, gm, gc, Gt, Gx, v, w, eps);
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* s : {&Gt_, &Gx_, &v_, &w_, &eps_}) s->reset_data();
  }
};

Tensor3 transport_mm_residuals_autograd(c10::DispatchKeySet ks, const at::Tensor& G, const at::Tensor& Gt,
                                        const at::Tensor& Gx, const at::Tensor& rho_t, const at::Tensor& rho_x,
                                        const at::Tensor& v, const at::Tensor& w, const at::Tensor& eps) {
  static const auto op = op_handle<TransportSignature>("hrgrad_ext::transport_mm_residuals");
  check_not_differentiable("transport_mm_residuals", "v", v, kNodesWhy);
  check_not_differentiable("transport_mm_residuals", "w", w, kNodesWhy);
  NodePtr<TransportBackward> node;
  if (compute_requires_grad(G, Gt, Gx, rho_t, rho_x, eps)) {
    node = make_node<TransportBackward>();
    node->set_next_edges(collect_next_edges(G, Gt, Gx, rho_t, rho_x, eps));
    save_inputs({&node->Gt_, &node->Gx_, &node->v_, &node->w_, &node->eps_},
                {Gt, Gx, v, w, eps});
  }
  at::Tensor g, micro, macro;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(g, micro, macro) = op.redispatch(below_autograd(ks), G, Gt, Gx, rho_t, rho_x, v, w, eps);
  }
  if (node) set_history({g, micro, macro}, node);
  if (any_tangent({G, Gt, Gx, rho_t, rho_x, eps})) {
    auto [tg, tmicro, tmacro] = transport_jvp(G, Gt, Gx, rho_t, rho_x, v, w, eps);
    set_tangent(g, tg);
    set_tangent(micro, tmicro);
    set_tangent(macro, tmacro);
  }
  return {g, micro, macro};
}

// --- transport_mm_residuals_sq: (sum_j micro_ij^2, macro) --------------------------------------
// The derivatives of transport_mm_residuals with grad_g = 0 and grad_micro = 2 grad_micro_sq
// micro (see bgk_residuals_sq).

struct TransportSqBackward : public OpBackward {
  TransportSqBackward() : OpBackward("transport_mm_residuals_sq") {}
  SavedVariable G_, Gt_, Gx_, rho_x_, v_, w_, eps_;
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor G = G_.unpack(), Gt = Gt_.unpack(), Gx = Gx_.unpack(), rho_x = rho_x_.unpack();
    const at::Tensor v = v_.unpack(), w = w_.unpack(), eps = eps_.unpack();
    const int64_t N = G.size(0);
    if (!grads[0].defined() && !grads[1].defined()) return variable_list(6);
    const at::Tensor gQ = zeros_if_undefined(grads[0], G, {N});
    const at::Tensor gc = zeros_if_undefined(grads[1], G, {N});
    if (!backward_must_be_differentiable({gQ, gc, G, Gt, Gx, rho_x, eps})) {
      using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
      static const auto bw =
          op_handle<Out(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
              "hrgrad_ext::transport_mm_residuals_sq_backward");
      auto [dG, dGt, dGx, drho_x, deps] = bw.call(gQ, gc, G, Gt, Gx, rho_x, v, w, eps);
      return {dG, dGt, dGx, gc, drho_x, param_grad(deps, eps)};
    }
    // micro does not depend on rho_t: any [N] tensor stands in for it.
    static const auto fwd = op_handle<TransportSignature>("hrgrad_ext::transport_mm_residuals");
    const at::Tensor micro = std::get<1>(fwd.call(G, Gt, Gx, rho_x, rho_x, v, w, eps));
    return transport_vjp(at::Tensor(), 2 * col(gQ) * micro, gc, Gt, Gx, v, w, eps);
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* s : {&G_, &Gt_, &Gx_, &rho_x_, &v_, &w_, &eps_}) s->reset_data();
  }
};

std::tuple<at::Tensor, at::Tensor> transport_mm_residuals_sq_autograd(
    c10::DispatchKeySet ks, const at::Tensor& G, const at::Tensor& Gt, const at::Tensor& Gx, const at::Tensor& rho_t,
    const at::Tensor& rho_x, const at::Tensor& v, const at::Tensor& w, const at::Tensor& eps) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&)>("hrgrad_ext::transport_mm_residuals_sq");
  check_not_differentiable("transport_mm_residuals_sq", "v", v, kNodesWhy);
  check_not_differentiable("transport_mm_residuals_sq", "w", w, kNodesWhy);
  NodePtr<TransportSqBackward> node;
  if (compute_requires_grad(G, Gt, Gx, rho_t, rho_x, eps)) {
    node = make_node<TransportSqBackward>();
    node->set_next_edges(collect_next_edges(G, Gt, Gx, rho_t, rho_x, eps));
    save_inputs({&node->G_, &node->Gt_, &node->Gx_, &node->rho_x_, &node->v_, &node->w_, &node->eps_},
                {G, Gt, Gx, rho_x, v, w, eps});
  }
  at::Tensor msq, macro;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(msq, macro) = op.redispatch(below_autograd(ks), G, Gt, Gx, rho_t, rho_x, v, w, eps);
  }
  if (node) set_history({msq, macro}, node);
  if (any_tangent({G, Gt, Gx, rho_t, rho_x, eps})) {
    static const auto fwd = op_handle<TransportSignature>("hrgrad_ext::transport_mm_residuals");
    const at::Tensor micro = std::get<1>(fwd.call(primal(G), primal(Gt), primal(Gx), primal(rho_t), primal(rho_x), v, w,
                                                  primal(eps)));
    auto [tg, tmicro, tmacro] = transport_jvp(G, Gt, Gx, rho_t, rho_x, v, w, eps);
    set_tangent(msq, 2 * (micro * tmicro).sum(1));
    set_tangent(macro, tmacro);
  }
  return {msq, macro};
}

// --- the fused backward kernels: first-order only ----------------------------------------------

at::Tensor velocity_moments_backward_autograd(c10::DispatchKeySet ks, const at::Tensor& grad, const at::Tensor& v,
                                              const at::Tensor& w) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "hrgrad_ext::velocity_moments_backward");
  check_backward_kernel_not_differentiated("velocity_moments_backward", {grad, v, w});
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.redispatch(below_autograd(ks), grad, v, w);
}

Tensor3 maxwellian_backward_autograd(c10::DispatchKeySet ks, const at::Tensor& grad, const at::Tensor& rho,
                                     const at::Tensor& u, const at::Tensor& T, const at::Tensor& v) {
  static const auto op = op_handle<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&)>("hrgrad_ext::maxwellian_backward");
  check_backward_kernel_not_differentiated("maxwellian_backward", {grad, rho, u, T, v});
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.redispatch(below_autograd(ks), grad, rho, u, T, v);
}

using BgkGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor, at::Tensor>;

BgkGrads bgk_residuals_backward_autograd(c10::DispatchKeySet ks, const at::Tensor& gK, const at::Tensor& gC,
                                         const at::Tensor& gS, const at::Tensor& Ft, const at::Tensor& Fx,
                                         const at::Tensor& rho, const at::Tensor& u, const at::Tensor& T,
                                         const at::Tensor& rho_t, const at::Tensor& u_t, const at::Tensor& T_t,
                                         const at::Tensor& v, const at::Tensor& w, const at::Tensor& kn) {
  static const auto op = op_handle<BgkGrads(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&)>("hrgrad_ext::bgk_residuals_backward");
  check_backward_kernel_not_differentiated("bgk_residuals_backward",
                                           {gK, gC, gS, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn});
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.redispatch(below_autograd(ks), gK, gC, gS, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn);
}

using TransportGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

TransportGrads transport_mm_residuals_backward_autograd(c10::DispatchKeySet ks, const at::Tensor& gg,
                                                        const at::Tensor& gm, const at::Tensor& gc,
                                                        const at::Tensor& Gt, const at::Tensor& Gx,
                                                        const at::Tensor& v, const at::Tensor& w,
                                                        const at::Tensor& eps) {
  static const auto op =
      op_handle<TransportGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "hrgrad_ext::transport_mm_residuals_backward");
  check_backward_kernel_not_differentiated("transport_mm_residuals_backward", {gg, gm, gc, Gt, Gx, v, w, eps});
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.redispatch(below_autograd(ks), gg, gm, gc, Gt, Gx, v, w, eps);
}

BgkGrads bgk_residuals_sq_backward_autograd(c10::DispatchKeySet ks, const at::Tensor& gQ, const at::Tensor& gC,
                                            const at::Tensor& gS, const at::Tensor& F, const at::Tensor& Ft,
                                            const at::Tensor& Fx, const at::Tensor& rho, const at::Tensor& u,
                                            const at::Tensor& T, const at::Tensor& rho_t, const at::Tensor& u_t,
                                            const at::Tensor& T_t, const at::Tensor& v, const at::Tensor& w,
                                            const at::Tensor& kn) {
  static const auto op = op_handle<BgkGrads(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&)>("hrgrad_ext::bgk_residuals_sq_backward");
  check_backward_kernel_not_differentiated("bgk_residuals_sq_backward",
                                           {gQ, gC, gS, F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn});
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.redispatch(below_autograd(ks), gQ, gC, gS, F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn);
}

TransportGrads transport_mm_residuals_sq_backward_autograd(c10::DispatchKeySet ks, const at::Tensor& gQ,
                                                           const at::Tensor& gc, const at::Tensor& G,
                                                           const at::Tensor& Gt, const at::Tensor& Gx,
                                                           const at::Tensor& rho_x, const at::Tensor& v,
                                                           const at::Tensor& w, const at::Tensor& eps) {
  static const auto op =
      op_handle<TransportGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&)>("hrgrad_ext::transport_mm_residuals_sq_backward");
  check_backward_kernel_not_differentiated("transport_mm_residuals_sq_backward", {gQ, gc, G, Gt, Gx, rho_x, v, w, eps});
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.redispatch(below_autograd(ks), gQ, gc, G, Gt, Gx, rho_x, v, w, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(hrgrad_ext, Autograd, m) {
  m.impl("velocity_moments", &velocity_moments_autograd);
  m.impl("maxwellian", &maxwellian_autograd);
  m.impl("bgk_residuals", &bgk_residuals_autograd);
  m.impl("transport_mm_residuals", &transport_mm_residuals_autograd);
  m.impl("bgk_residuals_sq", &bgk_residuals_sq_autograd);
  m.impl("transport_mm_residuals_sq", &transport_mm_residuals_sq_autograd);
  m.impl("velocity_moments_backward", &velocity_moments_backward_autograd);
  m.impl("maxwellian_backward", &maxwellian_backward_autograd);
  m.impl("bgk_residuals_backward", &bgk_residuals_backward_autograd);
  m.impl("transport_mm_residuals_backward", &transport_mm_residuals_backward_autograd);
  m.impl("bgk_residuals_sq_backward", &bgk_residuals_sq_backward_autograd);
  m.impl("transport_mm_residuals_sq_backward", &transport_mm_residuals_sq_backward_autograd);
}

}  // namespace hrgrad_ext::autograd
