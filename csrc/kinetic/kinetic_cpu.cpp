// CPU kernels of the kinetic family: velocity_moments, maxwellian, bgk_residuals,
// transport_mm_residuals and their fused backward ops.
//
// Every kernel parallelises over rows (torch's intra-op thread pool) and vectorises along the V velocity
// nodes of a row (common/simd.h: AVX-512, AVX2 or SSE2, picked at run time; the last partial
// vector of a row uses masked loads and stores). One pass over the [N, V] inputs per op; two
// over a row (in L1) where a row average is needed first (transport).
//
// Precision: element-wise terms (the Maxwellian with its exp, the residuals and the
// gradients) are computed in the input dtype; the velocity sums are accumulated in float64
// from float64 products whatever the input dtype (a float32 input is widened first), so a
// float32 sum like sum_j w_j v_j^3 Fx_j (terms up to ~1e3 that cancel) keeps its float64
// accuracy. Each row is processed by one thread, so the results do not depend on the thread
// count.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/simd.h"
#include "kinetic/kinetic_common.h"

namespace hrgrad_ext {
namespace kinetic {
namespace {

using simd::V;

constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)

// Rows per parallel task: about 16k elements, so small batches stay on one thread (the
// threading overhead would exceed the work) and large ones split evenly.
inline int64_t row_grain(int64_t nv) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(nv, 1)); }

// ---- vector helpers --------------------------------------------------------------------------

template <int B, class T>
struct Lanes {
  using vec = std::conditional_t<std::is_same_v<T, float>, typename V<B>::f32, typename V<B>::f64>;
  static constexpr int64_t L = sizeof(vec) / sizeof(T);
};

// The j-th vector of a row with m = V - j elements left: a full vector or a masked one.
template <int B, class T>
HRGRAD_INLINE typename Lanes<B, T>::vec ld(const T* p, int64_t m) {
  using vec = typename Lanes<B, T>::vec;
  return m >= Lanes<B, T>::L ? simd::load<vec>(p) : simd::load_n<B>(p, m);
}
template <int B, class T>
HRGRAD_INLINE void st(T* p, typename Lanes<B, T>::vec v, int64_t m) {
  if (m >= Lanes<B, T>::L) simd::store(p, v);
  else simd::store_n<B>(p, v, m);
}
template <int B, class T>
HRGRAD_INLINE typename Lanes<B, T>::vec bcast(double x) {
  return simd::splat<typename Lanes<B, T>::vec>(static_cast<T>(x));
}

// A vector of T widened to float64: two double vectors for float, one for double. The
// velocity sums are accumulated in these.
template <int B, class T>
struct Wide {
  static constexpr int kParts = std::is_same_v<T, float> ? 2 : 1;
  static constexpr int64_t Ld = V<B>::kF64;
  using vd = typename V<B>::f64;
  vd p[kParts];

  HRGRAD_INLINE static Wide of(typename Lanes<B, T>::vec x) {
    Wide w;
    if constexpr (kParts == 2) {
      w.p[0] = simd::lo_f64<B>(x);
      w.p[1] = simd::hi_f64<B>(x);
    } else {
      w.p[0] = x;
    }
    return w;
  }
  HRGRAD_INLINE static Wide zero() {
    Wide w;
    for (int h = 0; h < kParts; ++h) w.p[h] = vd{};
    return w;
  }
  // The double table values for the same elements (tab points at element j).
  HRGRAD_INLINE static Wide table(const double* tab) {
    Wide w;
    for (int h = 0; h < kParts; ++h) w.p[h] = simd::load<vd>(tab + h * Ld);
    return w;
  }
  HRGRAD_INLINE static Wide splat(double x) {
    Wide w;
    for (int h = 0; h < kParts; ++h) w.p[h] = simd::splat<vd>(x);
    return w;
  }
  HRGRAD_INLINE Wide operator+(const Wide& o) const {
    Wide w;
    for (int h = 0; h < kParts; ++h) w.p[h] = p[h] + o.p[h];
    return w;
  }
  HRGRAD_INLINE Wide operator-(const Wide& o) const {
    Wide w;
    for (int h = 0; h < kParts; ++h) w.p[h] = p[h] - o.p[h];
    return w;
  }
  HRGRAD_INLINE Wide operator*(const Wide& o) const {
    Wide w;
    for (int h = 0; h < kParts; ++h) w.p[h] = p[h] * o.p[h];
    return w;
  }
  HRGRAD_INLINE void add(const Wide& x) {
    for (int h = 0; h < kParts; ++h) p[h] += x.p[h];
  }
  // this += x * tab[j ...]
  HRGRAD_INLINE void add_mul(const Wide& x, const double* tab) {
    for (int h = 0; h < kParts; ++h) p[h] += x.p[h] * simd::load<vd>(tab + h * Ld);
  }
  // The parts added: one double vector whose lane sum is the total.
  HRGRAD_INLINE vd collapse() const {
    vd s = p[0];
    for (int h = 1; h < kParts; ++h) s += p[h];
    return s;
  }
};

// Rows are processed in blocks of R = (doubles per vector) rows: each row parks its S
// velocity sums (as double vectors), and the block reduces them together (simd::hsums: R
// rows' lane sums for the price of about two of them).
template <int B, int S>
struct RowBlock {
  using vd = typename V<B>::f64;
  static constexpr int R = V<B>::kF64;
  vd parked[S][R];
  double sums[S][R];

  template <class W>
  HRGRAD_INLINE void park(int sum, int row, const W& w) {
    parked[sum][row] = w.collapse();
  }
  // Sums of rows [0, rows); the parked vectors of the other rows are ignored.
  HRGRAD_INLINE void reduce(int rows) {
    for (int k = 0; k < S; ++k) {
      for (int r = rows; r < R; ++r) parked[k][r] = vd{};
      simd::store(sums[k], simd::hsums(parked[k]));
    }
  }
};

// ---- outputs written with streaming stores --------------------------------------------------

// [N, V] outputs larger than this in all are written with streaming stores: far beyond the L2
// caches and half the last-level cache of the benchmark machine (32 MB), where the cached
// stores' read-for-ownership would double the bytes a backward kernel moves for its writes.
constexpr int64_t kStreamBytes = int64_t{16} << 20;

// The [N, V] outputs of a block of rows: written in place, or (streamed) into a block-sized
// scratch first and then copied out with streaming stores, since a row of V elements is rarely
// aligned to the vector size but the block's span mostly is.
template <int B, class T, int Fields>
struct BlockOutputs {
  T* out[Fields];
  bool streamed;
  int64_t nv, rows;
  std::vector<T> scratch;
  BlockOutputs(std::initializer_list<T*> outs, bool stream, int64_t nv_, int64_t rows_)
      : streamed(stream), nv(nv_), rows(rows_), scratch(stream ? static_cast<size_t>(Fields * rows_ * nv_) : 0) {
    int f = 0;
    for (T* o : outs) out[f++] = o;
  }
  // Row r of block ib of output f.
  HRGRAD_INLINE T* row(int f, int64_t ib, int r) {
    return streamed ? scratch.data() + (f * rows + r) * nv : out[f] + (ib + r) * nv;
  }
  // After the block's rows are written.
  HRGRAD_INLINE void flush(int64_t ib, int nr) {
    if (!streamed) return;
    for (int f = 0; f < Fields; ++f) simd::stream_copy<B>(out[f] + ib * nv, scratch.data() + f * rows * nv, nr * nv);
  }
  // After the last block.
  HRGRAD_INLINE void finish() {
    if (streamed) simd::stream_fence();
  }
};

// ---- quadrature tables ---------------------------------------------------------------------

// Per-call tables over the velocity nodes, zero beyond V up to a multiple of the widest
// vector (16 floats), so a row's last vector reads them in full and its padding lanes add 0
// to every sum. Row r is kept in float64 (for the sums) and in T (for element-wise terms).
constexpr int64_t kPad = 16;

template <class T>
struct Tables {
  int64_t Vp;
  std::vector<double> d;
  std::vector<T> t;
  Tables(int64_t nv, int rows)
      : Vp((nv + kPad - 1) / kPad * kPad), d(static_cast<size_t>(rows * Vp), 0.0), t(d.size(), T(0)) {}
  void set(int r, int64_t j, double x) {
    d[r * Vp + j] = x;
    t[r * Vp + j] = static_cast<T>(x);
  }
  const double* D(int r) const { return d.data() + r * Vp; }
  const T* Tt(int r) const { return t.data() + r * Vp; }
};

