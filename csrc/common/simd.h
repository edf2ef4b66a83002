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

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of inlined helpers never cross an ABI

#define HRGRAD_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) || defined(__i386__)
#define HRGRAD_SIMD_X86 1
#define HRGRAD_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,f16c,prefer-vector-width=512")))
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

// x in every lane (not `Vec{} + x`: adding +0.0 cannot be folded away, it changes -0.0).
template <class Vec, class T>
HRGRAD_INLINE Vec splat(T x) {
  using E = std::remove_reference_t<decltype(Vec{}[0])>;
  constexpr int n = sizeof(Vec) / sizeof(E);
  Vec v;
  for (int l = 0; l < n; ++l) v[l] = static_cast<E>(x);
  return v;
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

template <class Vec>
HRGRAD_INLINE auto hsum(Vec v) {
  constexpr int n = sizeof(Vec) / sizeof(v[0]);
  auto s = v[0];
  for (int l = 1; l < n; ++l) s += v[l];
  return s;
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
  vd p = splat<vd>(1.0 / 6227020800.0);
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
  // 2^k as 2 * 2^(k-1), so that k = 1024 (x near ln(DBL_MAX)) stays finite; the low bits of
  // kd hold k in two's complement and the shift drops the rest.
  const vl ki = reinterpret_cast<const vl&>(kd);
  const vl bits = (ki + 1022) << 52;
  const vd y = (p * reinterpret_cast<const vd&>(bits)) * 2.0;
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
  vf p = splat<vf>(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi ki = reinterpret_cast<const vi&>(kd);
  const vi bits = (ki + 126) << 23;  // 2 * 2^(k-1), as for float64
  const vf y = (p * reinterpret_cast<const vf&>(bits)) * 2.0f;
  const vf zero = {}, inf = splat<vf>(std::numeric_limits<float>::infinity());
  vf out = x0 < lo ? zero : y;
  return x0 > hi ? inf : out;
}

}  // namespace simd
}  // namespace hrgrad_ext
