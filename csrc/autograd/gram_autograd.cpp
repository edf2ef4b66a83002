// Autograd of the gram family (gram, combine, hrgrad_weights, combine_accumulate_): see
// autograd_common.h for the scheme. The backward formulas of gram and combine are one BLAS
// call each and already differentiable, so they serve both first-order and higher-order use.
#include "autograd/autograd_common.h"

#include <torch/csrc/autograd/variable.h>

#include <limits>
#include <string>
#include <tuple>

#include "gram/hrgrad_solve.h"

namespace hrgrad_ext::autograd {
namespace {

using torch::autograd::collect_next_edges;
using torch::autograd::compute_requires_grad;
using torch::autograd::set_history;

// --- gram: G = J J^T ------------------------------------------------------------------------

// dL/dJ = (gG + gG^T) J, in J's dtype.
at::Tensor gram_vjp(const at::Tensor& J, const at::Tensor& gG) {
  return at::matmul((gG + gG.mT()).to(J.scalar_type()), J);
}

struct GramBackward : public OpBackward {
  GramBackward() : OpBackward("gram") {}
  SavedVariable J_;
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined() || !task_should_compute_output(0)) return {at::Tensor()};
    return {gram_vjp(J_.unpack(), grads[0])};
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    J_.reset_data();
  }
};

at::Tensor gram_autograd(c10::DispatchKeySet ks, const at::Tensor& J, std::optional<at::ScalarType> dtype) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, std::optional<at::ScalarType>)>("hrgrad_ext::gram");
  NodePtr<GramBackward> node;
  if (compute_requires_grad(J)) {
    node = make_node<GramBackward>();
    node->set_next_edges(collect_next_edges(J));
    node->J_ = SavedVariable(J, false);
  }
  at::Tensor G;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    G = op.redispatch(below_autograd(ks), J, dtype);
  }
  if (node) set_history(G, node);
  if (has_tangent(J)) {  // dG = dJ J^T + J dJ^T
    const at::Tensor P = at::matmul(J._fw_grad(0).to(G.scalar_type()), primal(J).to(G.scalar_type()).mT());
    set_tangent(G, P + P.mT());
  }
  return G;
}

// --- combine: out = J^T w -------------------------------------------------------------------

struct CombineBackward : public OpBackward {
  CombineBackward() : OpBackward("combine") {}
  SavedVariable J_, w_;  // each only when the other one's gradient is needed
  at::ScalarType J_dtype_ = at::kFloat, w_dtype_ = at::kFloat;
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor& g = grads[0];
    at::Tensor gJ, gw;
    if (!g.defined()) return {gJ, gw};
    if (task_should_compute_output(0)) gJ = (w_.unpack().to(J_dtype_).unsqueeze(-1) * g.unsqueeze(-2)).to(J_dtype_);
    if (task_should_compute_output(1)) {
      gw = at::matmul(J_.unpack(), g.to(J_dtype_).unsqueeze(-1)).squeeze(-1).to(w_dtype_);
    }
    return {gJ, gw};
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    J_.reset_data();
    w_.reset_data();
  }
};

at::Tensor combine_autograd(c10::DispatchKeySet ks, const at::Tensor& J, const at::Tensor& w) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("hrgrad_ext::combine");
  NodePtr<CombineBackward> node;
  if (compute_requires_grad(J, w)) {
    node = make_node<CombineBackward>();
    node->set_next_edges(collect_next_edges(J, w));
    if (node->should_compute_output(1)) node->J_ = SavedVariable(J, false);
    if (node->should_compute_output(0)) node->w_ = SavedVariable(w, false);
    node->J_dtype_ = J.scalar_type();
    node->w_dtype_ = w.scalar_type();
  }
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = op.redispatch(below_autograd(ks), J, w);
  }
  if (node) set_history(out, node);
  if (any_tangent({J, w})) {  // d(J^T w) = dJ^T w + J^T dw: the op itself is linear in each
    at::Tensor t;
    if (has_tangent(J)) t = op.call(J._fw_grad(0), primal(w));
    if (has_tangent(w)) {
      const at::Tensor tw = op.call(primal(J), w._fw_grad(0));
      t = t.defined() ? t + tw : tw;
    }
    set_tangent(out, t);
  }
  return out;
}

// --- hrgrad_weights ------------------------------------------------------------------------
// Where the solve took its generic branch (status OK: every task non-zero, C = D^-1 G D^-1
// invertible, C^-1 1 conflicting with no task) the weights are the smooth function
//     w = phi(d) * a / (d * sigma),   a = C^-1 1,   sigma = 1^T a,
// of the symmetric part of G (the kernel symmetrises G), with phi = sum(d) for "projection"
// and "arithmetic" (C a = 1 makes both lengths sum(d) / |x|) and K * mean(d) for the other
// length models. Elsewhere (zero tasks, rank deficiency, dual-cone fallback, zero update,
// NaN/Inf) the weights are not differentiable in G and the derivatives are NaN, never a
// silent number. The formulas below are in float64 whatever G's dtype.