// v and w converted to double once per call (they are read by every row).
inline std::vector<double> as_double(const Tensor& x) {
  const Tensor d = make_contiguous(to_dtype(x, kDouble));
  return std::vector<double>(d.const_data_ptr<double>(), d.const_data_ptr<double>() + d.numel());
}

// Rows 0: v, 1 + p: w v^p for p = 0..powers-1, then with_valid: 1 at the nodes and 0 in the
// padding (the mask of a row's last vector for terms that are not 0 there).
template <class T>
Tables<T> velocity_tables(const Tensor& v, const Tensor* w, int powers, bool with_valid = false) {
  const std::vector<double> vd = as_double(v), wd = w ? as_double(*w) : std::vector<double>();
  const int64_t nv = static_cast<int64_t>(vd.size());
  Tables<T> tab(nv, 1 + powers + (with_valid ? 1 : 0));
  for (int64_t j = 0; j < nv; ++j) {
    tab.set(0, j, vd[j]);
    double p = w ? wd[j] : 0.0;
    for (int k = 0; k < powers; ++k, p *= vd[j]) tab.set(1 + k, j, p);
    if (with_valid) tab.set(1 + powers, j, 1.0);
  }
  return tab;
}

// ---- velocity_moments ----------------------------------------------------------------------

constexpr int kMomentsPerPass = 4;

template <class T>
struct MomentsArgs {
  const T* F;
  T* out;
  int64_t nv, K;
  const Tables<T>* tab;  // rows 1 + k: w v^k
};

// Moments [k0, k0 + Q) of the rows of one block (Q known at compile time, so the Q wide
// accumulators live in registers).
template <int B, class T, int Q>
HRGRAD_INLINE void moments_block(const MomentsArgs<T>& a, int64_t ib, int nr, int64_t k0,
                                 RowBlock<B, kMomentsPerPass>& blk) {
  using W = Wide<B, T>;
  constexpr int64_t L = Lanes<B, T>::L;
  const int64_t nv = a.nv;
  const double* tab[Q];
  for (int q = 0; q < Q; ++q) tab[q] = a.tab->D(1 + static_cast<int>(k0) + q);
  for (int r = 0; r < nr; ++r) {
    const T* f = a.F + (ib + r) * nv;
    W s[Q];
    for (int q = 0; q < Q; ++q) s[q] = W::zero();
    for (int64_t j = 0; j < nv; j += L) {
      const W x = W::of(ld<B, T>(f + j, nv - j));
      for (int q = 0; q < Q; ++q) s[q].add_mul(x, tab[q] + j);
    }
    for (int q = 0; q < Q; ++q) blk.park(q, r, s[q]);
  }
  blk.reduce(nr);
  for (int r = 0; r < nr; ++r) {
    for (int q = 0; q < Q; ++q) a.out[(ib + r) * a.K + k0 + q] = static_cast<T>(blk.sums[q][r]);
  }
}

template <int B, class T>
HRGRAD_INLINE void moments_rows_impl(const MomentsArgs<T>& a, const int64_t& r0, const int64_t& r1) {
  using Block = RowBlock<B, kMomentsPerPass>;
  const int64_t K = a.K;
  Block blk;
  for (int64_t ib = r0; ib < r1; ib += Block::R) {
    const int nr = static_cast<int>(std::min<int64_t>(Block::R, r1 - ib));
    for (int64_t k0 = 0; k0 < K; k0 += kMomentsPerPass) {
      switch (std::min<int64_t>(kMomentsPerPass, K - k0)) {
        case 1: moments_block<B, T, 1>(a, ib, nr, k0, blk); break;
        case 2: moments_block<B, T, 2>(a, ib, nr, k0, blk); break;
        case 3: moments_block<B, T, 3>(a, ib, nr, k0, blk); break;
        default: moments_block<B, T, kMomentsPerPass>(a, ib, nr, k0, blk); break;
      }
    }
  }
}
HRGRAD_SIMD_DISPATCH(moments_rows, moments_rows_impl)

Tensor velocity_moments_cpu(const Tensor& F_, const Tensor& v, const Tensor& w, int64_t order) {
  check_velocity_moments(F_, v, w, order);
  const Tensor F = make_contiguous(F_);
  const int64_t N = F.size(0), nv = F.size(1), K = order + 1;
  Tensor out = empty_on(F, {N, K});
  const int vb = simd::vector_bytes();
  HRGRAD_DISPATCH_FLOATING(F.scalar_type(), "velocity_moments_cpu", [&] {
    const Tables<scalar_t> tab = velocity_tables<scalar_t>(v, &w, static_cast<int>(K));
    const MomentsArgs<scalar_t> args{F.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), nv, K, &tab};
    parallel_for(0, N, row_grain(nv), [&](int64_t r0, int64_t r1) { moments_rows(vb, args, r0, r1); });
  });
  return out;
}

template <class T>
struct MomentsBackwardArgs {
  const T* g;  // [N, K]
  T* dF;       // [N, V]
  int64_t nv, K;
  const Tables<T>* tab;
};

// dF_ij = sum_k g_ik w_j v_j^k.
template <int B, class T>
HRGRAD_INLINE void moments_backward_rows_impl(const MomentsBackwardArgs<T>& a, const int64_t& r0, const int64_t& r1) {
  using vec = typename Lanes<B, T>::vec;
  constexpr int64_t L = Lanes<B, T>::L;
  const int64_t nv = a.nv, K = a.K;
  for (int64_t i = r0; i < r1; ++i) {
    const T* g = a.g + i * K;
    for (int64_t j = 0; j < nv; j += L) {
      vec s = {};
      for (int64_t k = 0; k < K; ++k) s += bcast<B, T>(g[k]) * simd::load<vec>(a.tab->Tt(1 + static_cast<int>(k)) + j);
      st<B, T>(a.dF + i * nv + j, s, nv - j);
    }
  }
}
HRGRAD_SIMD_DISPATCH(moments_backward_rows, moments_backward_rows_impl)

Tensor velocity_moments_backward_cpu(const Tensor& grad_, const Tensor& v, const Tensor& w) {
  check_velocity_moments_backward(grad_, v, w);
  const Tensor grad = make_contiguous(grad_);
  const int64_t N = grad.size(0), K = grad.size(1), nv = v.size(0);
  Tensor dF = empty_on(grad, {N, nv});
  const int vb = simd::vector_bytes();
  HRGRAD_DISPATCH_FLOATING(grad.scalar_type(), "velocity_moments_backward_cpu", [&] {
    const Tables<scalar_t> tab = velocity_tables<scalar_t>(v, &w, static_cast<int>(K));
    const MomentsBackwardArgs<scalar_t> args{grad.const_data_ptr<scalar_t>(), dF.mutable_data_ptr<scalar_t>(), nv, K,
                                             &tab};
    parallel_for(0, N, row_grain(nv), [&](int64_t r0, int64_t r1) { moments_backward_rows(vb, args, r0, r1); });
  });
  return dF;
}

// ---- maxwellian ----------------------------------------------------------------------------
// M = rho m0 with m0 = exp(-d^2 / 2T) / sqrt(2 pi T), d = v - u.

// exp(-d^2 inv2T) for the nodes vv of a row.
template <int B, class T>
HRGRAD_INLINE typename Lanes<B, T>::vec gauss(typename Lanes<B, T>::vec d, typename Lanes<B, T>::vec minus_inv2T) {
  return simd::exp<B>(d * d * minus_inv2T);
}

template <class T>
struct MaxwellianArgs {
  const T *rho, *u, *Tm, *g;  // g: the incoming gradient (backward only)
  T *M, *drho, *du, *dT;
  int64_t nv;
  const Tables<T>* tab;  // row 0: v
};

// Per-row constants of the Maxwellian for a block of rows, computed ahead of the rows'
// vector loops so that their square roots and divisions overlap instead of heading each row.
template <int R>
struct GaussConsts {
  double coef[R], minv[R];  // rho / sqrt(2 pi T) (or 1 / sqrt(2 pi T) without rho), -1 / (2 T)
  template <class T>
  HRGRAD_INLINE void set(const T* rho, const T* Tm, int64_t i0, int rows) {
    for (int r = 0; r < rows; ++r) {
      const double TT = Tm[i0 + r];
      coef[r] = (rho ? static_cast<double>(rho[i0 + r]) : 1.0) * kInvSqrt2Pi / std::sqrt(TT);
      minv[r] = -0.5 / TT;
    }
  }
};

