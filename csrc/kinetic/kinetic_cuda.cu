// CUDA kernels of the kinetic family (same ops and validation as kinetic_cpu.cpp).
//
// Layout: a row of V velocity nodes is served by L lanes, a segment of a warp; a warp serves
// 32 / L rows side by side, a block kThreads / L rows, the grid covers the rows. L is chosen
// at launch from V (with_lanes) so that every lane has about kPer = 4 nodes of its row:
//   V <= 16: L = 4    V <= 32: L = 8    V <= 64: L = 16    otherwise L = 32.
// One warp per row (L = 32 for every V, as before) left half the lanes idle at V = 16, and
// at V = 30 / 64 it paid 5 shuffle levels per row sum for 1 / 2 nodes per lane: the
// row-sum reductions (six of them in bgk_residuals) cost more than the arithmetic. With
// L = 8 at V = 30 (16 at V = 64) a lane does 4 nodes and 3 (4) shuffle levels, every lane is
// busy for V in [16, 128] except the tail of the last node group (V = 30: 30 of 32 slots,
// V = 100: 100 of 128), and the loads of a lane's 4 nodes are independent (in flight
// together). A lane handles the nodes j = sub, sub + L, ... (sub: its lane in the segment), so
// a warp's loads still cover 32 / L whole consecutive rows. Row sums are butterfly shuffles
// within the segment (row_sum<L>): every lane of the segment ends with the total, no shared
// memory or __syncthreads. Sums are accumulated in acc_t (float for float32, double for
// float64): a row has at most a few hundred terms.
//
// Kernels whose outputs need a row sum before the element-wise results (transport forward and
// backward, velocity moments) keep the row's values in registers between the two phases when
// V <= kPer * L (template parameter PER = kPer); for V > 128 (PER = 0) they re-read the row
// from global memory (served by L1/L2), so every V works.
//
// A warp whose first row is past N leaves at once (the whole warp together); in the last warp,
// segments past N redo the last row (reads stay in bounds, every lane takes part in the
// shuffles) and store nothing.

#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/cuda_kernel.h"
#include "kinetic/kinetic_common.h"

