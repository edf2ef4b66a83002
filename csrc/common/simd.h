// Portable SIMD for the CPU kernels: GCC/Clang vector extensions, compiled for the widest
// instruction set the CPU has and picked at run time.
//
// The build has no -march flags (a wheel must run on any x86-64), so a kernel is written once
// as an always-inline template over the vector width in bytes (B = 16: SSE2, 32: AVX2 + FMA,
// 64: AVX-512) and instantiated inside functions compiled for that instruction set
// (HRGRAD_SIMD_DISPATCH). Everything the kernel calls must be inlined into those functions,
// otherwise it would be compiled for the baseline and the vectors lowered to SSE2: hence
// HRGRAD_INLINE on every helper (and no lambdas inside kernels).
//
// The instruction set is detected once; the environment variable HRGRAD_EXT_CPU_ISA
// (``avx512``, ``avx2`` or ``sse2``) caps it, read on every op call, so the tests can run every
// path on one machine and a user can compare them. A cap above what the CPU has is ignored.
// On non-x86 targets there is one width, 16 bytes (NEON on aarch64).
#pragma once

#if !defined(__GNUC__)
#error "hrgrad_ext's CPU kernels need GCC or Clang (vector extensions)"
#endif

#include <bit>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of inlined helpers never cross an ABI
#endif

#define HRGRAD_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) || defined(__i386__)
#define HRGRAD_SIMD_X86 1
#if defined(__clang__)
#define HRGRAD_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,f16c")))
#else
#define HRGRAD_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,f16c,prefer-vector-width=512")))
#endif
#define HRGRAD_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define HRGRAD_SIMD_X86 0
#endif