template <int B, class T>
HRGRAD_INLINE void maxwellian_rows_impl(const MaxwellianArgs<T>& a, const int64_t& r0, const int64_t& r1) {
  using vec = typename Lanes<B, T>::vec;
  constexpr int64_t L = Lanes<B, T>::L;
  constexpr int R = V<B>::kF64;
  const int64_t nv = a.nv;
  const T* vT = a.tab->Tt(0);
  GaussConsts<R> gc;
  for (int64_t ib = r0; ib < r1; ib += R) {
    const int nr = static_cast<int>(std::min<int64_t>(R, r1 - ib));
    gc.set(a.rho, a.Tm, ib, nr);
    for (int r = 0; r < nr; ++r) {
      const int64_t i = ib + r;
      const vec coef = bcast<B, T>(gc.coef[r]), u = bcast<B, T>(a.u[i]), minv = bcast<B, T>(gc.minv[r]);
      for (int64_t j = 0; j < nv; j += L) {
        const vec d = simd::load<vec>(vT + j) - u;
        st<B, T>(a.M + i * nv + j, coef * gauss<B, T>(d, minv), nv - j);
      }
    }
  }
}
HRGRAD_SIMD_DISPATCH(maxwellian_rows, maxwellian_rows_impl)

// Sums sum_j g_j m0_j (1, d_j, d_j^2 - T) of one row (m0 without its 1/sqrt(2 pi T)).
template <int B, class T>
struct GaussMoments {
  Wide<B, T> s0 = Wide<B, T>::zero(), s1 = Wide<B, T>::zero(), s2 = Wide<B, T>::zero();
  // g: incoming gradient; d, minv: as for gauss(); vd: the nodes in double at element j.
  HRGRAD_INLINE void add(typename Lanes<B, T>::vec g, typename Lanes<B, T>::vec d, typename Lanes<B, T>::vec minv,
                         const double* vd, const Wide<B, T>& u, const Wide<B, T>& TT) {
    add_gauss(g, gauss<B, T>(d, minv), vd, u, TT);
  }
  // The same with e = gauss(d, minv) already computed.
  HRGRAD_INLINE void add_gauss(typename Lanes<B, T>::vec g, typename Lanes<B, T>::vec e, const double* vd,
                               const Wide<B, T>& u, const Wide<B, T>& TT) {
    const Wide<B, T> gm = Wide<B, T>::of(g * e);
    const Wide<B, T> dd = Wide<B, T>::table(vd) - u;
    s0.add(gm);
    s1.add(gm * dd);
    s2.add(gm * (dd * dd - TT));
  }
};

template <int B, class T>
HRGRAD_INLINE void maxwellian_backward_rows_impl(const MaxwellianArgs<T>& a, const int64_t& r0, const int64_t& r1) {
  using vec = typename Lanes<B, T>::vec;
  using W = Wide<B, T>;
  using Block = RowBlock<B, 3>;
  constexpr int64_t L = Lanes<B, T>::L;
  const int64_t nv = a.nv;
  const T* vT = a.tab->Tt(0);
  const double* vD = a.tab->D(0);
  GaussConsts<Block::R> gc;
  Block blk;
  for (int64_t ib = r0; ib < r1; ib += Block::R) {
    const int nr = static_cast<int>(std::min<int64_t>(Block::R, r1 - ib));
    gc.template set<T>(nullptr, a.Tm, ib, nr);
    for (int r = 0; r < nr; ++r) {
      const int64_t i = ib + r;
      const double uu = a.u[i], TT = a.Tm[i];
      const vec u = bcast<B, T>(uu), minv = bcast<B, T>(gc.minv[r]);
      const W uw = W::splat(uu), Tw = W::splat(TT);
      GaussMoments<B, T> gmom;
      for (int64_t j = 0; j < nv; j += L) {
        const vec d = simd::load<vec>(vT + j) - u;
        gmom.add(ld<B, T>(a.g + i * nv + j, nv - j), d, minv, vD + j, uw, Tw);
      }
      blk.park(0, r, gmom.s0);
      blk.park(1, r, gmom.s1);
      blk.park(2, r, gmom.s2);
    }
    blk.reduce(nr);
    for (int r = 0; r < nr; ++r) {
      // dM/drho = m0, dM/du = M d / T, dM/dT = M (d^2 - T) / (2 T^2).
      const int64_t i = ib + r;
      const double rr = a.rho[i], TT = a.Tm[i], c = gc.coef[r];
      a.drho[i] = static_cast<T>(c * blk.sums[0][r]);
      a.du[i] = static_cast<T>(rr * c * blk.sums[1][r] / TT);
      a.dT[i] = static_cast<T>(rr * c * blk.sums[2][r] * 0.5 / (TT * TT));
    }
  }
}
HRGRAD_SIMD_DISPATCH(maxwellian_backward_rows, maxwellian_backward_rows_impl)

Tensor maxwellian_cpu(const Tensor& rho_, const Tensor& u_, const Tensor& T_, const Tensor& v) {
  check_maxwellian("maxwellian", rho_, u_, T_, v);
  const Tensor rho = make_contiguous(rho_), u = make_contiguous(u_), T = make_contiguous(T_);
  const int64_t N = rho.size(0), nv = v.size(0);
  Tensor M = empty_on(rho, {N, nv});
  const int vb = simd::vector_bytes();
  HRGRAD_DISPATCH_FLOATING(rho.scalar_type(), "maxwellian_cpu", [&] {
    const Tables<scalar_t> tab = velocity_tables<scalar_t>(v, nullptr, 0);
    const MaxwellianArgs<scalar_t> args{rho.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                                        T.const_data_ptr<scalar_t>(), nullptr, M.mutable_data_ptr<scalar_t>(),
                                        nullptr, nullptr, nullptr, nv, &tab};
    parallel_for(0, N, row_grain(nv), [&](int64_t r0, int64_t r1) { maxwellian_rows(vb, args, r0, r1); });
  });
  return M;
}

std::tuple<Tensor, Tensor, Tensor> maxwellian_backward_cpu(const Tensor& grad_, const Tensor& rho_,
                                                                       const Tensor& u_, const Tensor& T_,
                                                                       const Tensor& v) {
  check_maxwellian_backward(grad_, rho_, u_, T_, v);
  const Tensor grad = make_contiguous(grad_), rho = make_contiguous(rho_), u = make_contiguous(u_), T = make_contiguous(T_);
  const int64_t N = rho.size(0), nv = v.size(0);
  Tensor drho = empty_on(rho, {N}), du = empty_on(rho, {N}),
             dT = empty_on(rho, {N});
  const int vb = simd::vector_bytes();
  HRGRAD_DISPATCH_FLOATING(rho.scalar_type(), "maxwellian_backward_cpu", [&] {
    const Tables<scalar_t> tab = velocity_tables<scalar_t>(v, nullptr, 0);
    const MaxwellianArgs<scalar_t> args{rho.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                                        T.const_data_ptr<scalar_t>(),   grad.const_data_ptr<scalar_t>(),
                                        nullptr,                        drho.mutable_data_ptr<scalar_t>(),
                                        du.mutable_data_ptr<scalar_t>(), dT.mutable_data_ptr<scalar_t>(),
                                        nv,                             &tab};
    parallel_for(0, N, row_grain(nv), [&](int64_t r0, int64_t r1) {
      maxwellian_backward_rows(vb, args, r0, r1);
    });
  });
  return {drho, du, dT};
}

// ---- bgk_residuals -------------------------------------------------------------------------

// Tables of the BGK ops: row 0 v, rows 1..4 w v^0..3, row 5 the valid-node mask.
template <class T>
Tables<T> bgk_tables(const Tensor& v, const Tensor& w) {
  return velocity_tables<T>(v, &w, 4, true);
}

// Sq: the loss form (bgk_residuals_sq): kin is the [N] row sums of squares of the kinetic
// residual instead of the [N, V] residual.
template <class T, bool Sq>
struct BgkArgs {
  const T *F, *Ft, *Fx, *rho, *u, *Tm, *rho_t, *u_t, *T_t, *kn;
  int64_t ks, nv;
  const Tables<T>* tab;
  T *kin, *cons, *consis;
};