namespace hrgrad_ext {
namespace kinetic {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kPer = 4;  // nodes per lane the lane count is chosen for
constexpr double kInvSqrt2PiD = 0.39894228040143267794;
using cuda::launch;

// exp of a Maxwellian's exponent. Below -746 (double) / -104 (float) exp rounds to 0 anyway;
// clamped there, ptxas drops exp's out-of-range path, a call whose saved register was the one
// spill of maxwellian_backward_kernel<double> on sm_90. NaN passes through (fmax would drop it).
__device__ __forceinline__ double gauss_exp(double x) { return x != x ? x : exp(fmax(x, -746.0)); }
__device__ __forceinline__ float gauss_exp(float x) { return x != x ? x : expf(fmaxf(x, -104.0f)); }
__device__ __forceinline__ float drsqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ double drsqrt(double x) { return rsqrt(x); }

// Sum over the L lanes of a row's segment; every lane of the segment gets it. Lane masks
// below L never leave the (L-aligned) segment. All 32 lanes of the warp take part.
template <int L, typename T>
__device__ __forceinline__ T row_sum(T x) {
#pragma unroll
  for (int o = L / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o, L);
  return x;
}

// row_sum of each argument, in place.
template <int L, typename... T>
__device__ __forceinline__ void row_sums(T&... x) {
  ((x = row_sum<L>(x)), ...);
}

// The row a lane serves: `i` (clamped to N - 1 for the segments of the last warp that are past
// N), whether it is a real row (`live`: stores only then), and the lane's index in its segment.
struct RowLane {
  int64_t i;
  bool live;
  int sub;
};

// false: the whole warp is past N and leaves (warp-uniform, so the shuffles stay valid).
template <int L>
__device__ __forceinline__ bool row_lane(int64_t N, RowLane& out) {
  const int64_t warp_first = static_cast<int64_t>(blockIdx.x) * (kThreads / L) + (threadIdx.x / kWarp) * (kWarp / L);
  if (warp_first >= N) return false;
  const int64_t row = warp_first + (threadIdx.x % kWarp) / L;
  out.live = row < N;
  out.i = out.live ? row : N - 1;
  out.sub = threadIdx.x % L;
  return true;
}

// Blocks of kThreads / L rows covering N rows.
inline unsigned row_blocks(int64_t N, int L) {
  const int64_t rows_per_block = kThreads / L;
  const int64_t blocks = (N + rows_per_block - 1) / rows_per_block;
  HRGRAD_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "kinetic op: ", N, " rows exceed the CUDA grid (",
              std::numeric_limits<int32_t>::max(), " blocks of ", rows_per_block, " rows)");
  return static_cast<unsigned>(blocks);
}

// Calls f(std::integral_constant<int, L>) with the lanes per row for V (see the top).
template <typename F>
void with_lanes(int64_t V, F&& f) {
  if (V <= 4 * kPer) f(std::integral_constant<int, 4>{});
  else if (V <= 8 * kPer) f(std::integral_constant<int, 8>{});
  else if (V <= 16 * kPer) f(std::integral_constant<int, 16>{});
  else f(std::integral_constant<int, 32>{});
}

// Calls f(L, PER) for the kernels that keep a row in registers: PER = kPer values per lane
// when V <= kPer * L, 0 (re-read from memory) above.
template <typename F>
void with_lanes_per(int64_t V, F&& f) {
  with_lanes(V, [&](auto lanes) {
    constexpr int L = decltype(lanes)::value;
    if (V <= kPer * L) {
      f(lanes, std::integral_constant<int, kPer>{});
    } else if constexpr (L == kWarp) {
      f(lanes, std::integral_constant<int, 0>{});
    } else {
      HRGRAD_CHECK(false, "internal error: with_lanes chose ", L, " lanes for V = ", V);
    }
  });
}

template <int L, int PER>
__device__ __forceinline__ int lane_iters(int V) {
  return PER > 0 ? PER : (V + L - 1) / L;
}

// ---- velocity_moments ---------------------------------------------------------------------

template <typename scalar_t, typename acc_t, int L, int PER>
__global__ void __launch_bounds__(kThreads) velocity_moments_kernel(const scalar_t* __restrict__ F,
                                                                    const scalar_t* __restrict__ v,
                                                                    const scalar_t* __restrict__ w, int64_t N, int V,
                                                                    int K, scalar_t* __restrict__ out) {
  RowLane row;
  if (!row_lane<L>(N, row)) return;
  const int64_t i = row.i;
  const int lane = row.sub;
  const scalar_t* f = F + i * V;
  const int iters = lane_iters<L, PER>(V);
  acc_t wf[PER > 0 ? PER : 1], vj[PER > 0 ? PER : 1], pw[PER > 0 ? PER : 1];
  if constexpr (PER > 0) {
#pragma unroll
    for (int t = 0; t < PER; ++t) {
      const int j = lane + L * t;
      const bool in = j < V;
      wf[t] = in ? static_cast<acc_t>(w[j]) * static_cast<acc_t>(f[j]) : acc_t(0);
      vj[t] = in ? static_cast<acc_t>(v[j]) : acc_t(0);
      pw[t] = acc_t(1);
    }
  }
  for (int k = 0; k < K; ++k) {
    acc_t s = 0;
    if constexpr (PER > 0) {
#pragma unroll
      for (int t = 0; t < PER; ++t) {
        s += wf[t] * pw[t];
        pw[t] *= vj[t];
      }
    } else {
      for (int t = 0; t < iters; ++t) {
        const int j = lane + L * t;
        if (j < V) {
          acc_t p = static_cast<acc_t>(w[j]) * static_cast<acc_t>(f[j]);
          const acc_t x = static_cast<acc_t>(v[j]);
          for (int q = 0; q < k; ++q) p *= x;
          s += p;
        }
      }
    }
    s = row_sum<L>(s);
    if (row.live && lane == 0) out[i * K + k] = static_cast<scalar_t>(s);
  }
}

// Element-wise: dF_ij = w_j sum_k g_ik v_j^k (Horner). The row layout of the reductions (no
// 64-bit division of a flat index per element); the segment's lanes stride over the nodes.
template <typename scalar_t, typename acc_t, int L>
__global__ void __launch_bounds__(kThreads) velocity_moments_backward_kernel(
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ v, const scalar_t* __restrict__ w, int64_t N, int V,
    int K, scalar_t* __restrict__ dF) {
  RowLane row;
  if (!row_lane<L>(N, row) || !row.live) return;  // no shuffles: segments past N leave too
  const int64_t i = row.i;
  const scalar_t* gi = g + i * K;
  for (int j = row.sub; j < V; j += L) {
    const acc_t x = static_cast<acc_t>(v[j]);
    acc_t s = static_cast<acc_t>(gi[K - 1]);
    for (int k = K - 2; k >= 0; --k) s = s * x + static_cast<acc_t>(gi[k]);
    dF[i * V + j] = static_cast<scalar_t>(static_cast<acc_t>(w[j]) * s);
  }
}

Tensor velocity_moments_cuda(const Tensor& F_, const Tensor& v_, const Tensor& w_, int64_t order) {
  check_velocity_moments(F_, v_, w_, order);
  const cuda::DeviceGuard guard(F_.get_device_index());
  const Tensor F = make_contiguous(F_), v = make_contiguous(v_), w = make_contiguous(w_);
  const int64_t N = F.size(0), V = F.size(1), K = order + 1;
  Tensor out = empty_on(F, {N, K});
  if (N == 0) return out;
  HRGRAD_DISPATCH_FLOATING(F.scalar_type(), "velocity_moments_cuda", [&] {
    using acc_t = scalar_t;
    with_lanes_per(V, [&](auto lanes, auto per) {
      constexpr int L = decltype(lanes)::value;
      launch<velocity_moments_kernel<scalar_t, acc_t, L, decltype(per)::value>>({row_blocks(N, L), kThreads},
          F.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), N,
          static_cast<int>(V), static_cast<int>(K), out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

Tensor velocity_moments_backward_cuda(const Tensor& grad_, const Tensor& v_, const Tensor& w_) {
  check_velocity_moments_backward(grad_, v_, w_);
  const cuda::DeviceGuard guard(grad_.get_device_index());
  const Tensor grad = make_contiguous(grad_), v = make_contiguous(v_), w = make_contiguous(w_);
  const int64_t N = grad.size(0), K = grad.size(1), V = v.size(0);
  Tensor dF = empty_on(grad, {N, V});
  if (N == 0) return dF;
  HRGRAD_DISPATCH_FLOATING(grad.scalar_type(), "velocity_moments_backward_cuda", [&] {
    with_lanes(V, [&](auto lanes) {
      constexpr int L = decltype(lanes)::value;
      launch<velocity_moments_backward_kernel<scalar_t, scalar_t, L>>({row_blocks(N, L), kThreads},
          grad.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), N,
          static_cast<int>(V), static_cast<int>(K), dF.mutable_data_ptr<scalar_t>());
    });
  });
  return dF;
}

// ---- maxwellian ---------------------------------------------------------------------------

// The row layout (see velocity_moments_backward_kernel): the row's rho, u, T are read once per lane.
template <typename scalar_t, typename acc_t, int L>
__global__ void __launch_bounds__(kThreads) maxwellian_kernel(const scalar_t* __restrict__ rho,
                                                              const scalar_t* __restrict__ u,
                                                              const scalar_t* __restrict__ T,
                                                              const scalar_t* __restrict__ v, int64_t N, int V,
                                                              scalar_t* __restrict__ M) {
  RowLane row;
  if (!row_lane<L>(N, row) || !row.live) return;  // no shuffles: segments past N leave too
  const int64_t i = row.i;
  const acc_t TT = T[i], uu = u[i], coef = static_cast<acc_t>(rho[i]) * acc_t(kInvSqrt2PiD) * drsqrt(TT);
  const acc_t inv2T = acc_t(0.5) / TT;
  for (int j = row.sub; j < V; j += L) {
    const acc_t d = static_cast<acc_t>(v[j]) - uu;
    M[i * V + j] = static_cast<scalar_t>(coef * gauss_exp(-d * d * inv2T));
  }
}

template <typename scalar_t, typename acc_t, int L>
__global__ void __launch_bounds__(kThreads) maxwellian_backward_kernel(
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ rho, const scalar_t* __restrict__ u,
    const scalar_t* __restrict__ T, const scalar_t* __restrict__ v, int64_t N, int V, scalar_t* __restrict__ drho,
    scalar_t* __restrict__ du, scalar_t* __restrict__ dT) {
  RowLane row;
  if (!row_lane<L>(N, row)) return;
  const int64_t i = row.i;
  const int lane = row.sub;
  const acc_t r = rho[i], uu = u[i], TT = T[i];
  const acc_t c = acc_t(kInvSqrt2PiD) * drsqrt(TT), inv2T = acc_t(0.5) / TT;
  acc_t s0 = 0, s1 = 0, s2 = 0;
  for (int j = lane; j < V; j += L) {
    const acc_t d = static_cast<acc_t>(v[j]) - uu;
    const acc_t gm0 = static_cast<acc_t>(g[i * V + j]) * c * gauss_exp(-d * d * inv2T);
    s0 += gm0;
    s1 += gm0 * d;
    s2 += gm0 * (d * d - TT);
  }
  row_sums<L>(s0, s1, s2);
  if (row.live && lane == 0) {
    drho[i] = static_cast<scalar_t>(s0);
    du[i] = static_cast<scalar_t>(r * s1 / TT);
    dT[i] = static_cast<scalar_t>(r * s2 * inv2T / TT);
  }
}

Tensor maxwellian_cuda(const Tensor& rho_, const Tensor& u_, const Tensor& T_, const Tensor& v_) {
  check_maxwellian("maxwellian", rho_, u_, T_, v_);
  const cuda::DeviceGuard guard(rho_.get_device_index());
  const Tensor rho = make_contiguous(rho_), u = make_contiguous(u_), T = make_contiguous(T_), v = make_contiguous(v_);
  const int64_t N = rho.size(0), V = v.size(0);
  Tensor M = empty_on(rho, {N, V});
  if (N == 0) return M;
  HRGRAD_DISPATCH_FLOATING(rho.scalar_type(), "maxwellian_cuda", [&] {
    with_lanes(V, [&](auto lanes) {
      constexpr int L = decltype(lanes)::value;
      launch<maxwellian_kernel<scalar_t, scalar_t, L>>({row_blocks(N, L), kThreads},
          rho.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), T.const_data_ptr<scalar_t>(),
          v.const_data_ptr<scalar_t>(), N, static_cast<int>(V), M.mutable_data_ptr<scalar_t>());
    });
  });
  return M;
}

std::tuple<Tensor, Tensor, Tensor> maxwellian_backward_cuda(const Tensor& grad_, const Tensor& rho_,
                                                                        const Tensor& u_, const Tensor& T_,
                                                                        const Tensor& v_) {
  check_maxwellian_backward(grad_, rho_, u_, T_, v_);
  const cuda::DeviceGuard guard(rho_.get_device_index());
  const Tensor grad = make_contiguous(grad_), rho = make_contiguous(rho_), u = make_contiguous(u_), T = make_contiguous(T_),
                   v = make_contiguous(v_);
  const int64_t N = rho.size(0), V = v.size(0);
  Tensor drho = empty_on(rho, {N}), du = empty_on(rho, {N}),
             dT = empty_on(rho, {N});
  if (N == 0) return {drho, du, dT};
  HRGRAD_DISPATCH_FLOATING(rho.scalar_type(), "maxwellian_backward_cuda", [&] {
    with_lanes(V, [&](auto lanes) {
      constexpr int L = decltype(lanes)::value;
      launch<maxwellian_backward_kernel<scalar_t, scalar_t, L>>({row_blocks(N, L), kThreads},
          grad.const_data_ptr<scalar_t>(), rho.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
          T.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), N, static_cast<int>(V),
          drho.mutable_data_ptr<scalar_t>(), du.mutable_data_ptr<scalar_t>(), dT.mutable_data_ptr<scalar_t>());
    });
  });
  return {drho, du, dT};
}

// ---- bgk_residuals ------------------------------------------------------------------------

template <typename scalar_t>
struct BgkRows {
  const scalar_t *rho, *u, *T, *rho_t, *u_t, *T_t, *kn;
  int64_t kn_stride;
};

// Single pass: the kinetic residual is element-wise and the six velocity sums only feed the
// per-row outputs, so nothing has to be kept between phases.
// SQ (bgk_residuals_sq): `kin` is [N] and gets the row sum of the squared residual, summed in
// double whatever acc_t (the loss form's contract), instead of the [N, V] residual.
template <typename scalar_t, typename acc_t, int L, bool SQ>
__global__ void __launch_bounds__(kThreads) bgk_forward_kernel(
    const scalar_t* __restrict__ F, const scalar_t* __restrict__ Ft, const scalar_t* __restrict__ Fx,
    BgkRows<scalar_t> p, const scalar_t* __restrict__ v, const scalar_t* __restrict__ w, int64_t N, int V,
    scalar_t* __restrict__ kin, scalar_t* __restrict__ cons, scalar_t* __restrict__ consis) {
  RowLane row;
  if (!row_lane<L>(N, row)) return;
  const int64_t i = row.i;
  const int lane = row.sub;
  const acc_t r = p.rho[i], uu = p.u[i], TT = p.T[i], k = p.kn[i * p.kn_stride];
  const acc_t coef = r * acc_t(kInvSqrt2PiD) * drsqrt(TT), inv2T = acc_t(0.5) / TT;
  const int64_t o = i * V;
  acc_t sF0 = 0, sF1 = 0, sF2 = 0, sX1 = 0, sX2 = 0, sX3 = 0;
  double sq = 0;
  for (int j = lane; j < V; j += L) {
    const acc_t vj = v[j], wj = w[j], fj = F[o + j], ftj = Ft[o + j], fxj = Fx[o + j];
    const acc_t d = vj - uu;
    const acc_t M = coef * gauss_exp(-d * d * inv2T);
    if constexpr (SQ) {
      const acc_t kj = k * (ftj + vj * fxj) - (M - fj);
      sq += static_cast<double>(kj) * static_cast<double>(kj);
    } else {
      if (row.live) kin[o + j] = static_cast<scalar_t>(k * (ftj + vj * fxj) - (M - fj));
    }
    const acc_t wf = wj * fj, wx = wj * vj * fxj;
    sF0 += wf;
    sF1 += wf * vj;
    sF2 += wf * vj * vj;
    sX1 += wx;
    sX2 += wx * vj;
    sX3 += wx * vj * vj;
  }
  row_sums<L>(sF0, sF1, sF2, sX1, sX2, sX3);
  if constexpr (SQ) sq = row_sum<L>(sq);
  if (row.live && lane == 0) {
    if constexpr (SQ) kin[i] = static_cast<scalar_t>(sq);
    const acc_t rt = p.rho_t[i], ut = p.u_t[i], Tt = p.T_t[i];
    const acc_t q = uu * uu + TT;
    cons[3 * i + 0] = static_cast<scalar_t>(rt + sX1);
    cons[3 * i + 1] = static_cast<scalar_t>(rt * uu + r * ut + sX2);
    cons[3 * i + 2] = static_cast<scalar_t>(acc_t(0.5) * rt * q + acc_t(0.5) * r * (acc_t(2) * uu * ut + Tt) +
                                            acc_t(0.5) * sX3);
    consis[3 * i + 0] = static_cast<scalar_t>(r - sF0);
    consis[3 * i + 1] = static_cast<scalar_t>(r * uu - sF1);
    consis[3 * i + 2] = static_cast<scalar_t>(acc_t(0.5) * r * q - acc_t(0.5) * sF2);
  }
}

template <typename scalar_t>
struct BgkGradRows {
  scalar_t *rho, *u, *T, *rho_t, *u_t, *T_t, *kn;
};

// SQ (bgk_residuals_sq_backward): gK is grad_kinetic_sq [N], and the incoming gradient of the
// residual, 2 gK_i kin_ij, is formed here from kin recomputed from F, Ft, Fx and the row's
// Maxwellian (whose exp the gradient sums need anyway). F is read only then (nullptr otherwise).
template <typename scalar_t, typename acc_t, int L, bool SQ>
__global__ void __launch_bounds__(kThreads) bgk_backward_kernel(
    const scalar_t* __restrict__ gK, const scalar_t* __restrict__ gC, const scalar_t* __restrict__ gS,
    const scalar_t* __restrict__ F, const scalar_t* __restrict__ Ft, const scalar_t* __restrict__ Fx,
    BgkRows<scalar_t> p, const scalar_t* __restrict__ v, const scalar_t* __restrict__ w, int64_t N, int V,
    scalar_t* __restrict__ dF, scalar_t* __restrict__ dFt, scalar_t* __restrict__ dFx, BgkGradRows<scalar_t> out) {
  RowLane row;
  if (!row_lane<L>(N, row)) return;
  const int64_t i = row.i;
  const int lane = row.sub;
  const acc_t uu = p.u[i], TT = p.T[i], k = p.kn[i * p.kn_stride];
  const acc_t c0 = gC[3 * i], c1 = gC[3 * i + 1], c2 = gC[3 * i + 2];
  const acc_t s0 = gS[3 * i], s1 = gS[3 * i + 1], s2 = gS[3 * i + 2];
  const acc_t cm = acc_t(kInvSqrt2PiD) * drsqrt(TT), inv2T = acc_t(0.5) / TT;
  const acc_t q2 = SQ ? acc_t(2) * static_cast<acc_t>(gK[i]) : acc_t(0);
  const int64_t o = i * V;
  acc_t skn = 0, sm0 = 0, sm1 = 0, sm2 = 0;
  for (int j = lane; j < V; j += L) {
    const acc_t vj = v[j], wj = w[j];
    const acc_t et = static_cast<acc_t>(Ft[o + j]) + vj * static_cast<acc_t>(Fx[o + j]);  // Ft + v Fx
    const acc_t d = vj - uu;
    const acc_t m0 = cm * gauss_exp(-d * d * inv2T);  // M / rho
    acc_t g;
    if constexpr (SQ) {
      // rho read here rather than hoisted for both variants: hoisted, it cost the residual
      // op's double instances 4 registers
      g = q2 * (k * et - (static_cast<acc_t>(p.rho[i]) * m0 - static_cast<acc_t>(F[o + j])));
    } else {
      g = gK[o + j];
    }
    if (row.live) {
      dF[o + j] = static_cast<scalar_t>(g - wj * (s0 + vj * (s1 + acc_t(0.5) * vj * s2)));
      dFt[o + j] = static_cast<scalar_t>(k * g);
      dFx[o + j] = static_cast<scalar_t>(k * vj * g + wj * vj * (c0 + vj * (c1 + acc_t(0.5) * vj * c2)));
    }
    skn += g * et;
    const acc_t gm0 = g * m0;  // g * M / rho
    sm0 += gm0;
    sm1 += gm0 * d;
    sm2 += gm0 * (d * d - TT);
  }
  row_sums<L>(skn, sm0, sm1, sm2);
  if (row.live && lane == 0) {
    const acc_t r = p.rho[i], rt = p.rho_t[i], ut = p.u_t[i], Tt = p.T_t[i];
    const acc_t q = uu * uu + TT, h = acc_t(0.5);
    out.rho[i] = static_cast<scalar_t>(-sm0 + c1 * ut + c2 * (uu * ut + h * Tt) + s0 + s1 * uu + h * s2 * q);
    out.u[i] = static_cast<scalar_t>(-r * sm1 / TT + c1 * rt + c2 * (rt * uu + r * ut) + s1 * r + s2 * r * uu);
    out.T[i] = static_cast<scalar_t>(-r * sm2 * inv2T / TT + h * c2 * rt + h * s2 * r);
    out.rho_t[i] = static_cast<scalar_t>(c0 + c1 * uu + h * c2 * q);
    out.u_t[i] = static_cast<scalar_t>(c1 * r + c2 * r * uu);
    out.T_t[i] = static_cast<scalar_t>(h * c2 * r);
    out.kn[i] = static_cast<scalar_t>(skn);
  }
}

template <typename scalar_t>
BgkRows<scalar_t> bgk_rows(const Tensor& rho, const Tensor& u, const Tensor& T, const Tensor& rho_t,
                           const Tensor& u_t, const Tensor& T_t, const Tensor& kn, int64_t ks) {
  return {rho.const_data_ptr<scalar_t>(),   u.const_data_ptr<scalar_t>(),   T.const_data_ptr<scalar_t>(),
          rho_t.const_data_ptr<scalar_t>(), u_t.const_data_ptr<scalar_t>(), T_t.const_data_ptr<scalar_t>(),
          kn.const_data_ptr<scalar_t>(),    ks};
}

// bgk_residuals (SQ = false: kin [N, V]) and its loss form bgk_residuals_sq (SQ = true: kin
// [N], the row sums of squares).
template <bool SQ>
std::tuple<Tensor, Tensor, Tensor> bgk_residuals_cuda(const Tensor& F_, const Tensor& Ft_, const Tensor& Fx_,
                                                      const Tensor& rho_, const Tensor& u_, const Tensor& T_,
                                                      const Tensor& rho_t_, const Tensor& u_t_, const Tensor& T_t_,
                                                      const Tensor& v_, const Tensor& w_, const Tensor& kn_) {
  const int64_t ks = SQ ? check_bgk_sq(F_, Ft_, Fx_, rho_, u_, T_, rho_t_, u_t_, T_t_, v_, w_, kn_)
                        : check_bgk(F_, Ft_, Fx_, rho_, u_, T_, rho_t_, u_t_, T_t_, v_, w_, kn_);
  const cuda::DeviceGuard guard(F_.get_device_index());
  const Tensor F = make_contiguous(F_), Ft = make_contiguous(Ft_), Fx = make_contiguous(Fx_), rho = make_contiguous(rho_),
                   u = make_contiguous(u_), T = make_contiguous(T_), rho_t = make_contiguous(rho_t_),
                   u_t = make_contiguous(u_t_), T_t = make_contiguous(T_t_), v = make_contiguous(v_), w = make_contiguous(w_),
                   kn = make_contiguous(kn_);
  const int64_t N = F.size(0), V = F.size(1);
  Tensor kin = SQ ? empty_on(F, {N}) : empty_on(F, {N, V}), cons = empty_on(F, {N, 3}),
             consis = empty_on(F, {N, 3});
  if (N == 0) return {kin, cons, consis};
  HRGRAD_DISPATCH_FLOATING(F.scalar_type(), "bgk_residuals_cuda", [&] {
    with_lanes(V, [&](auto lanes) {
      constexpr int L = decltype(lanes)::value;
      launch<bgk_forward_kernel<scalar_t, scalar_t, L, SQ>>({row_blocks(N, L), kThreads},
          F.const_data_ptr<scalar_t>(), Ft.const_data_ptr<scalar_t>(), Fx.const_data_ptr<scalar_t>(),
          bgk_rows<scalar_t>(rho, u, T, rho_t, u_t, T_t, kn, ks), v.const_data_ptr<scalar_t>(),
          w.const_data_ptr<scalar_t>(), N, static_cast<int>(V), kin.mutable_data_ptr<scalar_t>(),
          cons.mutable_data_ptr<scalar_t>(), consis.mutable_data_ptr<scalar_t>());
    });
  });
  return {kin, cons, consis};
}

using BgkGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The residual op's backward (SQ = false: gK [N, V], F unused) and the loss form's (SQ = true:
// gK = grad_kinetic_sq [N], kin recomputed from F).
template <bool SQ>
BgkGrads bgk_backward_cuda(int64_t ks, const Tensor& gK_, const Tensor& gC_, const Tensor& gS_, const Tensor& F_,
                           const Tensor& Ft_, const Tensor& Fx_, const Tensor& rho_, const Tensor& u_, const Tensor& T_,
                           const Tensor& rho_t_, const Tensor& u_t_, const Tensor& T_t_, const Tensor& v_,
                           const Tensor& w_, const Tensor& kn_) {
  const cuda::DeviceGuard guard(Ft_.get_device_index());
  const Tensor gK = make_contiguous(gK_), gC = make_contiguous(gC_), gS = make_contiguous(gS_), Ft = make_contiguous(Ft_),
                   Fx = make_contiguous(Fx_), rho = make_contiguous(rho_), u = make_contiguous(u_), T = make_contiguous(T_),
                   rho_t = make_contiguous(rho_t_), u_t = make_contiguous(u_t_), T_t = make_contiguous(T_t_),
                   v = make_contiguous(v_), w = make_contiguous(w_), kn = make_contiguous(kn_);
  const Tensor F = SQ ? make_contiguous(F_) : F_;
  const int64_t N = Ft.size(0), V = Ft.size(1);
  const Tensor& opt = Ft;  // outputs: Ft's dtype and device
  Tensor dF = empty_on(opt, {N, V}), dFt = empty_on(opt, {N, V}), dFx = empty_on(opt, {N, V});
  Tensor r[7];
  for (auto& t : r) t = empty_on(opt, {N});
  if (N > 0) {
    HRGRAD_DISPATCH_FLOATING(Ft.scalar_type(), "bgk_residuals_backward_cuda", [&] {
      BgkGradRows<scalar_t> out{r[0].mutable_data_ptr<scalar_t>(), r[1].mutable_data_ptr<scalar_t>(),
                                r[2].mutable_data_ptr<scalar_t>(), r[3].mutable_data_ptr<scalar_t>(),
                                r[4].mutable_data_ptr<scalar_t>(), r[5].mutable_data_ptr<scalar_t>(),
                                r[6].mutable_data_ptr<scalar_t>()};
      with_lanes(V, [&](auto lanes) {
        constexpr int L = decltype(lanes)::value;
        launch<bgk_backward_kernel<scalar_t, scalar_t, L, SQ>>({row_blocks(N, L), kThreads},
            gK.const_data_ptr<scalar_t>(), gC.const_data_ptr<scalar_t>(), gS.const_data_ptr<scalar_t>(),
            SQ ? F.const_data_ptr<scalar_t>() : nullptr, Ft.const_data_ptr<scalar_t>(), Fx.const_data_ptr<scalar_t>(),
            bgk_rows<scalar_t>(rho, u, T, rho_t, u_t, T_t, kn, ks), v.const_data_ptr<scalar_t>(),
            w.const_data_ptr<scalar_t>(), N, static_cast<int>(V), dF.mutable_data_ptr<scalar_t>(),
            dFt.mutable_data_ptr<scalar_t>(), dFx.mutable_data_ptr<scalar_t>(), out);
      });
    });
  }
  return {dF, dFt, dFx, r[0], r[1], r[2], r[3], r[4], r[5], r[6]};
}

BgkGrads bgk_residuals_backward_cuda(const Tensor& gK, const Tensor& gC, const Tensor& gS, const Tensor& Ft,
                                     const Tensor& Fx, const Tensor& rho, const Tensor& u, const Tensor& T,
                                     const Tensor& rho_t, const Tensor& u_t, const Tensor& T_t, const Tensor& v,
                                     const Tensor& w, const Tensor& kn) {
  const int64_t ks = check_bgk_backward(gK, gC, gS, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn);
  return bgk_backward_cuda<false>(ks, gK, gC, gS, /*F: unused*/ Ft, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn);
}

BgkGrads bgk_residuals_sq_backward_cuda(const Tensor& gQ, const Tensor& gC, const Tensor& gS, const Tensor& F,
                                        const Tensor& Ft, const Tensor& Fx, const Tensor& rho, const Tensor& u,
                                        const Tensor& T, const Tensor& rho_t, const Tensor& u_t, const Tensor& T_t,
                                        const Tensor& v, const Tensor& w, const Tensor& kn) {
  const int64_t ks = check_bgk_sq_backward(gQ, gC, gS, F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn);
  return bgk_backward_cuda<true>(ks, gQ, gC, gS, F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn);
}

// ---- transport_mm_residuals ---------------------------------------------------------------
// Per-row-segment constants of the normalised average (see kinetic_cpu.cpp): W = sum w, vbar = <v>;
// <v g_x> = sum_j w_j (v_j - vbar) Graw_x,j / W. Each segment recomputes W and vbar from v and w
// (two extra reductions of data it reads anyway) instead of a separate kernel launch.

// SQ (transport_mm_residuals_sq): `micro` is [N] and gets the row sum of the squared micro
// residual, summed in double whatever acc_t; g_out is not written (nullptr).
template <typename scalar_t, typename acc_t, int L, int PER, bool SQ>
__global__ void __launch_bounds__(kThreads) transport_forward_kernel(
    const scalar_t* __restrict__ G, const scalar_t* __restrict__ Gt, const scalar_t* __restrict__ Gx,
    const scalar_t* __restrict__ rho_t, const scalar_t* __restrict__ rho_x, const scalar_t* __restrict__ v,
    const scalar_t* __restrict__ w, const scalar_t* __restrict__ eps, int64_t eps_stride, int64_t N, int V,
    scalar_t* __restrict__ g_out, scalar_t* __restrict__ micro, scalar_t* __restrict__ macro) {
  RowLane row;
  if (!row_lane<L>(N, row)) return;
  const int64_t i = row.i;
  const int lane = row.sub;
  const int64_t o = i * V;
  const int iters = lane_iters<L, PER>(V);
  constexpr int R = PER > 0 ? PER : 1;
  acc_t rg[R], rt[R], rx[R];
  // Phase 1: W = sum w, and the weighted sums of the three fields.
  acc_t W = 0, sg = 0, st = 0, sx = 0;
  for (int t = 0; t < iters; ++t) {
    const int j = lane + L * t;
    acc_t a_g = 0, a_t = 0, a_x = 0;
    if (j < V) {
      const acc_t wj = w[j];
      a_g = G[o + j];
      a_t = Gt[o + j];
      a_x = Gx[o + j];
      W += wj;
      sg += wj * a_g;
      st += wj * a_t;
      sx += wj * a_x;
    }
    if constexpr (PER > 0) {
      rg[t] = a_g;
      rt[t] = a_t;
      rx[t] = a_x;
    }
  }
  row_sums<L>(W, sg, st, sx);
  const acc_t invW = acc_t(1) / W, mg = sg * invW, mt = st * invW, mx = sx * invW;
  // a = <v g_x> from the centred g_x (one more reduction over the values in registers): the
  // one-pass form <v Graw_x> - <v><Graw_x> would cancel digits in float32 when the row mean
  // of Graw_x is large compared with its variation.
  acc_t a = 0;
  for (int t = 0; t < iters; ++t) {
    const int j = lane + L * t;
    if (j < V) {
      const acc_t x = PER > 0 ? rx[PER > 0 ? t : 0] : static_cast<acc_t>(Gx[o + j]);
      a += static_cast<acc_t>(w[j]) * static_cast<acc_t>(v[j]) * (x - mx);
    }
  }
  a = row_sum<L>(a) * invW;
  const acc_t e = eps[i * eps_stride], rxi = rho_x[i];
  double sq = 0;
  // Phase 2: element-wise outputs.
  for (int t = 0; t < iters; ++t) {
    const int j = lane + L * t;
    if (row.live && j < V) {  // segments past N store nothing
      acc_t gj, gtj, gxj;
      if constexpr (PER > 0) {
        gj = rg[t] - mg;
        gtj = rt[t] - mt;
        gxj = rx[t] - mx;
      } else {
        gj = static_cast<acc_t>(G[o + j]) - mg;
        gtj = static_cast<acc_t>(Gt[o + j]) - mt;
        gxj = static_cast<acc_t>(Gx[o + j]) - mx;
      }
      const acc_t vj = v[j];
      const acc_t mj = e * e * gtj + e * (vj * gxj - a) + vj * rxi + gj;
      if constexpr (SQ) {
        sq += static_cast<double>(mj) * static_cast<double>(mj);
      } else {
        g_out[o + j] = static_cast<scalar_t>(gj);
        micro[o + j] = static_cast<scalar_t>(mj);
      }
    }
  }
  if constexpr (SQ) sq = row_sum<L>(sq);
  if (row.live && lane == 0) {
    if constexpr (SQ) micro[i] = static_cast<scalar_t>(sq);
    macro[i] = static_cast<scalar_t>(static_cast<acc_t>(rho_t[i]) + a);
  }
}

// SQ (transport_mm_residuals_sq_backward): gm is grad_micro_sq [N] and there is no grad_g (gg
// unused, nullptr). The incoming gradient of micro, 2 gm_i micro_ij, is formed here from micro
// recomputed from Graw (G), Graw_t, Graw_x and rho_x (read only then, nullptr otherwise).
// micro needs the row averages of the three fields and <v g_x> first, so the gradient's row
// sums move to a phase 1b behind them: one more row-sum phase than the residual op's backward.
template <typename scalar_t, typename acc_t, int L, int PER, bool SQ>
__global__ void __launch_bounds__(kThreads) transport_backward_kernel(
    const scalar_t* __restrict__ gg, const scalar_t* __restrict__ gm, const scalar_t* __restrict__ gc,
    const scalar_t* __restrict__ G, const scalar_t* __restrict__ Gt, const scalar_t* __restrict__ Gx,
    const scalar_t* __restrict__ rho_x, const scalar_t* __restrict__ v, const scalar_t* __restrict__ w,
    const scalar_t* __restrict__ eps, int64_t eps_stride, int64_t N, int V, scalar_t* __restrict__ dG,
    scalar_t* __restrict__ dGt, scalar_t* __restrict__ dGx, scalar_t* __restrict__ drho_x,
    scalar_t* __restrict__ deps) {
  RowLane row;
  if (!row_lane<L>(N, row)) return;
  const int64_t i = row.i;
  const int lane = row.sub;
  const int64_t o = i * V;
  const int iters = lane_iters<L, PER>(V);
  constexpr int R = PER > 0 ? PER : 1;
  acc_t rgg[R], rm[R], rt[R], rx[R];  // SQ: rgg holds Graw, rm the gradient of micro from phase 1b
  // Phase 1: sums of the incoming gradients and the forward averages (needed for deps).
  // SQ: Sgm sums w Graw here (for <Graw>); the gradient's sums are phase 1b's.
  acc_t W = 0, Wv = 0, Sgm = 0, Sm = 0, Svm = 0, st = 0, sx = 0;
  for (int t = 0; t < iters; ++t) {
    const int j = lane + L * t;
    acc_t a_gg = 0, a_m = 0, a_t = 0, a_x = 0;
    if (j < V) {
      const acc_t wj = w[j], vj = v[j];
      a_t = Gt[o + j];
      a_x = Gx[o + j];
      W += wj;
      Wv += wj * vj;
      st += wj * a_t;
      sx += wj * a_x;
      if constexpr (SQ) {
        a_gg = G[o + j];
        Sgm += wj * a_gg;
      } else {
        a_gg = gg[o + j];
        a_m = gm[o + j];
        Sgm += a_gg + a_m;
        Sm += a_m;
        Svm += vj * a_m;
      }
    }
    if constexpr (PER > 0) {
      rgg[t] = a_gg;
      rm[t] = a_m;
      rt[t] = a_t;
      rx[t] = a_x;
    }
  }
  if constexpr (SQ) {
    row_sums<L>(W, Wv, Sgm, st, sx);
  } else {
    row_sums<L>(W, Wv, Sgm, Sm, Svm, st, sx);
  }
  // e and C loaded before the division: with them after it, ptxas spilled one register of the
  // SQ, double, L = 32 instance on sm_90 (the division's slow path is a call).
  const acc_t e = eps[i * eps_stride], C = gc[i];
  const acc_t invW = acc_t(1) / W, vbar = Wv * invW, mt = st * invW, mx = sx * invW;
  // a = <v g_x> from the centred g_x, as in the forward kernel.
  acc_t a = 0;
  for (int t = 0; t < iters; ++t) {
    const int j = lane + L * t;
    if (j < V) {
      const acc_t x = PER > 0 ? rx[PER > 0 ? t : 0] : static_cast<acc_t>(Gx[o + j]);
      a += static_cast<acc_t>(w[j]) * static_cast<acc_t>(v[j]) * (x - mx);
    }
  }
  a = row_sum<L>(a) * invW;
  // SQ: 2 q_i micro_ij from the raw fields at node j (micro as in the forward kernel).
  const acc_t mg = SQ ? Sgm * invW : acc_t(0), q2 = SQ ? acc_t(2) * static_cast<acc_t>(gm[i]) : acc_t(0),
              rxi = SQ ? static_cast<acc_t>(rho_x[i]) : acc_t(0);
  const auto micro_grad = [&](acc_t graw, acc_t graw_t, acc_t graw_x, acc_t vj) {
    return q2 * (e * e * (graw_t - mt) + e * (vj * (graw_x - mx) - a) + vj * rxi + (graw - mg));
  };
  if constexpr (SQ) {
    // Phase 1b: the sums of the gradient of micro (there is no grad_g: Sgm = Sm).
    for (int t = 0; t < iters; ++t) {
      const int j = lane + L * t;
      if (j < V) {
        const acc_t vj = v[j];
        const acc_t m = PER > 0 ? micro_grad(rgg[PER > 0 ? t : 0], rt[PER > 0 ? t : 0], rx[PER > 0 ? t : 0], vj)
                                : micro_grad(G[o + j], Gt[o + j], Gx[o + j], vj);
        if constexpr (PER > 0) rm[t] = m;
        Sm += m;
        Svm += vj * m;
      }
    }
    row_sums<L>(Sm, Svm);
    Sgm = Sm;
  }
  // Adjoint of the projection P phi = phi - <phi> (see kinetic_cpu.cpp for the derivation).
  const acc_t B = C - e * Sm, Q = e * Svm + B * vbar;
  acc_t de = 0;
  for (int t = 0; t < iters; ++t) {
    const int j = lane + L * t;
    if (row.live && j < V) {  // segments past N store nothing (their de is not stored either)
      const acc_t vj = v[j], wn = static_cast<acc_t>(w[j]) * invW;
      acc_t a_gg, a_m, a_t, a_x;
      if constexpr (PER > 0) {
        a_gg = rgg[t];
        a_m = rm[t];
        a_t = rt[t];
        a_x = rx[t];
      } else {
        a_t = Gt[o + j];
        a_x = Gx[o + j];
        if constexpr (SQ) {
          a_m = micro_grad(G[o + j], a_t, a_x, vj);
        } else {
          a_gg = gg[o + j];
          a_m = gm[o + j];
        }
      }
      if constexpr (SQ) a_gg = 0;  // no grad_g (rgg held Graw)
      dG[o + j] = static_cast<scalar_t>(a_gg + a_m - wn * Sgm);
      dGt[o + j] = static_cast<scalar_t>(e * e * (a_m - wn * Sm));
      dGx[o + j] = static_cast<scalar_t>(e * vj * a_m + wn * (B * vj - Q));
      de += a_m * (acc_t(2) * e * (a_t - mt) + vj * (a_x - mx) - a);
    }
  }
  de = row_sum<L>(de);
  if (row.live && lane == 0) {
    drho_x[i] = static_cast<scalar_t>(Svm);
    deps[i] = static_cast<scalar_t>(de);
  }
}

// The residual op (SQ = false) and its loss form (SQ = true: micro is [N], the row sums of
// squares, and g is not computed); the caller allocates the outputs.
template <bool SQ>
void transport_forward_cuda(int64_t es, const Tensor& G_, const Tensor& Gt_, const Tensor& Gx_, const Tensor& rho_t_,
                            const Tensor& rho_x_, const Tensor& v_, const Tensor& w_, const Tensor& eps_, Tensor& g,
                            Tensor& micro, Tensor& macro) {
  const int64_t N = G_.size(0), V = G_.size(1);
  if (N == 0) return;
  const cuda::DeviceGuard guard(G_.get_device_index());
  const Tensor G = make_contiguous(G_), Gt = make_contiguous(Gt_), Gx = make_contiguous(Gx_),
                   rho_t = make_contiguous(rho_t_), rho_x = make_contiguous(rho_x_), v = make_contiguous(v_),
                   w = make_contiguous(w_), eps = make_contiguous(eps_);
  HRGRAD_DISPATCH_FLOATING(G.scalar_type(), "transport_mm_residuals_cuda", [&] {
    with_lanes_per(V, [&](auto lanes, auto per) {
      constexpr int L = decltype(lanes)::value;
      launch<transport_forward_kernel<scalar_t, scalar_t, L, decltype(per)::value, SQ>>({row_blocks(N, L), kThreads},
          G.const_data_ptr<scalar_t>(), Gt.const_data_ptr<scalar_t>(), Gx.const_data_ptr<scalar_t>(),
          rho_t.const_data_ptr<scalar_t>(), rho_x.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
          w.const_data_ptr<scalar_t>(), eps.const_data_ptr<scalar_t>(), es, N, static_cast<int>(V),
          SQ ? nullptr : g.mutable_data_ptr<scalar_t>(), micro.mutable_data_ptr<scalar_t>(),
          macro.mutable_data_ptr<scalar_t>());
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> transport_mm_residuals_cuda(
    const Tensor& G, const Tensor& Gt, const Tensor& Gx, const Tensor& rho_t,
    const Tensor& rho_x, const Tensor& v, const Tensor& w, const Tensor& eps) {
  const int64_t es = check_transport(G, Gt, Gx, rho_t, rho_x, v, w, eps);
  const int64_t N = G.size(0), V = G.size(1);
  Tensor g = empty_on(G, {N, V}), micro = empty_on(G, {N, V}), macro = empty_on(G, {N});
  transport_forward_cuda<false>(es, G, Gt, Gx, rho_t, rho_x, v, w, eps, g, micro, macro);
  return {g, micro, macro};
}

std::tuple<Tensor, Tensor> transport_mm_residuals_sq_cuda(
    const Tensor& G, const Tensor& Gt, const Tensor& Gx, const Tensor& rho_t,
    const Tensor& rho_x, const Tensor& v, const Tensor& w, const Tensor& eps) {
  const int64_t es = check_transport_sq(G, Gt, Gx, rho_t, rho_x, v, w, eps);
  const int64_t N = G.size(0);
  Tensor unused, micro_sq = empty_on(G, {N}), macro = empty_on(G, {N});
  transport_forward_cuda<true>(es, G, Gt, Gx, rho_t, rho_x, v, w, eps, unused, micro_sq, macro);
  return {micro_sq, macro};
}

using TransportGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// The residual op's backward (SQ = false: gg, gm [N, V]; G and rho_x unused) and the loss form's
// (SQ = true: gm = grad_micro_sq [N], gg unused, micro recomputed from G, Gt, Gx, rho_x).
template <bool SQ>
TransportGrads transport_backward_cuda(int64_t es, const Tensor& gg_, const Tensor& gm_, const Tensor& gc_,
                                       const Tensor& G_, const Tensor& Gt_, const Tensor& Gx_, const Tensor& rho_x_,
                                       const Tensor& v_, const Tensor& w_, const Tensor& eps_) {
  const int64_t N = Gt_.size(0), V = Gt_.size(1);
  const Tensor& opt = Gt_;  // outputs: Gt's dtype and device
  Tensor dG = empty_on(opt, {N, V}), dGt = empty_on(opt, {N, V}), dGx = empty_on(opt, {N, V});
  Tensor drho_x = empty_on(opt, {N}), deps = empty_on(opt, {N});
  if (N == 0) return {dG, dGt, dGx, drho_x, deps};
  const cuda::DeviceGuard guard(Gt_.get_device_index());
  // the arguments a variant does not read are passed through uncopied (their pointers: nullptr)
  const Tensor gg = SQ ? gg_ : make_contiguous(gg_), gm = make_contiguous(gm_), gc = make_contiguous(gc_),
               G = SQ ? make_contiguous(G_) : G_, Gt = make_contiguous(Gt_), Gx = make_contiguous(Gx_),
               rho_x = SQ ? make_contiguous(rho_x_) : rho_x_, v = make_contiguous(v_), w = make_contiguous(w_),
               eps = make_contiguous(eps_);
  HRGRAD_DISPATCH_FLOATING(Gt.scalar_type(), "transport_mm_residuals_backward_cuda", [&] {
    with_lanes_per(V, [&](auto lanes, auto per) {
      constexpr int L = decltype(lanes)::value;
      launch<transport_backward_kernel<scalar_t, scalar_t, L, decltype(per)::value, SQ>>({row_blocks(N, L), kThreads},
          SQ ? nullptr : gg.const_data_ptr<scalar_t>(), gm.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
          SQ ? G.const_data_ptr<scalar_t>() : nullptr, Gt.const_data_ptr<scalar_t>(), Gx.const_data_ptr<scalar_t>(),
          SQ ? rho_x.const_data_ptr<scalar_t>() : nullptr, v.const_data_ptr<scalar_t>(),
          w.const_data_ptr<scalar_t>(), eps.const_data_ptr<scalar_t>(), es, N, static_cast<int>(V),
          dG.mutable_data_ptr<scalar_t>(), dGt.mutable_data_ptr<scalar_t>(), dGx.mutable_data_ptr<scalar_t>(),
          drho_x.mutable_data_ptr<scalar_t>(), deps.mutable_data_ptr<scalar_t>());
    });
  });
  return {dG, dGt, dGx, drho_x, deps};
}

TransportGrads transport_mm_residuals_backward_cuda(const Tensor& gg, const Tensor& gm, const Tensor& gc,
                                                    const Tensor& Gt, const Tensor& Gx, const Tensor& v,
                                                    const Tensor& w, const Tensor& eps) {
  const int64_t es = check_transport_backward(gg, gm, gc, Gt, Gx, v, w, eps);
  return transport_backward_cuda<false>(es, gg, gm, gc, /*G, rho_x: unused*/ Gt, Gt, Gx, gc, v, w, eps);
}

TransportGrads transport_mm_residuals_sq_backward_cuda(const Tensor& gQ, const Tensor& gc, const Tensor& G,
                                                       const Tensor& Gt, const Tensor& Gx, const Tensor& rho_x,
                                                       const Tensor& v, const Tensor& w, const Tensor& eps) {
  const int64_t es = check_transport_sq_backward(gQ, gc, G, Gt, Gx, rho_x, v, w, eps);
  return transport_backward_cuda<true>(es, /*gg: unused*/ gQ, gQ, gc, G, Gt, Gx, rho_x, v, w, eps);
}

}  // namespace

HRGRAD_EXT_CUDA_KERNELS(m) {
  m.impl("velocity_moments", TORCH_BOX(&velocity_moments_cuda));
  m.impl("velocity_moments_backward", TORCH_BOX(&velocity_moments_backward_cuda));
  m.impl("maxwellian", TORCH_BOX(&maxwellian_cuda));
  m.impl("maxwellian_backward", TORCH_BOX(&maxwellian_backward_cuda));
  m.impl("bgk_residuals", TORCH_BOX(&bgk_residuals_cuda<false>));
  m.impl("bgk_residuals_backward", TORCH_BOX(&bgk_residuals_backward_cuda));
  m.impl("bgk_residuals_sq", TORCH_BOX(&bgk_residuals_cuda<true>));
  m.impl("bgk_residuals_sq_backward", TORCH_BOX(&bgk_residuals_sq_backward_cuda));
  m.impl("transport_mm_residuals", TORCH_BOX(&transport_mm_residuals_cuda));
  m.impl("transport_mm_residuals_backward", TORCH_BOX(&transport_mm_residuals_backward_cuda));
  m.impl("transport_mm_residuals_sq", TORCH_BOX(&transport_mm_residuals_sq_cuda));
  m.impl("transport_mm_residuals_sq_backward", TORCH_BOX(&transport_mm_residuals_sq_backward_cuda));
}

}  // namespace kinetic
}  // namespace hrgrad_ext
