// CPU kernels of the kinetic family: velocity_moments, maxwellian, bgk_residuals,
// transport_mm_residuals and their fused backward ops.
//
// Every kernel parallelises over rows (at::parallel_for); one row (V values of each field) is
// processed by one thread, its velocity sums accumulated in double whatever the input dtype,
// so the results do not depend on the thread count. Element-wise results are formed in double
// and rounded once to the output dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/cpu_clones.h"
#include "kinetic/kinetic_common.h"

namespace hrgrad_ext {
namespace kinetic {
namespace {

constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)

// Rows per parallel task: about 16k elements, so small batches stay on one thread (the
// threading overhead would exceed the work) and large ones split evenly.
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

// ---- exp for the Maxwellian ----------------------------------------------------------------
// The Maxwellian needs one exp per element; glibc's exp is a scalar call of ~10 ns here, which
// made the fused kernels slower than eager PyTorch (whose exp is vectorised). exp_poly is a
// branch-free exp the compiler vectorises: x = k ln2 + r with |r| <= ln2/2 (Cody-Waite split of
// ln2, so k ln2_hi is exact), exp(r) by its Taylor polynomial to r^13 (truncation < 1e-17
// relative), 2^k assembled in the exponent bits. Measured max relative error against std::exp
// on [-708, 709]: 2.2e-16. Below -708 it returns 0 (true value < 3.3e-308), above 709 +inf,
// NaN propagates.
inline __attribute__((always_inline)) double exp_poly(double x0) {
  const double x = x0 < -708.0 ? -708.0 : (x0 > 709.0 ? 709.0 : x0);
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  const double kd = x * 1.4426950408889634074 + shifter;
  const double k = kd - shifter;
  const uint64_t ki = std::bit_cast<uint64_t>(kd);  // low bits hold k (two's complement)
  const double r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const double y = p * std::bit_cast<double>((ki + 1023) << 52);  // shift drops the high bits
  return x0 < -708.0 ? 0.0 : (x0 > 709.0 ? std::numeric_limits<double>::infinity() : y);
}

// out[j] = exp(-(v[j] - u)^2 * inv2T): the Gaussian factor of the Maxwellian for one row.
HRGRAD_CPU_CLONES void gauss_row(const double* v, double u, double inv2T, double* out, int64_t V) {
  for (int64_t j = 0; j < V; ++j) {
    const double d = v[j] - u;
    out[j] = exp_poly(-d * d * inv2T);
  }
}

// v and w converted to double once per call (they are read by every row).
inline std::vector<double> as_double(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  return std::vector<double>(d.const_data_ptr<double>(), d.const_data_ptr<double>() + d.numel());
}

struct Nodes {
  std::vector<double> v, w;
  Nodes(const at::Tensor& vt, const at::Tensor& wt) : v(as_double(vt)), w(as_double(wt)) {}
};

// ---- velocity_moments ---------------------------------------------------------------------

at::Tensor velocity_moments_cpu(const at::Tensor& F_, const at::Tensor& v, const at::Tensor& w, int64_t order) {
  check_velocity_moments(F_, v, w, order);
  const at::Tensor F = F_.contiguous();
  const int64_t N = F.size(0), V = F.size(1), K = order + 1;
  const Nodes nd(v, w);
  // table[k][j] = w_j v_j^k: each moment is then a dot product with the row.
  std::vector<double> table(static_cast<size_t>(K * V));
  for (int64_t j = 0; j < V; ++j) {
    double p = nd.w[j];
    for (int64_t k = 0; k < K; ++k, p *= nd.v[j]) table[k * V + j] = p;
  }
  at::Tensor out = at::empty({N, K}, F.options());
  AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "velocity_moments_cpu", [&] {
    const scalar_t* f = F.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t r0, int64_t r1) {
      std::vector<double> row(V);
      for (int64_t i = r0; i < r1; ++i) {
        for (int64_t j = 0; j < V; ++j) row[j] = static_cast<double>(f[i * V + j]);
        for (int64_t k = 0; k < K; ++k) {
          const double* t = table.data() + k * V;
          double s = 0.0;
          for (int64_t j = 0; j < V; ++j) s += t[j] * row[j];
          o[i * K + k] = static_cast<scalar_t>(s);
        }
      }
    });
  });
  return out;
}