namespace hrgrad_ext {
namespace simd {

// Vector types of B bytes: kF32 floats or kF64 doubles per vector.
template <int B>
struct V {
  static constexpr int kBytes = B, kF32 = B / 4, kF64 = B / 8;
  typedef float f32 __attribute__((vector_size(B)));
  typedef double f64 __attribute__((vector_size(B)));
  typedef int32_t i32 __attribute__((vector_size(B)));
  typedef int64_t i64 __attribute__((vector_size(B)));
  typedef float f32h __attribute__((vector_size(B / 2)));  // kF64 floats: one f64 vector's worth
};

// Vector width of the best instruction set of this CPU, capped by HRGRAD_EXT_CPU_ISA.
inline int detected_vector_bytes() {
#if HRGRAD_SIMD_X86
  static const int bytes = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return 64;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return 32;
    return 16;
  }();
  return bytes;
#else
  return 16;
#endif
}

inline int vector_bytes() {
  const int best = detected_vector_bytes();
  const char* cap = std::getenv("HRGRAD_EXT_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  int want = best;
  if (std::strcmp(cap, "sse2") == 0 || std::strcmp(cap, "baseline") == 0) want = 16;
  else if (std::strcmp(cap, "avx2") == 0) want = 32;
  else if (std::strcmp(cap, "avx512") == 0) want = 64;
  return want < best ? want : best;
}

inline const char* isa_name(int bytes) { return bytes == 64 ? "avx512" : bytes == 32 ? "avx2" : "sse2"; }

// Defines `void NAME(int bytes, ARGS...)` calling `IMPL<B>(args...)` compiled for the
// instruction set of width B. IMPL must be an always-inline function template.
#if HRGRAD_SIMD_X86
#define HRGRAD_SIMD_DISPATCH(NAME, IMPL)                                                     \
  template <class... A>                                                                       \
  HRGRAD_TARGET_AVX512 __attribute__((noinline)) void NAME##_avx512(A&... a) { IMPL<64>(a...); } \
  template <class... A>                                                                       \
  HRGRAD_TARGET_AVX2 __attribute__((noinline)) void NAME##_avx2(A&... a) { IMPL<32>(a...); }   \
  template <class... A>                                                                       \
  __attribute__((noinline)) void NAME##_sse2(A&... a) { IMPL<16>(a...); }                     \
  template <class... A>                                                                       \
  void NAME(int bytes, A&... a) {                                                            \
    if (bytes == 64) NAME##_avx512(a...);                                                     \
    else if (bytes == 32) NAME##_avx2(a...);                                                  \
    else NAME##_sse2(a...);                                                                   \
  }
#else
#define HRGRAD_SIMD_DISPATCH(NAME, IMPL)   \
  template <class... A>                    \
  void NAME(int, A&... a) { IMPL<16>(a...); }
#endif

// ---- loads and stores (unaligned; memcpy compiles to one vector move) ----------------------

template <class Vec, class T>
HRGRAD_INLINE Vec load(const T* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

template <class Vec, class T>
HRGRAD_INLINE void store(T* p, Vec v) {
  std::memcpy(p, &v, sizeof(Vec));
}

// The first n (< lanes) elements of p, the rest zero.
template <class Vec, class T>
HRGRAD_INLINE Vec load_partial(const T* p, int64_t n) {
  Vec v = {};
  std::memcpy(&v, p, static_cast<size_t>(n) * sizeof(T));
  return v;
}

template <class Vec, class T>
HRGRAD_INLINE void store_partial(T* p, Vec v, int64_t n) {
  std::memcpy(p, &v, static_cast<size_t>(n) * sizeof(T));
}

// The first n (< lanes) elements with masked moves where the instruction set has them (no
// call to memcpy with a variable length, which costs more than the arithmetic of a vector).
template <int B>
HRGRAD_INLINE typename V<B>::f32 load_n(const float* p, int64_t n) {
  return load_partial<typename V<B>::f32>(p, n);
}
template <int B>
HRGRAD_INLINE typename V<B>::f64 load_n(const double* p, int64_t n) {
  return load_partial<typename V<B>::f64>(p, n);
}
template <int B>
HRGRAD_INLINE void store_n(float* p, typename V<B>::f32 v, int64_t n) {
  store_partial(p, v, n);
}
template <int B>
HRGRAD_INLINE void store_n(double* p, typename V<B>::f64 v, int64_t n) {
  store_partial(p, v, n);
}

#if HRGRAD_SIMD_X86
// Explicit specialisations compiled for their instruction set: not always_inline (GCC refuses
// to force a target-specific body into a generic caller), inlined once their always_inline
// callers have been inlined into the dispatch functions of that instruction set.
template <>
HRGRAD_TARGET_AVX512 inline V<64>::f32 load_n<64>(const float* p, int64_t n) {
  return reinterpret_cast<V<64>::f32>(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p));
}
template <>
HRGRAD_TARGET_AVX512 inline V<64>::f64 load_n<64>(const double* p, int64_t n) {
  return reinterpret_cast<V<64>::f64>(_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p));
}
template <>
HRGRAD_TARGET_AVX512 inline void store_n<64>(float* p, V<64>::f32 v, int64_t n) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), reinterpret_cast<__m512>(v));
}
template <>
HRGRAD_TARGET_AVX512 inline void store_n<64>(double* p, V<64>::f64 v, int64_t n) {
  _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), reinterpret_cast<__m512d>(v));
}
HRGRAD_TARGET_AVX2 inline __m256i avx2_mask32(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
HRGRAD_TARGET_AVX2 inline __m256i avx2_mask64(int64_t n) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
template <>
HRGRAD_TARGET_AVX2 inline V<32>::f32 load_n<32>(const float* p, int64_t n) {
  return reinterpret_cast<V<32>::f32>(_mm256_maskload_ps(p, avx2_mask32(n)));
}
template <>
HRGRAD_TARGET_AVX2 inline V<32>::f64 load_n<32>(const double* p, int64_t n) {
  return reinterpret_cast<V<32>::f64>(_mm256_maskload_pd(p, avx2_mask64(n)));
}
template <>
HRGRAD_TARGET_AVX2 inline void store_n<32>(float* p, V<32>::f32 v, int64_t n) {
  _mm256_maskstore_ps(p, avx2_mask32(n), reinterpret_cast<__m256>(v));
}
template <>
HRGRAD_TARGET_AVX2 inline void store_n<32>(double* p, V<32>::f64 v, int64_t n) {
  _mm256_maskstore_pd(p, avx2_mask64(n), reinterpret_cast<__m256d>(v));
}
#endif

// ---- streaming (non-temporal) stores ---------------------------------------------------------
// For an output much larger than the caches: a cached store first reads the line it writes
// (write-allocate), a streaming store does not, so each written byte costs one memory transfer
// instead of two. Only worth it when nothing reads the output soon from the cache (it is evicted
// on the way). p must be aligned to the vector's size; stream_fence() after a kernel's last one.
template <int B>
HRGRAD_INLINE void stream(float* p, typename V<B>::f32 v) {
  store(p, v);
}
template <int B>
HRGRAD_INLINE void stream(double* p, typename V<B>::f64 v) {
  store(p, v);
}
#if HRGRAD_SIMD_X86
template <>
HRGRAD_TARGET_AVX512 inline void stream<64>(float* p, V<64>::f32 v) {
  _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
}
template <>
HRGRAD_TARGET_AVX512 inline void stream<64>(double* p, V<64>::f64 v) {
  _mm512_stream_pd(p, reinterpret_cast<__m512d>(v));
}
template <>
HRGRAD_TARGET_AVX2 inline void stream<32>(float* p, V<32>::f32 v) {
  _mm256_stream_ps(p, reinterpret_cast<__m256>(v));
}
template <>
HRGRAD_TARGET_AVX2 inline void stream<32>(double* p, V<32>::f64 v) {
  _mm256_stream_pd(p, reinterpret_cast<__m256d>(v));
}
template <>
inline void stream<16>(float* p, V<16>::f32 v) {
  _mm_stream_ps(p, reinterpret_cast<__m128>(v));
}
template <>
inline void stream<16>(double* p, V<16>::f64 v) {
  _mm_stream_pd(p, reinterpret_cast<__m128d>(v));
}
inline void stream_fence() { _mm_sfence(); }
#else
inline void stream_fence() {}
#endif

// dst[0, n) = src[0, n) with streaming stores for the vector-aligned middle of dst (its
// unaligned head and tail are copied plainly).
template <int B, class T>
HRGRAD_INLINE void stream_copy(T* dst, const T* src, int64_t n) {
  using vec = std::conditional_t<std::is_same_v<T, float>, typename V<B>::f32, typename V<B>::f64>;
  constexpr int64_t L = sizeof(vec) / sizeof(T);
  const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) % sizeof(vec));
  int64_t head = misaligned ? (static_cast<int64_t>(sizeof(vec)) - misaligned) / static_cast<int64_t>(sizeof(T)) : 0;
  if (misaligned % sizeof(T) != 0 || head > n) head = n;  // not alignable: plain copy
  std::memcpy(dst, src, static_cast<size_t>(head) * sizeof(T));
  int64_t j = head;
  for (; j + L <= n; j += L) stream<B>(dst + j, load<vec>(src + j));
  std::memcpy(dst + j, src + j, static_cast<size_t>(n - j) * sizeof(T));
}