template <int B, class T, bool Sq>
HRGRAD_INLINE void bgk_rows_impl(const BgkArgs<T, Sq>& a, const int64_t& r0, const int64_t& r1) {
  using vec = typename Lanes<B, T>::vec;
  using W = Wide<B, T>;
  using Block = RowBlock<B, Sq ? 7 : 6>;
  constexpr int64_t L = Lanes<B, T>::L;
  const int64_t nv = a.nv;
  const T *vT = a.tab->Tt(0), *valid = a.tab->Tt(5);
  const double *t0 = a.tab->D(1), *t1 = a.tab->D(2), *t2 = a.tab->D(3), *t3 = a.tab->D(4);
  GaussConsts<Block::R> gc;
  Block blk;
  for (int64_t ib = r0; ib < r1; ib += Block::R) {
    const int nr = static_cast<int>(std::min<int64_t>(Block::R, r1 - ib));
    gc.set(a.rho, a.Tm, ib, nr);
    for (int r = 0; r < nr; ++r) {
      const int64_t i = ib + r;
      const vec coef = bcast<B, T>(gc.coef[r]), u = bcast<B, T>(a.u[i]), minv = bcast<B, T>(gc.minv[r]),
                k = bcast<B, T>(a.kn[i * a.ks]);
      const T *f = a.F + i * nv, *ft = a.Ft + i * nv, *fx = a.Fx + i * nv;
      // The six velocity sums: sum w F v^{0,1,2}, sum w Fx v^{1,2,3} (and sum kin^2).
      W sF0 = W::zero(), sF1 = W::zero(), sF2 = W::zero(), sX1 = W::zero(), sX2 = W::zero(), sX3 = W::zero();
      W sK = W::zero();
      for (int64_t j = 0; j < nv; j += L) {
        const int64_t m = nv - j;
        const vec vv = simd::load<vec>(vT + j), F = ld<B, T>(f + j, m), Fx = ld<B, T>(fx + j, m);
        const vec M = coef * gauss<B, T>(vv - u, minv);
        const vec kin = k * (ld<B, T>(ft + j, m) + vv * Fx) - (M - F);
        if constexpr (Sq) {
          // Beyond V the residual is -M at node 0, not 0: the last vector of a row is masked.
          const W wk = W::of(m >= L ? kin : kin * simd::load<vec>(valid + j));
          sK.add(wk * wk);
        } else {
          st<B, T>(a.kin + i * nv + j, kin, m);
        }
        const W wf = W::of(F), wx = W::of(Fx);
        sF0.add_mul(wf, t0 + j);
        sF1.add_mul(wf, t1 + j);
        sF2.add_mul(wf, t2 + j);
        sX1.add_mul(wx, t1 + j);
        sX2.add_mul(wx, t2 + j);
        sX3.add_mul(wx, t3 + j);
      }
      blk.park(0, r, sF0);
      blk.park(1, r, sF1);
      blk.park(2, r, sF2);
      blk.park(3, r, sX1);
      blk.park(4, r, sX2);
      blk.park(5, r, sX3);
      if constexpr (Sq) blk.park(6, r, sK);
    }
    blk.reduce(nr);
    for (int r = 0; r < nr; ++r) {
      const int64_t i = ib + r;
      const double rr = a.rho[i], uu = a.u[i], TT = a.Tm[i], rt = a.rho_t[i], ut = a.u_t[i], Tt = a.T_t[i];
      const double q = uu * uu + TT;  // E = rho q / 2
      if constexpr (Sq) a.kin[i] = static_cast<T>(blk.sums[6][r]);
      T* oc = a.cons + 3 * i;
      T* os = a.consis + 3 * i;
      oc[0] = static_cast<T>(rt + blk.sums[3][r]);
      oc[1] = static_cast<T>(rt * uu + rr * ut + blk.sums[4][r]);
      oc[2] = static_cast<T>(0.5 * rt * q + 0.5 * rr * (2.0 * uu * ut + Tt) + 0.5 * blk.sums[5][r]);
      os[0] = static_cast<T>(rr - blk.sums[0][r]);
      os[1] = static_cast<T>(rr * uu - blk.sums[1][r]);
      os[2] = static_cast<T>(0.5 * rr * q - 0.5 * blk.sums[2][r]);
    }
  }
}
HRGRAD_SIMD_DISPATCH(bgk_rows, bgk_rows_impl)

// bgk_residuals (Sq false) and bgk_residuals_sq (Sq true).
template <bool Sq>
std::tuple<Tensor, Tensor, Tensor> bgk_forward_cpu(
    const Tensor& F_, const Tensor& Ft_, const Tensor& Fx_, const Tensor& rho_,
    const Tensor& u_, const Tensor& T_, const Tensor& rho_t_, const Tensor& u_t_,
    const Tensor& T_t_, const Tensor& v, const Tensor& w, const Tensor& kn_) {
  const int64_t ks = check_bgk(F_, Ft_, Fx_, rho_, u_, T_, rho_t_, u_t_, T_t_, v, w, kn_,
                               Sq ? "bgk_residuals_sq" : "bgk_residuals");
  const Tensor F = make_contiguous(F_), Ft = make_contiguous(Ft_), Fx = make_contiguous(Fx_), rho = make_contiguous(rho_),
                   u = make_contiguous(u_), T = make_contiguous(T_), rho_t = make_contiguous(rho_t_),
                   u_t = make_contiguous(u_t_), T_t = make_contiguous(T_t_), kn = make_contiguous(kn_);
  const int64_t N = F.size(0), nv = F.size(1);
  Tensor kin = Sq ? empty_on(F, {N}) : empty_on(F, {N, nv}), cons = empty_on(F, {N, 3}),
         consis = empty_on(F, {N, 3});
  const int vb = simd::vector_bytes();
  HRGRAD_DISPATCH_FLOATING(F.scalar_type(), "bgk_residuals_cpu", [&] {
    using T_ = scalar_t;
    const Tables<T_> tab = bgk_tables<T_>(v, w);
    const BgkArgs<T_, Sq> args{F.const_data_ptr<T_>(),     Ft.const_data_ptr<T_>(),    Fx.const_data_ptr<T_>(),
                           rho.const_data_ptr<T_>(),   u.const_data_ptr<T_>(),     T.const_data_ptr<T_>(),
                           rho_t.const_data_ptr<T_>(), u_t.const_data_ptr<T_>(),   T_t.const_data_ptr<T_>(),
                           kn.const_data_ptr<T_>(),    ks,                         nv,
                           &tab,                       kin.mutable_data_ptr<T_>(), cons.mutable_data_ptr<T_>(),
                           consis.mutable_data_ptr<T_>()};
    parallel_for(0, N, row_grain(nv), [&](int64_t r0, int64_t r1) { bgk_rows(vb, args, r0, r1); });
  });
  return {kin, cons, consis};
}

// Sq: the backward of bgk_residuals_sq: gK is grad_kinetic_sq [N], and the incoming gradient of
// the kinetic residual, 2 gK_i kinetic_ij, is recomputed from F, Ft, Fx (F is read only then).
template <class T, bool Sq>
struct BgkBackwardArgs {
  const T *gK, *gC, *gS, *F, *Ft, *Fx, *rho, *u, *Tm, *rho_t, *u_t, *T_t, *kn;
  int64_t ks, nv;
  const Tables<T>* tab;
  T *dF, *dFt, *dFx;
  T* rows[7];  // drho, du, dT, drho_t, du_t, dT_t, dkn
  bool stream;  // dF, dFt, dFx with streaming stores (BlockOutputs)
};

