// CPU kernels of the gram family: gram, hrgrad_weights, combine, combine_accumulate_.
//
// gram and combine read J once, so their floor is the memory bandwidth for small K and the
// FMA throughput for large K (gram does K(K+1)/2 products per column). Both are vectorised
// along the columns of J (common/simd.h picks AVX-512, AVX2 or SSE2 at run time) and
// parallelised over column chunks with torch's intra-op thread pool (stable ABI parallel_for).
#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/simd.h"
#include "gram/gram_common.h"

namespace hrgrad_ext {
namespace {

using simd::V;

// ---- gram -----------------------------------------------------------------------------------
//
// G = J J^T in column chunks. Within a chunk, register tiles of T x T row pairs accumulate
// their products lane-wise; at the end of the chunk every tile adds its lanes into float64
// accumulators. Two precisions, chosen by the output dtype:
//
// * float64 output (and float64 input): products of the inputs formed exactly in float64
//   (a float32 chunk is widened once into an L1-resident buffer) and summed in float64 -
//   the accuracy of float64 accumulation, at the float64 FMA rate.
// * float32 output from float16/bfloat16/float32 input: float32 products accumulated in
//   float32 lanes, each lane summing kGramLaneProducts products before they are added in
//   float64. The error of an entry is then bounded by about
//   (kGramLaneProducts + 1) u_32 sum_j |J_ij J_kj| whatever n (float32 accumulation over all
//   n columns would grow like n u_32), the same order as rounding the result to float32, at
//   twice the FMA rate of float64. (The CUDA kernel sums float64 products for every output
//   dtype, more accurate than this bound; docs/CUDA_DESIGN.md proposes this scheme there.)

// Products each float32 lane sums before they are added in float64 (the accuracy bound above)
constexpr int64_t kGramLaneProducts = 32;

template <int B, class T>
struct GramVec;
template <int B>
struct GramVec<B, float> {
  using type = typename V<B>::f32;
  static constexpr int kLanes = V<B>::kF32;
};
template <int B>
struct GramVec<B, double> {
  using type = typename V<B>::f64;
  static constexpr int kLanes = V<B>::kF64;
};

// Tile edge: T x T accumulators plus 2 T inputs must fit the registers (32 with AVX-512, 16
// otherwise).
template <int B>
constexpr int gram_tile_edge() {
  return B == 64 ? 4 : 3;
}

template <int B>
HRGRAD_INLINE void add_lanes(double* slot, typename V<B>::f32 acc) {
  using vd = typename V<B>::f64;
  simd::store(slot, simd::load<vd>(slot) + (simd::lo_f64<B>(acc) + simd::hi_f64<B>(acc)));
}
template <int B>
HRGRAD_INLINE void add_lanes(double* slot, typename V<B>::f64 acc) {
  using vd = typename V<B>::f64;
  simd::store(slot, simd::load<vd>(slot) + acc);
}

// Index of the pair (i, k), i <= k, in the packed upper triangle of a K x K matrix.
HRGRAD_INLINE int64_t pair_index(int64_t i, int64_t k, int64_t K) { return i * K - i * (i - 1) / 2 + (k - i); }

// Rows [i0, i0 + TA) against rows [k0, k0 + TB) over nvec vectors of the chunk (rows[r] is
// row r's chunk). kDiag: i0 == k0 and only the pairs k >= i are formed.
template <int B, class T, int TA, int TB, bool kDiag>
HRGRAD_INLINE void gram_tile(const T* const* rows, int64_t i0, int64_t k0, int64_t nvec, int64_t K, double* slots) {
  using vec = typename GramVec<B, T>::type;
  constexpr int L = GramVec<B, T>::kLanes;
  vec acc[TA][TB] = {};
  for (int64_t v = 0; v < nvec; ++v) {
    vec b[TB];
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) b[t] = simd::load<vec>(rows[k0 + t] + v * L);
#pragma GCC unroll 8
    for (int s = 0; s < TA; ++s) {
      const vec a = kDiag ? b[s] : simd::load<vec>(rows[i0 + s] + v * L);
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) {
        if (!kDiag || t >= s) acc[s][t] += a * b[t];
      }
    }
  }
  constexpr int Ld = V<B>::kF64;
#pragma GCC unroll 8
  for (int s = 0; s < TA; ++s) {
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
      if (!kDiag || t >= s) add_lanes<B>(slots + pair_index(i0 + s, k0 + t, K) * Ld, acc[s][t]);
    }
  }
}