at::Tensor velocity_moments_backward_cpu(const at::Tensor& grad_, const at::Tensor& v, const at::Tensor& w) {
  check_velocity_moments_backward(grad_, v, w);
  const at::Tensor grad = grad_.contiguous();
  const int64_t N = grad.size(0), K = grad.size(1), V = v.size(0);
  const Nodes nd(v, w);
  at::Tensor dF = at::empty({N, V}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "velocity_moments_backward_cpu", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* d = dF.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const scalar_t* gi = g + i * K;
        for (int64_t j = 0; j < V; ++j) {
          // dF_ij = w_j sum_k g_ik v_j^k, Horner in v_j.
          double s = static_cast<double>(gi[K - 1]);
          for (int64_t k = K - 2; k >= 0; --k) s = s * nd.v[j] + static_cast<double>(gi[k]);
          d[i * V + j] = static_cast<scalar_t>(nd.w[j] * s);
        }
      }
    });
  });
  return dF;
}

// ---- maxwellian ---------------------------------------------------------------------------

at::Tensor maxwellian_cpu(const at::Tensor& rho_, const at::Tensor& u_, const at::Tensor& T_, const at::Tensor& v_) {
  check_maxwellian("maxwellian", rho_, u_, T_, v_);
  const at::Tensor rho = rho_.contiguous(), u = u_.contiguous(), T = T_.contiguous(), v = v_.contiguous();
  const int64_t N = rho.size(0), V = v.size(0);
  at::Tensor M = at::empty({N, V}, rho.options());
  AT_DISPATCH_FLOATING_TYPES(rho.scalar_type(), "maxwellian_cpu", [&] {
    const scalar_t *pr = rho.const_data_ptr<scalar_t>(), *pu = u.const_data_ptr<scalar_t>(),
                   *pT = T.const_data_ptr<scalar_t>();
    scalar_t* m = M.mutable_data_ptr<scalar_t>();
    const std::vector<double> vd = as_double(v);
    at::parallel_for(0, N, row_grain(V), [&](int64_t r0, int64_t r1) {
      std::vector<double> ex(V);
      for (int64_t i = r0; i < r1; ++i) {
        const double r = pr[i], uu = pu[i], TT = pT[i];
        const double coef = r * kInvSqrt2Pi / std::sqrt(TT), inv2T = 0.5 / TT;
        gauss_row(vd.data(), uu, inv2T, ex.data(), V);
        for (int64_t j = 0; j < V; ++j) m[i * V + j] = static_cast<scalar_t>(coef * ex[j]);
      }
    });
  });
  return M;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> maxwellian_backward_cpu(const at::Tensor& grad_, const at::Tensor& rho_,
                                                                       const at::Tensor& u_, const at::Tensor& T_,
                                                                       const at::Tensor& v_) {
  check_maxwellian_backward(grad_, rho_, u_, T_, v_);
  const at::Tensor grad = grad_.contiguous(), rho = rho_.contiguous(), u = u_.contiguous(), T = T_.contiguous(),
                   v = v_.contiguous();
  const int64_t N = rho.size(0), V = v.size(0);
  at::Tensor drho = at::empty({N}, rho.options()), du = at::empty({N}, rho.options()),
             dT = at::empty({N}, rho.options());
  AT_DISPATCH_FLOATING_TYPES(rho.scalar_type(), "maxwellian_backward_cpu", [&] {
    const scalar_t *g = grad.const_data_ptr<scalar_t>(), *pr = rho.const_data_ptr<scalar_t>(),
                   *pu = u.const_data_ptr<scalar_t>(), *pT = T.const_data_ptr<scalar_t>();
    scalar_t *o_r = drho.mutable_data_ptr<scalar_t>(), *o_u = du.mutable_data_ptr<scalar_t>(),
             *o_T = dT.mutable_data_ptr<scalar_t>();
    const std::vector<double> vd = as_double(v);
    at::parallel_for(0, N, row_grain(V), [&](int64_t r0, int64_t r1) {
      std::vector<double> ex(V);
      for (int64_t i = r0; i < r1; ++i) {
        const double r = pr[i], uu = pu[i], TT = pT[i];
        const double c = kInvSqrt2Pi / std::sqrt(TT), inv2T = 0.5 / TT;
        // M = r * m0 with m0 = exp(-d^2 / 2T) / sqrt(2 pi T), d = v - u:
        // dM/dr = m0, dM/du = M d / T, dM/dT = M (d^2 - T) / (2 T^2).
        gauss_row(vd.data(), uu, inv2T, ex.data(), V);
        double s0 = 0.0, s1 = 0.0, s2 = 0.0;
        for (int64_t j = 0; j < V; ++j) {
          const double d = vd[j] - uu;
          const double gm0 = static_cast<double>(g[i * V + j]) * c * ex[j];
          s0 += gm0;
          s1 += gm0 * d;
          s2 += gm0 * (d * d - TT);
        }
        o_r[i] = static_cast<scalar_t>(s0);
        o_u[i] = static_cast<scalar_t>(r * s1 / TT);
        o_T[i] = static_cast<scalar_t>(r * s2 * inv2T / TT);
      }
    });
  });
  return {drho, du, dT};
}

// ---- bgk_residuals ------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> bgk_residuals_cpu(
    const at::Tensor& F_, const at::Tensor& Ft_, const at::Tensor& Fx_, const at::Tensor& rho_,
    const at::Tensor& u_, const at::Tensor& T_, const at::Tensor& rho_t_, const at::Tensor& u_t_,
    const at::Tensor& T_t_, const at::Tensor& v, const at::Tensor& w, const at::Tensor& kn_) {
  const int64_t ks = check_bgk(F_, Ft_, Fx_, rho_, u_, T_, rho_t_, u_t_, T_t_, v, w, kn_);
  const at::Tensor F = F_.contiguous(), Ft = Ft_.contiguous(), Fx = Fx_.contiguous(), rho = rho_.contiguous(),
                   u = u_.contiguous(), T = T_.contiguous(), rho_t = rho_t_.contiguous(),
                   u_t = u_t_.contiguous(), T_t = T_t_.contiguous(), kn = kn_.contiguous();
  const int64_t N = F.size(0), V = F.size(1);
  const Nodes nd(v, w);
  at::Tensor kin = at::empty({N, V}, F.options()), cons = at::empty({N, 3}, F.options()),
             consis = at::empty({N, 3}, F.options());
  AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "bgk_residuals_cpu", [&] {
    const scalar_t *f = F.const_data_ptr<scalar_t>(), *ft = Ft.const_data_ptr<scalar_t>(),
                   *fx = Fx.const_data_ptr<scalar_t>(), *pr = rho.const_data_ptr<scalar_t>(),
                   *pu = u.const_data_ptr<scalar_t>(), *pT = T.const_data_ptr<scalar_t>(),
                   *prt = rho_t.const_data_ptr<scalar_t>(), *put = u_t.const_data_ptr<scalar_t>(),
                   *pTt = T_t.const_data_ptr<scalar_t>(), *pk = kn.const_data_ptr<scalar_t>();
    scalar_t *ok = kin.mutable_data_ptr<scalar_t>(), *oc = cons.mutable_data_ptr<scalar_t>(),
             *os = consis.mutable_data_ptr<scalar_t>();
    const double* vv = nd.v.data();
    const double* ww = nd.w.data();
    at::parallel_for(0, N, row_grain(V), [&](int64_t r0, int64_t r1) {
      std::vector<double> ex(V);
      for (int64_t i = r0; i < r1; ++i) {
        const double r = pr[i], uu = pu[i], TT = pT[i], rt = prt[i], ut = put[i], Tt = pTt[i];
        const double k = pk[i * ks];
        const double coef = r * kInvSqrt2Pi / std::sqrt(TT), inv2T = 0.5 / TT;
        gauss_row(vv, uu, inv2T, ex.data(), V);
        const scalar_t *fi = f + i * V, *fti = ft + i * V, *fxi = fx + i * V;
        scalar_t* oki = ok + i * V;
        // The six velocity sums of the issue: sum w F v^{0,1,2}, sum w Fx v^{1,2,3}.
        double sF0 = 0, sF1 = 0, sF2 = 0, sX1 = 0, sX2 = 0, sX3 = 0;
        for (int64_t j = 0; j < V; ++j) {
          const double vj = vv[j], fj = fi[j], fxj = fxi[j];
          const double M = coef * ex[j];
          oki[j] = static_cast<scalar_t>(k * (static_cast<double>(fti[j]) + vj * fxj) - (M - fj));
          const double wf = ww[j] * fj, wx = ww[j] * vj * fxj;
          sF0 += wf;
          sF1 += wf * vj;
          sF2 += wf * vj * vj;
          sX1 += wx;
          sX2 += wx * vj;
          sX3 += wx * vj * vj;
        }
        const double q = uu * uu + TT;  // E = rho q / 2
        oc[3 * i + 0] = static_cast<scalar_t>(rt + sX1);
        oc[3 * i + 1] = static_cast<scalar_t>(rt * uu + r * ut + sX2);
        oc[3 * i + 2] = static_cast<scalar_t>(0.5 * rt * q + 0.5 * r * (2.0 * uu * ut + Tt) + 0.5 * sX3);
        os[3 * i + 0] = static_cast<scalar_t>(r - sF0);
        os[3 * i + 1] = static_cast<scalar_t>(r * uu - sF1);
        os[3 * i + 2] = static_cast<scalar_t>(0.5 * r * q - 0.5 * sF2);
      }
    });
  });
  return {kin, cons, consis};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