template <int B, class T, bool Sq>
HRGRAD_INLINE void bgk_backward_rows_impl(const BgkBackwardArgs<T, Sq>& a, const int64_t& r0, const int64_t& r1) {
  using vec = typename Lanes<B, T>::vec;
  using W = Wide<B, T>;
  using Block = RowBlock<B, 4>;
  constexpr int64_t L = Lanes<B, T>::L;
  const int64_t nv = a.nv;
  const T *vT = a.tab->Tt(0), *w0 = a.tab->Tt(1), *w1 = a.tab->Tt(2), *w2 = a.tab->Tt(3), *w3 = a.tab->Tt(4),
          *valid = a.tab->Tt(5);
  const double* vD = a.tab->D(0);
  GaussConsts<Block::R> gc;
  Block blk;
  BlockOutputs<B, T, 3> outs({a.dF, a.dFt, a.dFx}, a.stream, nv, Block::R);
  for (int64_t ib = r0; ib < r1; ib += Block::R) {
    const int nr = static_cast<int>(std::min<int64_t>(Block::R, r1 - ib));
    gc.template set<T>(nullptr, a.Tm, ib, nr);
    for (int r = 0; r < nr; ++r) {
      const int64_t i = ib + r, o = i * nv;
      T *dF = outs.row(0, ib, r), *dFt = outs.row(1, ib, r), *dFx = outs.row(2, ib, r);
      const double uu = a.u[i], TT = a.Tm[i];
      const vec k = bcast<B, T>(a.kn[i * a.ks]), u = bcast<B, T>(uu), minv = bcast<B, T>(gc.minv[r]);
      // kinetic = kn (Ft + v Fx) - M + F; consistency uses -sum w v^p F, conservation +sum w v^p Fx.
      const vec S0 = bcast<B, T>(a.gS[3 * i]), S1 = bcast<B, T>(a.gS[3 * i + 1]),
                S2 = bcast<B, T>(0.5 * a.gS[3 * i + 2]);
      const vec C0 = bcast<B, T>(a.gC[3 * i]), C1 = bcast<B, T>(a.gC[3 * i + 1]),
                C2 = bcast<B, T>(0.5 * a.gC[3 * i + 2]);
      const W uw = W::splat(uu), Tw = W::splat(TT);
      // Sq: 2 grad_kinetic_sq and the Maxwellian's rho / sqrt(2 pi T).
      const vec q2 = bcast<B, T>(Sq ? 2.0 * static_cast<double>(a.gK[i]) : 0.0),
                mc = bcast<B, T>(Sq ? static_cast<double>(a.rho[i]) * gc.coef[r] : 0.0);
      W skn = W::zero();
      GaussMoments<B, T> gmom;
      for (int64_t j = 0; j < nv; j += L) {
        const int64_t m = nv - j;
        const vec vv = simd::load<vec>(vT + j), ft = ld<B, T>(a.Ft + o + j, m), fx = ld<B, T>(a.Fx + o + j, m);
        const vec e = gauss<B, T>(vv - u, minv);
        vec g;
        if constexpr (Sq) {
          g = q2 * (k * (ft + vv * fx) - (mc * e - ld<B, T>(a.F + o + j, m)));
        } else {
          g = ld<B, T>(a.gK + o + j, m);
        }
        const vec t0 = simd::load<vec>(w0 + j), t1 = simd::load<vec>(w1 + j), t2 = simd::load<vec>(w2 + j),
                  t3 = simd::load<vec>(w3 + j);
        st<B, T>(dF + j, g - (S0 * t0 + S1 * t1 + S2 * t2), m);
        st<B, T>(dFt + j, k * g, m);
        st<B, T>(dFx + j, k * vv * g + (C0 * t1 + C1 * t2 + C2 * t3), m);
        // The sums below need g = 0 beyond V; a recomputed g is not (the Maxwellian at the
        // padding nodes is not 0), so its last vector is masked.
        if constexpr (Sq) {
          if (m < L) g = g * simd::load<vec>(valid + j);
        }
        skn.add(W::of(g) * (W::of(ft) + W::table(vD + j) * W::of(fx)));
        gmom.add_gauss(g, e, vD + j, uw, Tw);
      }
      blk.park(0, r, gmom.s0);
      blk.park(1, r, gmom.s1);
      blk.park(2, r, gmom.s2);
      blk.park(3, r, skn);
    }
    outs.flush(ib, nr);
    blk.reduce(nr);
    for (int r = 0; r < nr; ++r) {
      const int64_t i = ib + r;
      const double rr = a.rho[i], uu = a.u[i], TT = a.Tm[i], rt = a.rho_t[i], ut = a.u_t[i], Tt = a.T_t[i];
      const double c0 = a.gC[3 * i], c1 = a.gC[3 * i + 1], c2 = a.gC[3 * i + 2];
      const double s0 = a.gS[3 * i], s1 = a.gS[3 * i + 1], s2 = a.gS[3 * i + 2];
      const double cm = gc.coef[r];
      const double sm0 = cm * blk.sums[0][r], sm1 = cm * blk.sums[1][r], sm2 = cm * blk.sums[2][r];
      const double q = uu * uu + TT;
      // The Maxwellian enters the kinetic residual with a minus sign (see maxwellian_backward).
      a.rows[0][i] = static_cast<T>(-sm0 + c1 * ut + c2 * (uu * ut + 0.5 * Tt) + s0 + s1 * uu + 0.5 * s2 * q);
      a.rows[1][i] = static_cast<T>(-rr * sm1 / TT + c1 * rt + c2 * (rt * uu + rr * ut) + s1 * rr + s2 * rr * uu);
      a.rows[2][i] = static_cast<T>(-rr * sm2 * 0.5 / (TT * TT) + 0.5 * c2 * rt + 0.5 * s2 * rr);
      a.rows[3][i] = static_cast<T>(c0 + c1 * uu + 0.5 * c2 * q);
      a.rows[4][i] = static_cast<T>(c1 * rr + c2 * rr * uu);
      a.rows[5][i] = static_cast<T>(0.5 * c2 * rr);
      a.rows[6][i] = static_cast<T>(blk.sums[3][r]);
    }
  }
  outs.finish();
}
HRGRAD_SIMD_DISPATCH(bgk_backward_rows, bgk_backward_rows_impl)

using BgkGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The backward of bgk_residuals (Sq false: gK [N, V], F unused) and of bgk_residuals_sq (Sq true:
// gK = grad_kinetic_sq [N]); the inputs are validated by the caller.
template <bool Sq>
BgkGrads bgk_backward_cpu(const Tensor& gK_, const Tensor& gC_, const Tensor& gS_, const Tensor& F_,
                          const Tensor& Ft_, const Tensor& Fx_, const Tensor& rho_, const Tensor& u_,
                          const Tensor& T_, const Tensor& rho_t_, const Tensor& u_t_, const Tensor& T_t_,
                          const Tensor& v, const Tensor& w, const Tensor& kn_, int64_t ks) {
  const Tensor gK = make_contiguous(gK_), gC = make_contiguous(gC_), gS = make_contiguous(gS_),
               F = Sq ? make_contiguous(F_) : F_, Ft = make_contiguous(Ft_), Fx = make_contiguous(Fx_),
               rho = make_contiguous(rho_), u = make_contiguous(u_), T = make_contiguous(T_),
               rho_t = make_contiguous(rho_t_), u_t = make_contiguous(u_t_), T_t = make_contiguous(T_t_),
               kn = make_contiguous(kn_);
  const int64_t N = Ft.size(0), nv = Ft.size(1);
  const Tensor& opt = Ft;  // outputs: Ft's dtype and device
  Tensor dF = empty_on(opt, {N, nv}), dFt = empty_on(opt, {N, nv}), dFx = empty_on(opt, {N, nv});
  // drho, du, dT, drho_t, du_t, dT_t, dkn: separate tensors (outputs of an op must not alias).
  std::vector<Tensor> rows;
  for (int r = 0; r < 7; ++r) rows.push_back(empty_on(opt, {N}));
  const int vb = simd::vector_bytes();
  HRGRAD_DISPATCH_FLOATING(Ft.scalar_type(), "bgk_residuals_backward_cpu", [&] {
    using T_ = scalar_t;
    const Tables<T_> tab = bgk_tables<T_>(v, w);
    BgkBackwardArgs<T_, Sq> args{gK.const_data_ptr<T_>(),    gC.const_data_ptr<T_>(),   gS.const_data_ptr<T_>(),
                                 Sq ? F.const_data_ptr<T_>() : nullptr,
                                 Ft.const_data_ptr<T_>(),    Fx.const_data_ptr<T_>(),   rho.const_data_ptr<T_>(),
                                 u.const_data_ptr<T_>(),     T.const_data_ptr<T_>(),    rho_t.const_data_ptr<T_>(),
                                 u_t.const_data_ptr<T_>(),   T_t.const_data_ptr<T_>(),  kn.const_data_ptr<T_>(),
                                 ks,                         nv,                        &tab,
                                 dF.mutable_data_ptr<T_>(),  dFt.mutable_data_ptr<T_>(), dFx.mutable_data_ptr<T_>(),
                                 {},
                                 3 * N * nv * static_cast<int64_t>(sizeof(T_)) > kStreamBytes};
    for (int r = 0; r < 7; ++r) args.rows[r] = rows[r].mutable_data_ptr<T_>();
    const BgkBackwardArgs<T_, Sq>& cargs = args;
    parallel_for(0, N, row_grain(nv), [&](int64_t r0, int64_t r1) { bgk_backward_rows(vb, cargs, r0, r1); });
  });
  return {dF, dFt, dFx, rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], rows[6]};
}