struct WeightsPieces {
  at::Tensor ok;      // [..., 1] status == OK
  at::Tensor Gs;      // symmetric part of G where OK, identity elsewhere (keeps the solve finite)
  at::Tensor d, s;    // norms and their inverses
  at::Tensor C, a;    // cosine matrix, C^-1 1
  at::Tensor sigma;   // 1^T a  [..., 1]
  at::Tensor phi;     // the length factor  [..., 1]
  at::Tensor dphi;    // d phi / d d  (a constant pattern for min / max)
  at::Tensor w;
};

WeightsPieces weights_pieces(const at::Tensor& G, const at::Tensor& status, int length_model) {
  WeightsPieces p;
  const at::Tensor G64 = G.to(at::kDouble);
  const int64_t K = G.size(-1);
  p.ok = (status == 0).unsqueeze(-1);
  const at::Tensor eye = at::eye(K, G64.options());
  p.Gs = at::where(p.ok.unsqueeze(-1), (G64 + G64.mT()) * 0.5, eye);
  p.d = p.Gs.diagonal(0, -2, -1).sqrt();
  p.s = p.d.reciprocal();
  p.C = p.Gs * p.s.unsqueeze(-1) * p.s.unsqueeze(-2);
  const at::Tensor ones = at::ones_like(p.d).unsqueeze(-1);
  p.a = std::get<0>(at::linalg_solve_ex(p.C, ones, /*left=*/true, /*check_errors=*/false)).squeeze(-1);
  p.sigma = p.a.sum(-1, /*keepdim=*/true);
  const double Kd = static_cast<double>(K);
  switch (length_model) {
    case kLengthProjection:
    case kLengthArithmetic:
      p.phi = p.d.sum(-1, true);
      p.dphi = at::ones_like(p.d);
      break;
    case kLengthMin:
    case kLengthMax: {
      // the kernel's fmin/fmax: at ties the derivative is split evenly (as torch.amin does)
      const at::Tensor ext = length_model == kLengthMin ? p.d.amin(-1, true) : p.d.amax(-1, true);
      p.phi = ext * Kd;
      const at::Tensor hit = (p.d == ext).to(at::kDouble);
      p.dphi = hit * Kd / hit.sum(-1, true);
      break;
    }
    case kLengthHarmonic:
      p.phi = (Kd * Kd) / p.s.sum(-1, true);
      p.dphi = (p.phi * p.s / Kd).square();
      break;
    default:  // geometric
      p.phi = p.d.log().mean(-1, true).exp() * Kd;
      p.dphi = p.phi * p.s / Kd;
      break;
  }
  p.w = p.phi * p.s * p.a / p.sigma;
  return p;
}

// Where the status is not OK, a non-zero perturbation (or cotangent) of an entry has no
// derivative: NaN there, zero for a zero one (an entry that does not reach the loss).
at::Tensor nan_where_not_ok(const at::Tensor& x, const at::Tensor& ok, const at::Tensor& perturbed) {
  const at::Tensor undefined = at::where(perturbed, std::numeric_limits<double>::quiet_NaN(), 0.0);
  return at::where(ok, x, undefined.to(x.scalar_type()));
}

// Tangent of w for a tangent dG of G.
at::Tensor weights_jvp(const WeightsPieces& p, const at::Tensor& dG) {
  const at::Tensor okm = p.ok.unsqueeze(-1);
  const at::Tensor dG64 = dG.to(at::kDouble);
  const at::Tensor dGs = at::where(okm, (dG64 + dG64.mT()) * 0.5, 0.0);
  const at::Tensor dd = dGs.diagonal(0, -2, -1) * p.s * 0.5;
  const at::Tensor ds = -dd * p.s * p.s;
  const at::Tensor ss = p.s.unsqueeze(-1) * p.s.unsqueeze(-2);
  const at::Tensor sds = ds.unsqueeze(-1) * p.s.unsqueeze(-2);
  const at::Tensor dC = dGs * ss + p.Gs * (sds + sds.mT());
  const at::Tensor rhs = at::matmul(dC, p.a.unsqueeze(-1));
  const at::Tensor da = -std::get<0>(at::linalg_solve_ex(p.C, rhs, true, false)).squeeze(-1);
  const at::Tensor dsigma = da.sum(-1, true);
  const at::Tensor dphi = (p.dphi * dd).sum(-1, true);
  const at::Tensor dw = p.w * (dphi / p.phi - dsigma / p.sigma) + p.phi * (ds * p.a + p.s * da) / p.sigma;
  return nan_where_not_ok(dw, p.ok, (dG64.abs().sum({-2, -1}) != 0).unsqueeze(-1));
}