// x in every lane. Spelled as a lane-0 insert and a shuffle (or the broadcast intrinsic):
// GCC 12 expands the obvious `Vec{x, x, ...}` (and `x - Vec{}`) for 512-bit vectors into one
// masked broadcast per lane.
namespace detail {
template <class Vec, class E, size_t... I>
HRGRAD_INLINE Vec broadcast_lane0(Vec v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, ((void)I, 0)...);
}
template <class Vec, class E>
HRGRAD_INLINE Vec broadcast(const Vec*, E x) {
  Vec v = {};
  v[0] = x;
  return broadcast_lane0<Vec, E>(v, std::make_index_sequence<sizeof(Vec) / sizeof(E)>());
}
#if HRGRAD_SIMD_X86
HRGRAD_TARGET_AVX512 inline V<64>::f32 broadcast(const V<64>::f32*, float x) {
  return reinterpret_cast<V<64>::f32>(_mm512_set1_ps(x));
}
HRGRAD_TARGET_AVX512 inline V<64>::f64 broadcast(const V<64>::f64*, double x) {
  return reinterpret_cast<V<64>::f64>(_mm512_set1_pd(x));
}
HRGRAD_TARGET_AVX2 inline V<32>::f32 broadcast(const V<32>::f32*, float x) {
  return reinterpret_cast<V<32>::f32>(_mm256_set1_ps(x));
}
HRGRAD_TARGET_AVX2 inline V<32>::f64 broadcast(const V<32>::f64*, double x) {
  return reinterpret_cast<V<32>::f64>(_mm256_set1_pd(x));
}
#endif
}  // namespace detail