BgkGrads bgk_residuals_backward_cpu(const Tensor& gK, const Tensor& gC, const Tensor& gS, const Tensor& Ft,
                                    const Tensor& Fx, const Tensor& rho, const Tensor& u, const Tensor& T,
                                    const Tensor& rho_t, const Tensor& u_t, const Tensor& T_t, const Tensor& v,
                                    const Tensor& w, const Tensor& kn) {
  const int64_t ks = check_bgk_backward(gK, gC, gS, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn);
  return bgk_backward_cpu<false>(gK, gC, gS, Ft, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn, ks);
}

BgkGrads bgk_residuals_sq_backward_cpu(const Tensor& gQ, const Tensor& gC, const Tensor& gS, const Tensor& F,
                                       const Tensor& Ft, const Tensor& Fx, const Tensor& rho, const Tensor& u,
                                       const Tensor& T, const Tensor& rho_t, const Tensor& u_t, const Tensor& T_t,
                                       const Tensor& v, const Tensor& w, const Tensor& kn) {
  const int64_t ks = check_bgk_sq_backward(gQ, gC, gS, F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn);
  return bgk_backward_cpu<true>(gQ, gC, gS, F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn, ks);
}

// ---- transport_mm_residuals ----------------------------------------------------------------

// Per-call tables of the normalised average <phi> = sum w phi / W: row 0 v, row 1
// wn_j = w_j / W, row 2 c_j = w_j (v_j - vbar) / W with vbar = <v>. <v g_x> = sum_j c_j Graw_x,j
// exactly (g_x is Graw_x minus its average), and centring v instead of Graw_x avoids
// cancelling a large row mean of Graw_x. Row 3: the valid-node mask (1 at the nodes, 0 in the
// padding), for the loss forms, whose recomputed residual is not 0 in the padding; row 4: v^2.
// sv1, sv2: sum_j v_j and sum_j v_j^2 (unweighted).
template <class T>
struct TransportTables : Tables<T> {
  double vbar = 0.0, sv1 = 0.0, sv2 = 0.0;
  TransportTables(const Tensor& vt, const Tensor& wt) : Tables<T>(vt.size(0), 5) {
    const std::vector<double> v = as_double(vt), w = as_double(wt);
    double W = 0.0, Wv = 0.0;
    for (size_t j = 0; j < v.size(); ++j) {
      W += w[j];
      Wv += w[j] * v[j];
    }
    vbar = Wv / W;
    for (size_t j = 0; j < v.size(); ++j) {
      this->set(0, static_cast<int64_t>(j), v[j]);
      this->set(1, static_cast<int64_t>(j), w[j] / W);
      this->set(2, static_cast<int64_t>(j), w[j] * (v[j] - vbar) / W);
      this->set(3, static_cast<int64_t>(j), 1.0);
      this->set(4, static_cast<int64_t>(j), v[j] * v[j]);
      sv1 += v[j];
      sv2 += v[j] * v[j];
    }
  }
};

// Sq: the loss form (transport_mm_residuals_sq): micro is the [N] row sums of squares of the
// micro residual, g is not written.
template <class T, bool Sq>
struct TransportArgs {
  const T *G, *Gt, *Gx, *rho_t, *rho_x, *eps;
  int64_t es, nv;
  const TransportTables<T>* tab;
  T *g, *micro, *macro;
};

// micro = eps^2 g_t + eps (v g_x - a) + v rho_x + g of one vector of a row, from the raw fields
// and the row's averages (the forward op and the backward of its loss form).
template <int B, class T>
struct MicroRow {
  using vec = typename Lanes<B, T>::vec;
  vec mg, mt, mx, e2, e, a, rx;
  HRGRAD_INLINE MicroRow(double mg_, double mt_, double mx_, double eps, double a_, double rho_x)
      : mg(bcast<B, T>(mg_)), mt(bcast<B, T>(mt_)), mx(bcast<B, T>(mx_)), e2(bcast<B, T>(eps * eps)),
        e(bcast<B, T>(eps)), a(bcast<B, T>(a_)), rx(bcast<B, T>(rho_x)) {}
  HRGRAD_INLINE vec g(const T* G, int64_t m) const { return ld<B, T>(G, m) - mg; }
  HRGRAD_INLINE vec micro(vec g, const T* Gt, const T* Gx, vec vv, int64_t m) const {
    return e2 * (ld<B, T>(Gt, m) - mt) + e * (vv * (ld<B, T>(Gx, m) - mx) - a) + vv * rx + g;
  }
};

template <int B, class T, bool Sq>
HRGRAD_INLINE void transport_rows_impl(const TransportArgs<T, Sq>& a, const int64_t& r0, const int64_t& r1) {
  using vec = typename Lanes<B, T>::vec;
  using W = Wide<B, T>;
  using Block = RowBlock<B, 4>;
  constexpr int64_t L = Lanes<B, T>::L;
  const int64_t nv = a.nv;
  const T *vT = a.tab->Tt(0), *valid = a.tab->Tt(3);
  const double *wn = a.tab->D(1), *cc = a.tab->D(2);
  Block blk;
  RowBlock<B, 1> sq;
  for (int64_t ib = r0; ib < r1; ib += Block::R) {
    const int nr = static_cast<int>(std::min<int64_t>(Block::R, r1 - ib));
    // Pass 1 over the block's rows (in L1 afterwards): the three averages and a = <v g_x>.
    for (int r = 0; r < nr; ++r) {
      const int64_t o = (ib + r) * nv;
      W mg = W::zero(), mt = W::zero(), mx = W::zero(), aa = W::zero();
      for (int64_t j = 0; j < nv; j += L) {
        const int64_t m = nv - j;
        const W x = W::of(ld<B, T>(a.Gx + o + j, m));
        mg.add_mul(W::of(ld<B, T>(a.G + o + j, m)), wn + j);
        mt.add_mul(W::of(ld<B, T>(a.Gt + o + j, m)), wn + j);
        mx.add_mul(x, wn + j);
        aa.add_mul(x, cc + j);
      }
      blk.park(0, r, mg);
      blk.park(1, r, mt);
      blk.park(2, r, mx);
      blk.park(3, r, aa);
    }
    blk.reduce(nr);
    // Pass 2: micro (and g), or the sum of micro^2.
    for (int r = 0; r < nr; ++r) {
      const int64_t i = ib + r, o = i * nv;
      const double av = blk.sums[3][r];
      const MicroRow<B, T> mr(blk.sums[0][r], blk.sums[1][r], blk.sums[2][r], a.eps[i * a.es], av, a.rho_x[i]);
      W s2 = W::zero();
      for (int64_t j = 0; j < nv; j += L) {
        const int64_t m = nv - j;
        const vec vv = simd::load<vec>(vT + j), g = mr.g(a.G + o + j, m);
        const vec micro = mr.micro(g, a.Gt + o + j, a.Gx + o + j, vv, m);
        if constexpr (Sq) {
          const W wm = W::of(m >= L ? micro : micro * simd::load<vec>(valid + j));  // not 0 beyond V
          s2.add(wm * wm);
        } else {
          st<B, T>(a.g + o + j, g, m);
          st<B, T>(a.micro + o + j, micro, m);
        }
      }
      a.macro[i] = static_cast<T>(static_cast<double>(a.rho_t[i]) + av);
      if constexpr (Sq) sq.park(0, r, s2);
    }
    if constexpr (Sq) {
      sq.reduce(nr);
      for (int r = 0; r < nr; ++r) a.micro[ib + r] = static_cast<T>(sq.sums[0][r]);
    }
  }
}
HRGRAD_SIMD_DISPATCH(transport_rows, transport_rows_impl)