bgk_residuals_backward_cpu(const at::Tensor& gK_, const at::Tensor& gC_, const at::Tensor& gS_,
                           const at::Tensor& Ft_, const at::Tensor& Fx_, const at::Tensor& rho_,
                           const at::Tensor& u_, const at::Tensor& T_, const at::Tensor& rho_t_,
                           const at::Tensor& u_t_, const at::Tensor& T_t_, const at::Tensor& v,
                           const at::Tensor& w, const at::Tensor& kn_) {
  const int64_t ks = check_bgk_backward(gK_, gC_, gS_, Ft_, Fx_, rho_, u_, T_, rho_t_, u_t_, T_t_, v, w, kn_);
  const at::Tensor gK = gK_.contiguous(), gC = gC_.contiguous(), gS = gS_.contiguous(), Ft = Ft_.contiguous(),
                   Fx = Fx_.contiguous(), rho = rho_.contiguous(), u = u_.contiguous(), T = T_.contiguous(),
                   rho_t = rho_t_.contiguous(), u_t = u_t_.contiguous(), T_t = T_t_.contiguous(),
                   kn = kn_.contiguous();
  const int64_t N = Ft.size(0), V = Ft.size(1);
  const Nodes nd(v, w);
  const auto opt = Ft.options();
  at::Tensor dF = at::empty({N, V}, opt), dFt = at::empty({N, V}, opt), dFx = at::empty({N, V}, opt);
  // drho, du, dT, drho_t, du_t, dT_t, dkn: separate tensors (outputs of an op must not alias).
  std::vector<at::Tensor> rows;
  for (int r = 0; r < 7; ++r) rows.push_back(at::empty({N}, opt));
  AT_DISPATCH_FLOATING_TYPES(Ft.scalar_type(), "bgk_residuals_backward_cpu", [&] {
    const scalar_t *gk = gK.const_data_ptr<scalar_t>(), *gc = gC.const_data_ptr<scalar_t>(),
                   *gs = gS.const_data_ptr<scalar_t>(), *ft = Ft.const_data_ptr<scalar_t>(),
                   *fx = Fx.const_data_ptr<scalar_t>(), *pr = rho.const_data_ptr<scalar_t>(),
                   *pu = u.const_data_ptr<scalar_t>(), *pT = T.const_data_ptr<scalar_t>(),
                   *prt = rho_t.const_data_ptr<scalar_t>(), *put = u_t.const_data_ptr<scalar_t>(),
                   *pTt = T_t.const_data_ptr<scalar_t>(), *pk = kn.const_data_ptr<scalar_t>();
    scalar_t *odF = dF.mutable_data_ptr<scalar_t>(), *odFt = dFt.mutable_data_ptr<scalar_t>(),
             *odFx = dFx.mutable_data_ptr<scalar_t>();
    scalar_t* orow[7];
    for (int r = 0; r < 7; ++r) orow[r] = rows[r].mutable_data_ptr<scalar_t>();
    const double* vv = nd.v.data();
    const double* ww = nd.w.data();
    at::parallel_for(0, N, row_grain(V), [&](int64_t r0, int64_t r1) {
      std::vector<double> ex(V);
      for (int64_t i = r0; i < r1; ++i) {
        const double r = pr[i], uu = pu[i], TT = pT[i], rt = prt[i], ut = put[i], Tt = pTt[i];
        const double k = pk[i * ks];
        const double c0 = gc[3 * i], c1 = gc[3 * i + 1], c2 = gc[3 * i + 2];
        const double s0 = gs[3 * i], s1 = gs[3 * i + 1], s2 = gs[3 * i + 2];
        const double cm = kInvSqrt2Pi / std::sqrt(TT), inv2T = 0.5 / TT;
        gauss_row(vv, uu, inv2T, ex.data(), V);
        double skn = 0, sm0 = 0, sm1 = 0, sm2 = 0;
        for (int64_t j = 0; j < V; ++j) {
          const int64_t ij = i * V + j;
          const double vj = vv[j], wj = ww[j], g = gk[ij];
          // kinetic = kn (Ft + v Fx) - M + F; consistency uses -sum w v^p F, conservation +sum w v^p Fx.
          odF[ij] = static_cast<scalar_t>(g - wj * (s0 + vj * (s1 + 0.5 * vj * s2)));
          odFt[ij] = static_cast<scalar_t>(k * g);
          odFx[ij] = static_cast<scalar_t>(k * vj * g + wj * vj * (c0 + vj * (c1 + 0.5 * vj * c2)));
          skn += g * (static_cast<double>(ft[ij]) + vj * static_cast<double>(fx[ij]));
          const double d = vj - uu;
          const double gm0 = g * cm * ex[j];  // g * M / rho
          sm0 += gm0;
          sm1 += gm0 * d;
          sm2 += gm0 * (d * d - TT);
        }
        const double q = uu * uu + TT;
        // The Maxwellian enters the kinetic residual with a minus sign (see maxwellian_backward).
        orow[0][i] = static_cast<scalar_t>(-sm0 + c1 * ut + c2 * (uu * ut + 0.5 * Tt) + s0 + s1 * uu + 0.5 * s2 * q);
        orow[1][i] = static_cast<scalar_t>(-r * sm1 / TT + c1 * rt + c2 * (rt * uu + r * ut) + s1 * r + s2 * r * uu);
        orow[2][i] = static_cast<scalar_t>(-r * sm2 * inv2T / TT + 0.5 * c2 * rt + 0.5 * s2 * r);
        orow[3][i] = static_cast<scalar_t>(c0 + c1 * uu + 0.5 * c2 * q);
        orow[4][i] = static_cast<scalar_t>(c1 * r + c2 * r * uu);
        orow[5][i] = static_cast<scalar_t>(0.5 * c2 * r);
        orow[6][i] = static_cast<scalar_t>(skn);
      }
    });
  });
  return {dF, dFt, dFx, rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], rows[6]};
}