template <class Vec, class T>
HRGRAD_INLINE Vec splat(T x) {
  using E = std::remove_reference_t<decltype(Vec{}[0])>;
  return detail::broadcast(static_cast<const Vec*>(nullptr), static_cast<E>(x));
}

// ---- float <-> double ----------------------------------------------------------------------

namespace detail {
template <class Out, class In, size_t... I>
HRGRAD_INLINE Out pick(In x, std::index_sequence<I...>, std::integral_constant<size_t, 0>) {
  return __builtin_shufflevector(x, x, I...);
}
template <class Out, class In, size_t... I>
HRGRAD_INLINE Out pick(In x, std::index_sequence<I...>, std::integral_constant<size_t, 1>) {
  return __builtin_shufflevector(x, x, (I + sizeof...(I))...);
}
template <class Out, class In, size_t... I>
HRGRAD_INLINE Out join(In a, In b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, I...);
}
}  // namespace detail

// Lower / upper half of a float vector as doubles.
template <int B>
HRGRAD_INLINE typename V<B>::f64 lo_f64(typename V<B>::f32 x) {
  using h = typename V<B>::f32h;
  return __builtin_convertvector(
      (detail::pick<h>(x, std::make_index_sequence<V<B>::kF64>(), std::integral_constant<size_t, 0>())),
      typename V<B>::f64);
}
template <int B>
HRGRAD_INLINE typename V<B>::f64 hi_f64(typename V<B>::f32 x) {
  using h = typename V<B>::f32h;
  return __builtin_convertvector(
      (detail::pick<h>(x, std::make_index_sequence<V<B>::kF64>(), std::integral_constant<size_t, 1>())),
      typename V<B>::f64);
}
// Two double vectors rounded to one float vector (lo's lanes first).
template <int B>
HRGRAD_INLINE typename V<B>::f32 to_f32(typename V<B>::f64 lo, typename V<B>::f64 hi) {
  using h = typename V<B>::f32h;
  return detail::join<typename V<B>::f32>(__builtin_convertvector(lo, h), __builtin_convertvector(hi, h),
                                          std::make_index_sequence<V<B>::kF32>());
}

#if HRGRAD_SIMD_X86
// GCC lowers the generic widening above to 128-bit conversions and inserts; with AVX-512 one
// instruction does each half.
template <>
HRGRAD_TARGET_AVX512 inline V<64>::f64 lo_f64<64>(V<64>::f32 x) {
  return reinterpret_cast<V<64>::f64>(_mm512_cvtps_pd(_mm512_castps512_ps256(reinterpret_cast<__m512>(x))));
}
template <>
HRGRAD_TARGET_AVX512 inline V<64>::f64 hi_f64<64>(V<64>::f32 x) {
  return reinterpret_cast<V<64>::f64>(_mm512_cvtps_pd(_mm512_extractf32x8_ps(reinterpret_cast<__m512>(x), 1)));
}
template <>
HRGRAD_TARGET_AVX512 inline V<64>::f32 to_f32<64>(V<64>::f64 lo, V<64>::f64 hi) {
  const __m256 l = _mm512_cvtpd_ps(reinterpret_cast<__m512d>(lo)), h = _mm512_cvtpd_ps(reinterpret_cast<__m512d>(hi));
  return reinterpret_cast<V<64>::f32>(_mm512_insertf32x8(_mm512_castps256_ps512(l), h, 1));
}
#endif

