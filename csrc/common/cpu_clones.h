// The build has no -march flags (the wheel must run on any x86-64), so with GCC on Linux the
// hot vectorisable CPU loops are compiled for AVX-512, AVX2 and baseline and picked at load
// time (ifunc). Elsewhere the plain compiled loop is used.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define HRGRAD_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), noinline))
#else
#define HRGRAD_CPU_CLONES
#endif