// Runtime tile sizes (a, b <= edge) to the template above.
template <int B, class T, int E, int TA = E>
HRGRAD_INLINE void gram_tile_any(const T* const* rows, int64_t i0, int64_t k0, int64_t a, int64_t b,
                                 int64_t nvec, int64_t K, double* slots) {
  if constexpr (TA >= 1) {
    if (a != TA) return gram_tile_any<B, T, E, TA - 1>(rows, i0, k0, a, b, nvec, K, slots);
    if (i0 == k0) return gram_tile<B, T, TA, TA, true>(rows, i0, k0, nvec, K, slots);
    if (b == E) return gram_tile<B, T, TA, E, false>(rows, i0, k0, nvec, K, slots);
    if constexpr (E >= 4) {
      if (b == 3) return gram_tile<B, T, TA, 3, false>(rows, i0, k0, nvec, K, slots);
    }
    if (b == 2) return gram_tile<B, T, TA, 2, false>(rows, i0, k0, nvec, K, slots);
    return gram_tile<B, T, TA, 1, false>(rows, i0, k0, nvec, K, slots);
  }
}

// In: the input dtype (float or double); T: the dtype of the products (T = double for float
// input means the exact path).
template <class In, class T>
struct GramArgs {
  const In* J;  // [K, n] row-major (one batch entry)
  int64_t K, n;
};

// Columns per chunk: every lane sums kGramLaneProducts products of the chunk.
template <class T>
int64_t gram_chunk_columns(int vector_bytes) {
  return vector_bytes / static_cast<int64_t>(sizeof(T)) * kGramLaneProducts;
}

// Chunks [c0, c1) of one batch entry; adds the chunk sums to out[i * K + k] (i <= k).
template <int B, class In, class T>
HRGRAD_INLINE void gram_chunks_impl(const GramArgs<In, T>& g, const int64_t& c0, const int64_t& c1,
                                    double* const& out) {
  constexpr int L = GramVec<B, T>::kLanes, E = gram_tile_edge<B>(), Ld = V<B>::kF64;
  constexpr int64_t C = L * kGramLaneProducts;
  const int64_t K = g.K, n = g.n;
  std::vector<double> slots(static_cast<size_t>(K * (K + 1) / 2 * Ld), 0.0);
  std::vector<const T*> rows(K);
  std::vector<T> buf;  // the chunk widened to T, or a zero-padded copy of a partial last chunk
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t start = c * C, len = std::min(C, n - start);
    if (std::is_same_v<In, T> && len == C) {
      for (int64_t k = 0; k < K; ++k) rows[k] = reinterpret_cast<const T*>(g.J + k * n + start);
    } else {
      buf.resize(static_cast<size_t>(K * C));
      for (int64_t k = 0; k < K; ++k) {
        const In* src = g.J + k * n + start;
        T* dst = buf.data() + k * C;
        for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<T>(src[j]);
        for (int64_t j = len; j < C; ++j) dst[j] = T(0);
        rows[k] = dst;
      }
    }
    const int64_t nvec = (len + L - 1) / L;
    for (int64_t i0 = 0; i0 < K; i0 += E) {
      for (int64_t k0 = i0; k0 < K; k0 += E) {
        gram_tile_any<B, T, E>(rows.data(), i0, k0, std::min<int64_t>(E, K - i0), std::min<int64_t>(E, K - k0),
                               nvec, K, slots.data());
      }
    }
  }
  for (int64_t i = 0; i < K; ++i) {
    for (int64_t k = i; k < K; ++k) {
      out[i * K + k] += simd::hsum(simd::load<typename V<B>::f64>(slots.data() + pair_index(i, k, K) * Ld));
    }
  }
}
HRGRAD_SIMD_DISPATCH(gram_chunks, gram_chunks_impl)