// Gradient with respect to G for an incoming gradient gw of w.
at::Tensor weights_vjp(const WeightsPieces& p, const at::Tensor& gw) {
  const at::Tensor g = gw.to(at::kDouble);
  const at::Tensor Q = (g * p.w).sum(-1, true);
  const at::Tensor gphi = Q / p.phi;
  const at::Tensor gsigma = -Q / p.sigma;
  at::Tensor gs = g * p.phi * p.a / p.sigma;
  const at::Tensor ga = g * p.phi * p.s / p.sigma + gsigma;
  // a = C^-1 1 with C symmetric: gC = -(C^-1 ga) a^T
  const at::Tensor b = std::get<0>(at::linalg_solve_ex(p.C, ga.unsqueeze(-1), true, false));
  const at::Tensor gC = -b * p.a.unsqueeze(-2);
  // C = S Gs S
  at::Tensor gGs = gC * p.s.unsqueeze(-1) * p.s.unsqueeze(-2);
  gs = gs + ((gC + gC.mT()) * p.Gs * p.s.unsqueeze(-2)).sum(-1);
  // s = 1/d, d = sqrt(diag Gs)
  const at::Tensor gd = -gs * p.s * p.s + gphi * p.dphi;
  gGs = gGs + at::diag_embed(gd * p.s * 0.5);
  const at::Tensor gG = (gGs + gGs.mT()) * 0.5;
  return nan_where_not_ok(gG, p.ok.unsqueeze(-1), (g.abs().sum(-1, /*keepdim=*/true) != 0).unsqueeze(-1));
}

struct WeightsBackward : public OpBackward {
  WeightsBackward() : OpBackward("hrgrad_weights") {}
  SavedVariable G_;
  at::Tensor status_;  // an integer output: nothing to differentiate, no graph
  int length_model_ = 0;
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined() || !task_should_compute_output(0)) return {at::Tensor()};
    const at::Tensor G = G_.unpack();
    return {weights_vjp(weights_pieces(G, status_, length_model_), grads[0]).to(G.scalar_type())};
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    G_.reset_data();
    status_.reset();
  }
};

int length_model_id(c10::string_view name) {
  const std::string n(name);
  if (n == "projection") return kLengthProjection;
  if (n == "min") return kLengthMin;
  if (n == "max") return kLengthMax;
  if (n == "harmonic") return kLengthHarmonic;
  if (n == "arithmetic") return kLengthArithmetic;
  return kLengthGeometric;  // anything else was rejected by the forward kernel already
}

std::tuple<at::Tensor, at::Tensor> hrgrad_weights_autograd(c10::DispatchKeySet ks, const at::Tensor& G,
                                                           c10::string_view length_model, std::optional<double> rcond) {
  static const auto op =
      op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::string_view, std::optional<double>)>(
          "hrgrad_ext::hrgrad_weights");
  const bool requires_grad = compute_requires_grad(G);
  at::Tensor w, status;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(w, status) = op.redispatch(below_autograd(ks), G, length_model, rcond);
  }
  const int lm = (requires_grad || has_tangent(G)) ? length_model_id(length_model) : 0;
  if (requires_grad) {
    auto node = make_node<WeightsBackward>();
    node->set_next_edges(collect_next_edges(G));
    node->G_ = SavedVariable(G, false);
    node->status_ = status;
    node->length_model_ = lm;
    set_history(w, node);
  }
  if (has_tangent(G)) set_tangent(w, weights_jvp(weights_pieces(primal(G), status, lm), G._fw_grad(0)).to(w.scalar_type()));
  return {w, status};
}

// --- combine_accumulate_: in place into .grad buffers, not differentiable ------------------

void combine_accumulate_autograd(c10::DispatchKeySet ks, at::Tensor& out, const at::Tensor& J, const at::Tensor& w) {
  static const auto op =
      op_handle<void(at::Tensor&, const at::Tensor&, const at::Tensor&)>("hrgrad_ext::combine_accumulate_");
  constexpr const char* why = "an in-place accumulation into gradient buffers; use combine";
  check_not_differentiable("combine_accumulate_", "out", out, why);
  check_not_differentiable("combine_accumulate_", "J", J, why);
  check_not_differentiable("combine_accumulate_", "w", w, why);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(below_autograd(ks), out, J, w);
  }
  torch::autograd::impl::bump_version(out);  // what ADInplaceOrView would do: saved copies of out become stale
}

}  // namespace

TORCH_LIBRARY_IMPL(hrgrad_ext, Autograd, m) {
  m.impl("gram", &gram_autograd);
  m.impl("combine", &combine_autograd);
  m.impl("hrgrad_weights", &hrgrad_weights_autograd);
  m.impl("combine_accumulate_", &combine_accumulate_autograd);
}

}  // namespace hrgrad_ext::autograd