// ---- transport_mm_residuals ---------------------------------------------------------------

// Per-call constants of the normalised average <phi> = sum w phi / W: wn_j = w_j / W,
// vbar = <v> and c_j = w_j (v_j - vbar) / W. <v g_x> = sum_j c_j Graw_x,j exactly (g_x is
// Graw_x minus its average), and centring v instead of Graw_x avoids cancelling a large
// row mean of Graw_x.
struct TransportConsts {
  std::vector<double> v, wn, c;
  double vbar = 0.0;
  TransportConsts(const at::Tensor& vt, const at::Tensor& wt) {
    const Nodes nd(vt, wt);
    const size_t V = nd.v.size();
    double W = 0.0, Wv = 0.0;
    for (size_t j = 0; j < V; ++j) {
      W += nd.w[j];
      Wv += nd.w[j] * nd.v[j];
    }
    vbar = Wv / W;
    v = nd.v;
    wn.resize(V);
    c.resize(V);
    for (size_t j = 0; j < V; ++j) {
      wn[j] = nd.w[j] / W;
      c[j] = nd.w[j] * (nd.v[j] - vbar) / W;
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> transport_mm_residuals_cpu(
    const at::Tensor& G_, const at::Tensor& Gt_, const at::Tensor& Gx_, const at::Tensor& rho_t_,
    const at::Tensor& rho_x_, const at::Tensor& v, const at::Tensor& w, const at::Tensor& eps_) {
  const int64_t es = check_transport(G_, Gt_, Gx_, rho_t_, rho_x_, v, w, eps_);
  const at::Tensor G = G_.contiguous(), Gt = Gt_.contiguous(), Gx = Gx_.contiguous(),
                   rho_t = rho_t_.contiguous(), rho_x = rho_x_.contiguous(), eps = eps_.contiguous();
  const int64_t N = G.size(0), V = G.size(1);
  const TransportConsts tc(v, w);
  at::Tensor g = at::empty({N, V}, G.options()), micro = at::empty({N, V}, G.options()),
             macro = at::empty({N}, G.options());
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "transport_mm_residuals_cpu", [&] {
    const scalar_t *pg = G.const_data_ptr<scalar_t>(), *pgt = Gt.const_data_ptr<scalar_t>(),
                   *pgx = Gx.const_data_ptr<scalar_t>(), *prt = rho_t.const_data_ptr<scalar_t>(),
                   *prx = rho_x.const_data_ptr<scalar_t>(), *pe = eps.const_data_ptr<scalar_t>();
    scalar_t *og = g.mutable_data_ptr<scalar_t>(), *om = micro.mutable_data_ptr<scalar_t>(),
             *oc = macro.mutable_data_ptr<scalar_t>();
    const double *vv = tc.v.data(), *wn = tc.wn.data(), *cc = tc.c.data();
    at::parallel_for(0, N, row_grain(V), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const scalar_t *gi = pg + i * V, *gti = pgt + i * V, *gxi = pgx + i * V;
        // Pass 1 (row in L1 afterwards): the three averages and a = <v g_x>.
        double mg = 0, mt = 0, mx = 0, a = 0;
        for (int64_t j = 0; j < V; ++j) {
          const double x = gxi[j];
          mg += wn[j] * static_cast<double>(gi[j]);
          mt += wn[j] * static_cast<double>(gti[j]);
          mx += wn[j] * x;
          a += cc[j] * x;
        }
        const double e = pe[i * es], rx = prx[i];
        // Pass 2: micro = eps^2 g_t + eps (v g_x - a) + v rho_x + g.
        for (int64_t j = 0; j < V; ++j) {
          const double gj = static_cast<double>(gi[j]) - mg, gtj = static_cast<double>(gti[j]) - mt,
                       gxj = static_cast<double>(gxi[j]) - mx;
          og[i * V + j] = static_cast<scalar_t>(gj);
          om[i * V + j] = static_cast<scalar_t>(e * e * gtj + e * (vv[j] * gxj - a) + vv[j] * rx + gj);
        }
        oc[i] = static_cast<scalar_t>(static_cast<double>(prt[i]) + a);
      }
    });
  });
  return {g, micro, macro};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> transport_mm_residuals_backward_cpu(
    const at::Tensor& gg_, const at::Tensor& gm_, const at::Tensor& gc_, const at::Tensor& Gt_,
    const at::Tensor& Gx_, const at::Tensor& v, const at::Tensor& w, const at::Tensor& eps_) {
  const int64_t es = check_transport_backward(gg_, gm_, gc_, Gt_, Gx_, v, w, eps_);
  const at::Tensor gg = gg_.contiguous(), gm = gm_.contiguous(), gc = gc_.contiguous(), Gt = Gt_.contiguous(),
                   Gx = Gx_.contiguous(), eps = eps_.contiguous();
  const int64_t N = Gt.size(0), V = Gt.size(1);
  const TransportConsts tc(v, w);
  const auto opt = Gt.options();
  at::Tensor dG = at::empty({N, V}, opt), dGt = at::empty({N, V}, opt), dGx = at::empty({N, V}, opt);
  at::Tensor drho_x = at::empty({N}, opt), deps = at::empty({N}, opt);
  AT_DISPATCH_FLOATING_TYPES(Gt.scalar_type(), "transport_mm_residuals_backward_cpu", [&] {
    const scalar_t *pgg = gg.const_data_ptr<scalar_t>(), *pgm = gm.const_data_ptr<scalar_t>(),
                   *pgc = gc.const_data_ptr<scalar_t>(), *pgt = Gt.const_data_ptr<scalar_t>(),
                   *pgx = Gx.const_data_ptr<scalar_t>(), *pe = eps.const_data_ptr<scalar_t>();
    scalar_t *odG = dG.mutable_data_ptr<scalar_t>(), *odGt = dGt.mutable_data_ptr<scalar_t>(),
             *odGx = dGx.mutable_data_ptr<scalar_t>(), *orx = drho_x.mutable_data_ptr<scalar_t>(),
             *oe = deps.mutable_data_ptr<scalar_t>();
    const double *vv = tc.v.data(), *wn = tc.wn.data(), *cc = tc.c.data();
    const double vbar = tc.vbar;
    at::parallel_for(0, N, row_grain(V), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t o = i * V;
        // Pass 1: sums of the incoming gradients and the forward averages needed for deps.
        double Sgm = 0, Sm = 0, Svm = 0, mt = 0, mx = 0, a = 0;
        for (int64_t j = 0; j < V; ++j) {
          const double m = pgm[o + j], x = pgx[o + j];
          Sgm += static_cast<double>(pgg[o + j]) + m;
          Sm += m;
          Svm += vv[j] * m;
          mt += wn[j] * static_cast<double>(pgt[o + j]);
          mx += wn[j] * x;
          a += cc[j] * x;
        }
        const double e = pe[i * es], C = pgc[i];
        // With P phi = phi - <phi> (adjoint P^T psi = psi - (w/W) sum psi):
        //   dGraw   = P^T (grad_g + grad_micro)
        //   dGraw_t = eps^2 P^T grad_micro
        //   dGraw_x = P^T q,  q_j = eps v_j Gm_j + (C - eps Sm) w_j v_j / W   (a = sum_j (w_j v_j/W) g_x,j)
        //   sum_j q_j = eps Svm + (C - eps Sm) vbar
        const double B = C - e * Sm, Q = e * Svm + B * vbar;
        double de = 0;
        for (int64_t j = 0; j < V; ++j) {
          const double m = pgm[o + j], vj = vv[j];
          odG[o + j] = static_cast<scalar_t>(static_cast<double>(pgg[o + j]) + m - wn[j] * Sgm);
          odGt[o + j] = static_cast<scalar_t>(e * e * (m - wn[j] * Sm));
          odGx[o + j] = static_cast<scalar_t>(e * vj * m + wn[j] * (B * vj - Q));
          // d micro_j / d eps = 2 eps g_t,j + v_j g_x,j - a
          de += m * (2.0 * e * (static_cast<double>(pgt[o + j]) - mt) + vj * (static_cast<double>(pgx[o + j]) - mx) - a);
        }
        orx[i] = static_cast<scalar_t>(Svm);
        oe[i] = static_cast<scalar_t>(de);
      }
    });
  });
  return {dG, dGt, dGx, drho_x, deps};
}

}  // namespace

TORCH_LIBRARY_IMPL(hrgrad_ext, CPU, m) {
  m.impl("velocity_moments", &velocity_moments_cpu);
  m.impl("velocity_moments_backward", &velocity_moments_backward_cpu);
  m.impl("maxwellian", &maxwellian_cpu);
  m.impl("maxwellian_backward", &maxwellian_backward_cpu);
  m.impl("bgk_residuals", &bgk_residuals_cpu);
  m.impl("bgk_residuals_backward", &bgk_residuals_backward_cpu);
  m.impl("transport_mm_residuals", &transport_mm_residuals_cpu);
  m.impl("transport_mm_residuals_backward", &transport_mm_residuals_backward_cpu);
}

}  // namespace kinetic
}  // namespace hrgrad_ext