template <class In, class T>
void gram_cpu_kernel(const In* J, int64_t B, int64_t K, int64_t n, double* G) {
  const int vb = simd::vector_bytes();
  const int64_t C = gram_chunk_columns<T>(vb);
  const int64_t nchunks = (n + C - 1) / C;
  // At least ~256k products per task, so that small inputs stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (C * K * (K + 1) / 2));
  // The chunks are split into one contiguous group per thread (at most), each group summing
  // into its own partial G: the stable ABI has no thread index, and fixed groups make the
  // result independent of the scheduling.
  const int64_t ngroups = std::max<int64_t>(1, std::min<int64_t>(num_threads(), (nchunks + grain - 1) / grain));
  std::vector<double> partial(static_cast<size_t>(ngroups) * K * K);
  for (int64_t b = 0; b < B; ++b) {
    const GramArgs<In, T> args{J + b * K * n, K, n};
    std::fill(partial.begin(), partial.end(), 0.0);
    parallel_for(0, ngroups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        int64_t c0 = g * nchunks / ngroups, c1 = (g + 1) * nchunks / ngroups;
        double* out = partial.data() + g * K * K;
        gram_chunks(vb, args, c0, c1, out);
      }
    });
    // Group partial sums added in group order: deterministic for a given thread count.
    double* Gb = G + b * K * K;
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t k = i; k < K; ++k) {
        double s = 0.0;
        for (int64_t g = 0; g < ngroups; ++g) s += partial[static_cast<size_t>(g) * K * K + i * K + k];
        Gb[i * K + k] = s;
        Gb[k * K + i] = s;
      }
    }
  }
}

Tensor gram_cpu(const Tensor& J, std::optional<ScalarType> dtype) {
  const Tensor Jb = as_batched_jacobian(J, "gram");
  const ScalarType out_dtype = gram_out_dtype(J, dtype);
  const int64_t B = Jb.size(0), K = Jb.size(1), n = Jb.size(2);
  std::vector<double> Gd(static_cast<size_t>(B * K * K));
  const ScalarType in = Jb.scalar_type();
  if (in == kDouble) {
    gram_cpu_kernel<double, double>(Jb.const_data_ptr<double>(), B, K, n, Gd.data());
  } else {
    // float16 / bfloat16 are widened to float32 (exactly) and take the float32 kernels.
    const Tensor Jf = in == kFloat ? Jb : to_dtype(Jb, kFloat);
    if (out_dtype == kDouble) gram_cpu_kernel<float, double>(Jf.const_data_ptr<float>(), B, K, n, Gd.data());
    else gram_cpu_kernel<float, float>(Jf.const_data_ptr<float>(), B, K, n, Gd.data());
  }
  Tensor G = empty_on(Jb, J.dim() == 2 ? std::vector<int64_t>{K, K} : std::vector<int64_t>{B, K, K}, out_dtype);
  if (out_dtype == kDouble) {
    std::copy(Gd.begin(), Gd.end(), G.mutable_data_ptr<double>());
  } else {
    std::transform(Gd.begin(), Gd.end(), G.mutable_data_ptr<float>(), [](double x) { return static_cast<float>(x); });
  }
  return G;
}

std::tuple<Tensor, Tensor> hrgrad_weights_cpu(const Tensor& G, std::string length_model,
                                                      std::optional<double> rcond) {
  const Tensor Gb = as_batched_gram(G);
  const int lm = parse_length_model(length_model);
  const double rtol = resolve_rcond(rcond, G);
  const int64_t B = Gb.size(0), K = Gb.size(1);
  Tensor w = empty_on(Gb, {B, K});
  Tensor status = empty_on(Gb, {B}, kInt);
  int* st = status.mutable_data_ptr<int>();
  HRGRAD_DISPATCH_FLOATING(Gb.scalar_type(), "hrgrad_weights_cpu", [&] {
    const scalar_t* g = Gb.const_data_ptr<scalar_t>();
    scalar_t* wp = w.mutable_data_ptr<scalar_t>();
    parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<double> ws(static_cast<size_t>(hrgrad_solve_workspace(K)));
      for (int64_t b = b0; b < b1; ++b) {
        st[b] = hrgrad_solve<scalar_t, scalar_t>(g + b * K * K, static_cast<int>(K), lm, rtol,
                                                 wp + b * K, ws.data());
      }
    });
  });
  if (G.dim() == 2) return {squeeze(w, 0), squeeze(status, 0)};
  return {w, status};
}