// transport_mm_residuals (Sq false: g, micro, macro) and transport_mm_residuals_sq (Sq true:
// g undefined, micro_sq, macro).
template <bool Sq>
std::tuple<Tensor, Tensor, Tensor> transport_forward_cpu(
    const Tensor& G_, const Tensor& Gt_, const Tensor& Gx_, const Tensor& rho_t_,
    const Tensor& rho_x_, const Tensor& v, const Tensor& w, const Tensor& eps_) {
  const int64_t es = check_transport(G_, Gt_, Gx_, rho_t_, rho_x_, v, w, eps_,
                                     Sq ? "transport_mm_residuals_sq" : "transport_mm_residuals");
  const Tensor G = make_contiguous(G_), Gt = make_contiguous(Gt_), Gx = make_contiguous(Gx_),
                   rho_t = make_contiguous(rho_t_), rho_x = make_contiguous(rho_x_), eps = make_contiguous(eps_);
  const int64_t N = G.size(0), nv = G.size(1);
  Tensor g = Sq ? Tensor() : empty_on(G, {N, nv}), micro = Sq ? empty_on(G, {N}) : empty_on(G, {N, nv}),
         macro = empty_on(G, {N});
  const int vb = simd::vector_bytes();
  HRGRAD_DISPATCH_FLOATING(G.scalar_type(), "transport_mm_residuals_cpu", [&] {
    using T_ = scalar_t;
    const TransportTables<T_> tab(v, w);
    const TransportArgs<T_, Sq> args{G.const_data_ptr<T_>(),     Gt.const_data_ptr<T_>(),      Gx.const_data_ptr<T_>(),
                                     rho_t.const_data_ptr<T_>(), rho_x.const_data_ptr<T_>(),   eps.const_data_ptr<T_>(),
                                     es,                         nv,                           &tab,
                                     Sq ? nullptr : g.mutable_data_ptr<T_>(), micro.mutable_data_ptr<T_>(),
                                     macro.mutable_data_ptr<T_>()};
    parallel_for(0, N, row_grain(nv), [&](int64_t r0, int64_t r1) { transport_rows(vb, args, r0, r1); });
  });
  return {g, micro, macro};
}

std::tuple<Tensor, Tensor> transport_mm_residuals_sq_cpu(const Tensor& G, const Tensor& Gt, const Tensor& Gx,
                                                          const Tensor& rho_t, const Tensor& rho_x, const Tensor& v,
                                                          const Tensor& w, const Tensor& eps) {
  auto [g, micro_sq, macro] = transport_forward_cpu<true>(G, Gt, Gx, rho_t, rho_x, v, w, eps);
  return {micro_sq, macro};
}

// Sq: the backward of transport_mm_residuals_sq: gm is grad_micro_sq [N], gg is unused (0), and
// the incoming gradient of micro, 2 gm_i micro_ij, is recomputed from G, Gt, Gx and rho_x.
template <class T, bool Sq>
struct TransportBackwardArgs {
  const T *gg, *gm, *gc, *G, *Gt, *Gx, *rho_x, *eps;
  int64_t es, nv;
  const TransportTables<T>* tab;
  T *dG, *dGt, *dGx, *drho_x, *deps;
  bool stream;  // dG, dGt, dGx with streaming stores (BlockOutputs)
};

template <int B, class T, bool Sq>
HRGRAD_INLINE void transport_backward_rows_impl(const TransportBackwardArgs<T, Sq>& a, const int64_t& r0,
                                                const int64_t& r1) {
  using vec = typename Lanes<B, T>::vec;
  using W = Wide<B, T>;
  using Block = RowBlock<B, Sq ? 10 : 6>;  // Sq: slots 6-9, see pass 1
  constexpr int64_t L = Lanes<B, T>::L;
  const int64_t nv = a.nv;
  const T *vT = a.tab->Tt(0), *wnT = a.tab->Tt(1), *valid = a.tab->Tt(3);
  const double *vD = a.tab->D(0), *wn = a.tab->D(1), *cc = a.tab->D(2), *v2D = a.tab->D(4);
  const double vbar = a.tab->vbar;
  Block blk;
  RowBlock<B, 1> deps;
  BlockOutputs<B, T, 3> outs({a.dG, a.dGt, a.dGx}, a.stream, nv, Block::R);
  for (int64_t ib = r0; ib < r1; ib += Block::R) {
    const int nr = static_cast<int>(std::min<int64_t>(Block::R, r1 - ib));
    // Pass 1: sums of the incoming gradients and the forward averages needed for deps. Sq: the
    // averages and raw sums of the fields, from which those of gm = 2 grad_micro_sq micro follow
    // in closed form (below), so that micro is recomputed once per element, not twice.
    for (int r = 0; r < nr; ++r) {
      const int64_t o = (ib + r) * nv;
      W Sgm = W::zero(), Sm = W::zero(), Svm = W::zero(), mt = W::zero(), mx = W::zero(), aa = W::zero();
      W mg = W::zero(), svG = W::zero(), svGx = W::zero(), sv2Gx = W::zero();
      for (int64_t j = 0; j < nv; j += L) {
        const int64_t m = nv - j;
        const W x = W::of(ld<B, T>(a.Gx + o + j, m)), t = W::of(ld<B, T>(a.Gt + o + j, m));
        if constexpr (Sq) {
          // slots 0, 1, 2: sum G, sum Gt, sum v Gt
          const W G = W::of(ld<B, T>(a.G + o + j, m));
          mg.add_mul(G, wn + j);
          Sgm.add(G);
          Sm.add(t);
          Svm.add_mul(t, vD + j);
          svG.add_mul(G, vD + j);
          svGx.add_mul(x, vD + j);
          sv2Gx.add_mul(x, v2D + j);
        } else {
          const W gm = W::of(ld<B, T>(a.gm + o + j, m));
          Sgm.add(W::of(ld<B, T>(a.gg + o + j, m)) + gm);
          Sm.add(gm);
          Svm.add_mul(gm, vD + j);
        }
        mt.add_mul(t, wn + j);
        mx.add_mul(x, wn + j);
        aa.add_mul(x, cc + j);
      }
      blk.park(0, r, Sgm);
      blk.park(1, r, Sm);
      blk.park(2, r, Svm);
      blk.park(3, r, mt);
      blk.park(4, r, mx);
      blk.park(5, r, aa);
      if constexpr (Sq) {
        blk.park(6, r, mg);
        blk.park(7, r, svG);
        blk.park(8, r, svGx);
        blk.park(9, r, sv2Gx);
      }
    }
    blk.reduce(nr);
    if constexpr (Sq) {
      // sum_j micro_j and sum_j v_j micro_j from the sums, with micro_j = eps^2 (Gt_j - mt)
      // + eps (v_j (Gx_j - mx) - a) + v_j rho_x + G_j - mg over the V nodes (float64 sums of the
      // float32 fields: the cancellation of the means costs ~1e-16 of the row's magnitude).
      const double nvd = static_cast<double>(nv), s1 = a.tab->sv1, s2 = a.tab->sv2;
      for (int r = 0; r < nr; ++r) {
        const int64_t i = ib + r;
        const double e = a.eps[i * a.es], rx = a.rho_x[i], q2 = 2.0 * static_cast<double>(a.gm[i]);
        const double sG = blk.sums[0][r], sGt = blk.sums[1][r], svGt = blk.sums[2][r], mt = blk.sums[3][r],
                     mx = blk.sums[4][r], av = blk.sums[5][r], mg = blk.sums[6][r], svG = blk.sums[7][r],
                     svGx = blk.sums[8][r], sv2Gx = blk.sums[9][r];
        const double sum_micro = e * e * (sGt - nvd * mt) + e * (svGx - mx * s1 - nvd * av) + rx * s1 + sG - nvd * mg;
        const double sum_vmicro = e * e * (svGt - mt * s1) + e * (sv2Gx - mx * s2 - av * s1) + rx * s2 + svG - mg * s1;
        blk.sums[0][r] = blk.sums[1][r] = q2 * sum_micro;  // gg = 0: sum (gg + gm) = sum gm
        blk.sums[2][r] = q2 * sum_vmicro;
      }
    }
    for (int r = 0; r < nr; ++r) {
      const int64_t i = ib + r, o = i * nv;
      T *dG = outs.row(0, ib, r), *dGt = outs.row(1, ib, r), *dGx = outs.row(2, ib, r);
      const double e = a.eps[i * a.es], C = a.gc[i], sm = blk.sums[1][r], svm = blk.sums[2][r];
      // With P phi = phi - <phi> (adjoint P^T psi = psi - (w/W) sum psi):
      //   dGraw   = P^T (grad_g + grad_micro)
      //   dGraw_t = eps^2 P^T grad_micro
      //   dGraw_x = P^T q,  q_j = eps v_j Gm_j + (C - eps Sm) w_j v_j / W   (a = sum_j (w_j v_j/W) g_x,j)
      //   sum_j q_j = eps Svm + (C - eps Sm) vbar
      const double Bc = C - e * sm, Q = e * svm + Bc * vbar;
      const vec vsgm = bcast<B, T>(blk.sums[0][r]), vsm = bcast<B, T>(sm), ve = bcast<B, T>(e),
                e2 = bcast<B, T>(e * e), vB = bcast<B, T>(Bc), vQ = bcast<B, T>(Q), twoe = bcast<B, T>(2.0 * e),
                vmt = bcast<B, T>(blk.sums[3][r]), vmx = bcast<B, T>(blk.sums[4][r]),
                va = bcast<B, T>(blk.sums[5][r]);
      const MicroRow<B, T> mr(Sq ? blk.sums[6][r] : 0.0, blk.sums[3][r], blk.sums[4][r], e, blk.sums[5][r],
                              Sq ? static_cast<double>(a.rho_x[i]) : 0.0);
      const vec q2 = bcast<B, T>(Sq ? 2.0 * static_cast<double>(a.gm[i]) : 0.0);
      W de = W::zero();
      for (int64_t j = 0; j < nv; j += L) {
        const int64_t m = nv - j;
        const vec vv = simd::load<vec>(vT + j), wv = simd::load<vec>(wnT + j);
        vec gm, gsumj;  // the gradient of micro, and of micro + g
        if constexpr (Sq) {
          gm = q2 * mr.micro(mr.g(a.G + o + j, m), a.Gt + o + j, a.Gx + o + j, vv, m);
          if (m < L) gm = gm * simd::load<vec>(valid + j);  // not 0 beyond V (the deps sum below)
          gsumj = gm;
        } else {
          gm = ld<B, T>(a.gm + o + j, m);
          gsumj = ld<B, T>(a.gg + o + j, m) + gm;
        }
        st<B, T>(dG + j, gsumj - wv * vsgm, m);
        st<B, T>(dGt + j, e2 * (gm - wv * vsm), m);
        st<B, T>(dGx + j, ve * vv * gm + wv * (vB * vv - vQ), m);
        // d micro_j / d eps = 2 eps g_t,j + v_j g_x,j - a
        const vec dm = twoe * (ld<B, T>(a.Gt + o + j, m) - vmt) + vv * (ld<B, T>(a.Gx + o + j, m) - vmx) - va;
        de.add(W::of(gm) * W::of(dm));
      }
      a.drho_x[i] = static_cast<T>(svm);
      deps.park(0, r, de);
    }
    outs.flush(ib, nr);
    deps.reduce(nr);
    for (int r = 0; r < nr; ++r) a.deps[ib + r] = static_cast<T>(deps.sums[0][r]);
  }
  outs.finish();
}
HRGRAD_SIMD_DISPATCH(transport_backward_rows, transport_backward_rows_impl)

using TransportGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// The backward of transport_mm_residuals (Sq false: gg, gm [N, V]; G, rho_x unused) and of
// transport_mm_residuals_sq (Sq true: gm = grad_micro_sq [N], gg unused); validated by the caller.
template <bool Sq>
TransportGrads transport_backward_cpu(const Tensor& gg_, const Tensor& gm_, const Tensor& gc_, const Tensor& G_,
                                      const Tensor& Gt_, const Tensor& Gx_, const Tensor& rho_x_, const Tensor& v,
                                      const Tensor& w, const Tensor& eps_, int64_t es) {
  const Tensor gg = Sq ? gg_ : make_contiguous(gg_), gm = make_contiguous(gm_), gc = make_contiguous(gc_),
               G = Sq ? make_contiguous(G_) : G_, Gt = make_contiguous(Gt_), Gx = make_contiguous(Gx_),
               rho_x = Sq ? make_contiguous(rho_x_) : rho_x_, eps = make_contiguous(eps_);
  const int64_t N = Gt.size(0), nv = Gt.size(1);
  const Tensor& opt = Gt;  // outputs: Gt's dtype and device
  Tensor dG = empty_on(opt, {N, nv}), dGt = empty_on(opt, {N, nv}), dGx = empty_on(opt, {N, nv});
  Tensor drho_x = empty_on(opt, {N}), deps = empty_on(opt, {N});
  const int vb = simd::vector_bytes();
  HRGRAD_DISPATCH_FLOATING(Gt.scalar_type(), "transport_mm_residuals_backward_cpu", [&] {
    using T_ = scalar_t;
    const TransportTables<T_> tab(v, w);
    const TransportBackwardArgs<T_, Sq> args{
        Sq ? nullptr : gg.const_data_ptr<T_>(), gm.const_data_ptr<T_>(), gc.const_data_ptr<T_>(),
        Sq ? G.const_data_ptr<T_>() : nullptr,  Gt.const_data_ptr<T_>(), Gx.const_data_ptr<T_>(),
        Sq ? rho_x.const_data_ptr<T_>() : nullptr, eps.const_data_ptr<T_>(), es, nv, &tab,
        dG.mutable_data_ptr<T_>(), dGt.mutable_data_ptr<T_>(), dGx.mutable_data_ptr<T_>(),
        drho_x.mutable_data_ptr<T_>(), deps.mutable_data_ptr<T_>(),
        3 * N * nv * static_cast<int64_t>(sizeof(T_)) > kStreamBytes};
    parallel_for(0, N, row_grain(nv), [&](int64_t r0, int64_t r1) {
      transport_backward_rows(vb, args, r0, r1);
    });
  });
  return {dG, dGt, dGx, drho_x, deps};
}

TransportGrads transport_mm_residuals_backward_cpu(const Tensor& gg, const Tensor& gm, const Tensor& gc,
                                                   const Tensor& Gt, const Tensor& Gx, const Tensor& v,
                                                   const Tensor& w, const Tensor& eps) {
  const int64_t es = check_transport_backward(gg, gm, gc, Gt, Gx, v, w, eps);
  return transport_backward_cpu<false>(gg, gm, gc, Gt, Gt, Gx, gc, v, w, eps, es);
}

TransportGrads transport_mm_residuals_sq_backward_cpu(const Tensor& gQ, const Tensor& gc, const Tensor& G,
                                                      const Tensor& Gt, const Tensor& Gx, const Tensor& rho_x,
                                                      const Tensor& v, const Tensor& w, const Tensor& eps) {
  const int64_t es = check_transport_sq_backward(gQ, gc, G, Gt, Gx, rho_x, v, w, eps);
  return transport_backward_cpu<true>(gQ, gQ, gc, G, Gt, Gx, rho_x, v, w, eps, es);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(hrgrad_ext, CPU, m) {
  m.impl("velocity_moments", TORCH_BOX(&velocity_moments_cpu));
  m.impl("velocity_moments_backward", TORCH_BOX(&velocity_moments_backward_cpu));
  m.impl("maxwellian", TORCH_BOX(&maxwellian_cpu));
  m.impl("maxwellian_backward", TORCH_BOX(&maxwellian_backward_cpu));
  m.impl("bgk_residuals", TORCH_BOX(&bgk_forward_cpu<false>));
  m.impl("bgk_residuals_sq", TORCH_BOX(&bgk_forward_cpu<true>));
  m.impl("bgk_residuals_sq_backward", TORCH_BOX(&bgk_residuals_sq_backward_cpu));
  m.impl("bgk_residuals_backward", TORCH_BOX(&bgk_residuals_backward_cpu));
  m.impl("transport_mm_residuals", TORCH_BOX(&transport_forward_cpu<false>));
  m.impl("transport_mm_residuals_sq", TORCH_BOX(&transport_mm_residuals_sq_cpu));
  m.impl("transport_mm_residuals_sq_backward", TORCH_BOX(&transport_mm_residuals_sq_backward_cpu));
  m.impl("transport_mm_residuals_backward", TORCH_BOX(&transport_mm_residuals_backward_cpu));
}

}  // namespace kinetic
}  // namespace hrgrad_ext