// ---- reductions ----------------------------------------------------------------------------

namespace detail {
template <class E, int Bytes>
struct VecOf {
  typedef E type __attribute__((vector_size(Bytes)));
};
}  // namespace detail

// Sum of the lanes, halving the vector at each step (log2(lanes) adds).
template <class Vec>
HRGRAD_INLINE auto hsum(Vec v) {
  using E = std::remove_reference_t<decltype(v[0])>;
  constexpr int n = sizeof(Vec) / sizeof(E);
  if constexpr (n == 1) {
    return v[0];
  } else if constexpr (n == 2) {
    return v[0] + v[1];
  } else {
    using H = typename detail::VecOf<E, sizeof(Vec) / 2>::type;
    const H lo = detail::pick<H>(v, std::make_index_sequence<n / 2>(), std::integral_constant<size_t, 0>());
    const H hi = detail::pick<H>(v, std::make_index_sequence<n / 2>(), std::integral_constant<size_t, 1>());
    return hsum(lo + hi);
  }
}

// Lane sums of n vectors of n lanes at once: out[r] = sum of the lanes of v[r]. Pairs of
// vectors are folded level by level (blocks of 1, 2, 4, ... lanes interleaved and added), so
// the n sums cost n - 1 adds and 2 (n - 1) shuffles instead of n (log2 n) of each.
namespace detail {
// Output lane l of the fold of a and b at block size s: lo takes the even blocks of a and b
// interleaved, hi the odd ones.
constexpr int fold_index(int n, int s, int l, bool hi) {
  const int blk = l / s, within = l % s, src = 2 * (blk / 2) + (hi ? 1 : 0);
  return (blk % 2 == 0 ? 0 : n) + src * s + within;
}
template <class Vec, int n, int s, size_t... I>
HRGRAD_INLINE Vec fold(Vec a, Vec b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, fold_index(n, s, static_cast<int>(I), false)...) +
         __builtin_shufflevector(a, b, fold_index(n, s, static_cast<int>(I), true)...);
}
template <class Vec, int n, int s, int count>
HRGRAD_INLINE Vec fold_all(Vec* v) {
  if constexpr (count == 1) {
    return v[0];
  } else {
    for (int r = 0; r < count / 2; ++r) v[r] = fold<Vec, n, s>(v[2 * r], v[2 * r + 1], std::make_index_sequence<n>());
    return fold_all<Vec, n, 2 * s, count / 2>(v);
  }
}
}  // namespace detail

// v: as many vectors as lanes (overwritten). Returns the vector of their lane sums, in order.
template <class Vec>
HRGRAD_INLINE Vec hsums(Vec* v) {
  constexpr int n = sizeof(Vec) / sizeof(v[0][0]);
  return detail::fold_all<Vec, n, 1, n>(v);
}

// ---- exp -----------------------------------------------------------------------------------
// Branch-free exp with the usual reduction x = k ln2 + r, |r| <= ln2 / 2 (ln2 split in a high
// part with trailing zero bits, so k ln2_hi is exact), a Taylor polynomial of r and 2^k built
// in the exponent bits. Inputs below the smallest normal result give 0, above the largest
// +inf; NaN propagates.