// ---- combine --------------------------------------------------------------------------------
//
// out[b, :] (+)= sum_k w[b, k] J[b, k, :], accumulated in acc_t (float32 for float16,
// bfloat16 and float32, float64 for float64). One read of J: per chunk of columns, groups of
// kCombineRows rows are added into a vector accumulator kept in L1 (the last group writes
// out), so each element of J is loaded once and the accumulator is touched K / kCombineRows
// times.

constexpr int kCombineRows = 8;
constexpr int64_t kCombineChunkBytes = 32768;

template <class T, bool kAccumulate>
struct CombineArgs {
  const T* J;     // [B, K, n]
  const T* w;     // [B, K]
  T* out;         // [B, n]
  int64_t K, n, nchunks;
};

// acc[j] (+)= sum_{k < G} w[k] rows[k][j] for j < len (len a multiple of the vector length
// but for the last vector): G row streams at once, two vectors per step for two independent
// FMA chains. kFirst: acc starts at 0; kLast: the result goes to out (added to it with
// kAccumulate) instead of acc.
template <int B, class T, int G, bool kFirst, bool kLast, bool kAccumulate>
HRGRAD_INLINE void combine_rows(const T* const* rows, const T* w, int64_t len, T* acc, T* out) {
  using vec = std::conditional_t<std::is_same_v<T, double>, typename V<B>::f64, typename V<B>::f32>;
  constexpr int64_t L = sizeof(vec) / sizeof(T);
  vec wk[G];
#pragma GCC unroll 8
  for (int k = 0; k < G; ++k) wk[k] = simd::splat<vec>(w[k]);
  const int64_t full = len / L * L;
  int64_t j = 0;
  for (; j + 2 * L <= full; j += 2 * L) {
    vec a0 = kFirst ? vec{} : simd::load<vec>(acc + j), a1 = kFirst ? vec{} : simd::load<vec>(acc + j + L);
#pragma GCC unroll 8
    for (int k = 0; k < G; ++k) {
      a0 += wk[k] * simd::load<vec>(rows[k] + j);
      a1 += wk[k] * simd::load<vec>(rows[k] + j + L);
    }
    if (kLast) {
      if (kAccumulate) {
        a0 = simd::load<vec>(out + j) + a0;
        a1 = simd::load<vec>(out + j + L) + a1;
      }
      simd::store(out + j, a0);
      simd::store(out + j + L, a1);
    } else {
      simd::store(acc + j, a0);
      simd::store(acc + j + L, a1);
    }
  }
  for (; j < len; j += L) {
    const int64_t m = std::min(L, len - j);
    vec a0 = kFirst ? vec{} : simd::load_partial<vec>(acc + j, m);
#pragma GCC unroll 8
    for (int k = 0; k < G; ++k) a0 += wk[k] * simd::load_partial<vec>(rows[k] + j, m);
    if (kLast) {
      if (kAccumulate) a0 = simd::load_partial<vec>(out + j, m) + a0;
      simd::store_partial(out + j, a0, m);
    } else {
      simd::store_partial(acc + j, a0, m);
    }
  }
}

template <int B, class T, bool kFirst, bool kLast, bool kAccumulate, int G = kCombineRows>
HRGRAD_INLINE void combine_rows_any(int64_t g, const T* const* rows, const T* w, int64_t len, T* acc, T* out) {
  if constexpr (G >= 1) {
    if (g != G) return combine_rows_any<B, T, kFirst, kLast, kAccumulate, G - 1>(g, rows, w, len, acc, out);
    combine_rows<B, T, G, kFirst, kLast, kAccumulate>(rows, w, len, acc, out);
  }
}

template <int B, class T, bool kAccumulate>
HRGRAD_INLINE void combine_tasks_impl(const CombineArgs<T, kAccumulate>& a, const int64_t& t0, const int64_t& t1) {
  constexpr int64_t C = kCombineChunkBytes / sizeof(T);
  const int64_t K = a.K, n = a.n;
  T buf[C];
  const T* rows[kCombineRows];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / a.nchunks, start = (t % a.nchunks) * C;
    const int64_t len = std::min(C, n - start);
    const T* Jb = a.J + b * K * n + start;
    const T* wb = a.w + b * K;
    T* ob = a.out + b * n + start;
    for (int64_t g0 = 0; g0 < K; g0 += kCombineRows) {
      const int64_t g = std::min<int64_t>(kCombineRows, K - g0);
      for (int64_t k = 0; k < g; ++k) rows[k] = Jb + (g0 + k) * n;
      const bool first = g0 == 0, last = g0 + g == K;
      if (first && last) combine_rows_any<B, T, true, true, kAccumulate>(g, rows, wb + g0, len, buf, ob);
      else if (first) combine_rows_any<B, T, true, false, kAccumulate>(g, rows, wb + g0, len, buf, ob);
      else if (last) combine_rows_any<B, T, false, true, kAccumulate>(g, rows, wb + g0, len, buf, ob);
      else combine_rows_any<B, T, false, false, kAccumulate>(g, rows, wb + g0, len, buf, ob);
    }
  }
}
HRGRAD_SIMD_DISPATCH(combine_tasks, combine_tasks_impl)

// out (+)= J^T w for float32 / float64 (w in J's dtype).
template <class T, bool kAccumulate>
void combine_cpu_kernel(const T* J, const T* w, int64_t B, int64_t K, int64_t n, T* out) {
  const int vb = simd::vector_bytes();
  constexpr int64_t C = kCombineChunkBytes / sizeof(T);
  const int64_t nchunks = (n + C - 1) / C;
  const CombineArgs<T, kAccumulate> args{J, w, out, K, n, nchunks};
  // At least ~64k elements of J per task.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (C * K));
  parallel_for(0, B * nchunks, grain, [&](int64_t t0, int64_t t1) { combine_tasks(vb, args, t0, t1); });
}

// float16 / bfloat16: J is widened to float32 (exactly), combined with float32 accumulation
// and rounded once to J's dtype, as the float32 kernel would do lane by lane.
Tensor combine_cpu(const Tensor& J, const Tensor& w) {
  const Tensor Jb = as_batched_jacobian(J, "combine");
  check_combine_weights(J, w, "combine");
  const int64_t B = Jb.size(0), K = Jb.size(1), n = Jb.size(2);
  const ScalarType in = Jb.scalar_type(), acc = acc_type_of(in);
  const Tensor Jc = to_dtype(Jb, acc);
  const Tensor wb = make_contiguous(to_dtype(w, acc));
  Tensor out = empty_on(Jb, J.dim() == 2 ? std::vector<int64_t>{n} : std::vector<int64_t>{B, n}, acc);
  HRGRAD_DISPATCH_FLOATING(acc, "combine_cpu", [&] {
    combine_cpu_kernel<scalar_t, false>(Jc.const_data_ptr<scalar_t>(), wb.const_data_ptr<scalar_t>(), B, K, n,
                                        out.mutable_data_ptr<scalar_t>());
  });
  return to_dtype(out, in);
}

void combine_accumulate_cpu(Tensor out, const Tensor& J, const Tensor& w) {
  const Tensor Jb = check_combine_accumulate(out, J, w);
  const int64_t K = Jb.size(1), n = Jb.size(2);
  const ScalarType in = Jb.scalar_type(), acc = acc_type_of(in);
  const Tensor wb = make_contiguous(to_dtype(w, acc));
  if (in != acc) {
    // float16 / bfloat16: out + (J^T w in float32), rounded once.
    Tensor sum = empty_on(Jb, {n}, acc);
    const Tensor J32 = to_dtype(Jb, acc);
    combine_cpu_kernel<float, false>(J32.const_data_ptr<float>(), wb.const_data_ptr<float>(), 1, K, n,
                                     sum.mutable_data_ptr<float>());
    const float* s = sum.const_data_ptr<float>();
    HRGRAD_DISPATCH_FLOATING_AND_HALF(in, "combine_accumulate_cpu", [&] {
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(static_cast<float>(o[j]) + s[j]);
    });
    return;
  }
  HRGRAD_DISPATCH_FLOATING(acc, "combine_accumulate_cpu", [&] {
    combine_cpu_kernel<scalar_t, true>(Jb.const_data_ptr<scalar_t>(), wb.const_data_ptr<scalar_t>(), 1, K, n,
                                       out.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(hrgrad_ext, CPU, m) {
  m.impl("gram", TORCH_BOX(&gram_cpu));
  m.impl("hrgrad_weights", TORCH_BOX(&hrgrad_weights_cpu));
  m.impl("combine", TORCH_BOX(&combine_cpu));
  m.impl("combine_accumulate_", TORCH_BOX(&combine_accumulate_cpu));
}

}  // namespace hrgrad_ext