// float64: degree 13, truncation < 1e-17 relative; max error against std::exp 2.2e-16
// relative. Below -708 returns 0 (true value < 3.3e-308), above ln(DBL_MAX) +inf.
template <int B>
HRGRAD_INLINE typename V<B>::f64 exp(typename V<B>::f64 x0) {
  using vd = typename V<B>::f64;
  using vl = typename V<B>::i64;
  const vd lo = splat<vd>(-708.0), hi = splat<vd>(709.782712893384);
  vd x = x0 < lo ? lo : x0;
  x = x > hi ? hi : x;
  const vd shifter = splat<vd>(6755399441055744.0);  // 1.5 * 2^52: adding it rounds to an integer
  const vd kd = x * 1.4426950408889634074 + shifter;
  const vd k = kd - shifter;  // in [-1021, 1024]
  const vd r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
  // Estrin's scheme (chain of 4 multiply-adds instead of 13).
  const vd r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
  const vd p01 = r + 1.0, p23 = r * (1.0 / 6.0) + 0.5, p45 = r * (1.0 / 120.0) + 1.0 / 24.0,
           p67 = r * (1.0 / 5040.0) + 1.0 / 720.0, p89 = r * (1.0 / 362880.0) + 1.0 / 40320.0,
           pab = r * (1.0 / 39916800.0) + 1.0 / 3628800.0, pcd = r * (1.0 / 6227020800.0) + 1.0 / 479001600.0;
  const vd q0 = p23 * r2 + p01, q1 = p67 * r2 + p45, q2 = pab * r2 + p89;
  const vd p = (q1 * r4 + q0) + (pcd * r4 + q2) * r8;
  // 2^k as 2 * 2^(k-1), so that k = 1024 (x near ln(DBL_MAX)) stays finite; the low bits of
  // kd hold k in two's complement and the shift drops the rest.
  const vl ki = std::bit_cast<vl>(kd);
  const vl bits = (ki + 1022) << 52;
  const vd y = (p * std::bit_cast<vd>(bits)) * 2.0;
  const vd zero = {}, inf = splat<vd>(std::numeric_limits<double>::infinity());
  vd out = x0 < lo ? zero : y;
  return x0 > hi ? inf : out;
}

// float32: degree 7, truncation < 6e-9 relative; max error against std::exp(double) about
// 2 ulp. Below -86.9 returns 0 (true value < 1.9e-38), above ln(FLT_MAX) +inf.
template <int B>
HRGRAD_INLINE typename V<B>::f32 exp(typename V<B>::f32 x0) {
  using vf = typename V<B>::f32;
  using vi = typename V<B>::i32;
  const vf lo = splat<vf>(-86.9f), hi = splat<vf>(88.7228394f);
  vf x = x0 < lo ? lo : x0;
  x = x > hi ? hi : x;
  const vf shifter = splat<vf>(12582912.0f);  // 1.5 * 2^23
  const vf kd = x * 1.44269504088896341f + shifter;
  const vf k = kd - shifter;  // in [-125, 128]
  const vf r = (x - k * 0.693145751953125f) - k * 1.42860682030941723212e-06f;
  // Estrin's scheme: a dependency chain of 3 multiply-adds instead of Horner's 7 (the exp is on
  // the critical path of every row of the kinetic kernels).
  const vf r2 = r * r, r4 = r2 * r2;
  const vf p01 = r + 1.0f, p23 = r * (1.0f / 6.0f) + 0.5f;
  const vf p45 = r * (1.0f / 120.0f) + 1.0f / 24.0f, p67 = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
  const vf p = (p23 * r2 + p01) + (p67 * r2 + p45) * r4;
  const vi ki = std::bit_cast<vi>(kd);
  const vi bits = (ki + 126) << 23;  // 2 * 2^(k-1), as for float64
  const vf y = (p * std::bit_cast<vf>(bits)) * 2.0f;
  const vf zero = {}, inf = splat<vf>(std::numeric_limits<float>::infinity());
  vf out = x0 < lo ? zero : y;
  return x0 > hi ? inf : out;
}

}  // namespace simd
}  // namespace hrgrad_ext
