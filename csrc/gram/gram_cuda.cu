// CUDA kernels of the gram family: gram, hrgrad_weights, combine, combine_accumulate_.
//
// gram is a split-n reduction, not a GEMM: J is skinny (K <= 64 rows, n up to ~1e9 columns),
// so the kernel is bound by reading J once. Each block reduces a strided share of the
// columns into a private K x K partial (float32 registers for float32/half inputs, float64
// for float64) and writes it as float64 to a workspace; a second tiny kernel sums the
// partials in a fixed order (deterministic, no atomics) and writes the symmetric result.
//   K <= 16: every thread keeps all K(K+1)/2 products of its columns in registers.
//   K <= 64: a block stages a chunk of columns in shared memory and each thread owns a 4x4
//            register tile of G (upper-triangular tiles only).
//   K  > 64: falls back to at::matmul (documented; not the skinny regime this is built for).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_kernel.h"
#include "gram/gram_common.h"

namespace hrgrad_ext {
namespace {

constexpr int kThreads = 256;
using cuda::launch;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// ---- gram, K <= KMAX <= 16: products in registers ----------------------------------------
// partial layout: [B, nblk, K*K] float64, upper triangle (i <= j) filled.
template <typename scalar_t, typename acc_t, int KMAX, int UNROLL>
__global__ void __launch_bounds__(kThreads)
gram_registers_kernel(const scalar_t* __restrict__ J, int K, int64_t n, int nblk,
                      double* __restrict__ partial) {
  constexpr int P = KMAX * (KMAX + 1) / 2;
  const int b = blockIdx.y;
  const scalar_t* Jb = J + static_cast<int64_t>(b) * K * n;
  acc_t acc[P];
#pragma unroll
  for (int p = 0; p < P; ++p) acc[p] = acc_t(0);

  const int64_t stride = static_cast<int64_t>(nblk) * kThreads * UNROLL;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * UNROLL + threadIdx.x; base < n;
       base += stride) {
    acc_t v[UNROLL][KMAX];
    // Issue all loads of this iteration before any arithmetic: KMAX * UNROLL independent
    // coalesced loads in flight per thread is what hides DRAM latency here.
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t c = base + static_cast<int64_t>(u) * kThreads;
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        v[u][k] = (k < K && c < n) ? static_cast<acc_t>(Jb[static_cast<int64_t>(k) * n + c]) : acc_t(0);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      int p = 0;
#pragma unroll
      for (int i = 0; i < KMAX; ++i) {
#pragma unroll
        for (int j = i; j < KMAX; ++j) acc[p++] += v[u][i] * v[u][j];
      }
    }
  }

  // Block reduction: warp shuffles, then one value per warp through shared memory.
  HRGRAD_SHARED(double, warp_partial, [kThreads / 32][P]);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const acc_t s = warp_sum(acc[p]);
    if (lane == 0) warp_partial[warp][p] = static_cast<double>(s);
  }
  __syncthreads();
  double* out = partial + (static_cast<int64_t>(b) * nblk + blockIdx.x) * K * K;
  for (int p = threadIdx.x; p < P; p += kThreads) {
    // p -> (i, j) with i <= j in the same order as the accumulation loop above
    int i = 0, rem = p;
    while (rem >= KMAX - i) {
      rem -= KMAX - i;
      ++i;
    }
    const int j = i + rem;
    if (i < K && j < K) {
      double s = 0.0;
      for (int w = 0; w < kThreads / 32; ++w) s += warp_partial[w][p];
      out[i * K + j] = s;
    }
  }
}

// ---- gram, 16 < K <= KMAX (32 or 64): shared-memory chunk, 4x4 register tiles ------------
template <typename scalar_t, typename acc_t, int KMAX>
__global__ void __launch_bounds__(kThreads)
gram_tiles_kernel(const scalar_t* __restrict__ J, int K, int64_t n, int nblk,
                  double* __restrict__ partial) {
  constexpr int CHUNK = 32;                       // columns staged per iteration
  constexpr int T = KMAX / 4;                     // 4x4 tiles per side
  constexpr int TILES = T * T;                    // 64 (KMAX=32) or 256 (KMAX=64)
  constexpr int GROUPS = kThreads / TILES;        // column groups sharing the chunk
  constexpr int COLS_PER_GROUP = CHUNK / GROUPS;
  HRGRAD_SHARED(acc_t, tile, [KMAX][CHUNK + 1]);  // +1: fewer bank conflicts on column reads

  const int b = blockIdx.y;
  const scalar_t* Jb = J + static_cast<int64_t>(b) * K * n;
  const int t = threadIdx.x % TILES, group = threadIdx.x / TILES;
  const int ti = t / T, tj = t % T;
  const bool active = ti <= tj;
  acc_t acc[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int s = 0; s < 4; ++s) acc[r][s] = acc_t(0);

  for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * CHUNK; c0 < n; c0 += static_cast<int64_t>(nblk) * CHUNK) {
    for (int e = threadIdx.x; e < KMAX * CHUNK; e += kThreads) {
      const int k = e / CHUNK, c = e % CHUNK;
      const int64_t col = c0 + c;
      tile[k][c] = (k < K && col < n) ? static_cast<acc_t>(Jb[static_cast<int64_t>(k) * n + col]) : acc_t(0);
    }
    __syncthreads();
    if (active) {
      for (int c = group * COLS_PER_GROUP; c < (group + 1) * COLS_PER_GROUP; ++c) {
        acc_t a[4], bb[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          a[r] = tile[ti * 4 + r][c];
          bb[r] = tile[tj * 4 + r][c];
        }
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
          for (int s = 0; s < 4; ++s) acc[r][s] += a[r] * bb[s];
      }
    }
    __syncthreads();
  }

  // Reduce the column groups through shared memory (reusing nothing: a separate buffer).
  // Sized 1 when there is a single group, to stay within 48 KB of static shared memory.
  HRGRAD_SHARED(double, group_sum, [GROUPS > 1 ? GROUPS : 1][GROUPS > 1 ? TILES : 1][16]);
  if (GROUPS > 1) {
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int s = 0; s < 4; ++s) group_sum[group][t][r * 4 + s] = static_cast<double>(acc[r][s]);
    __syncthreads();
  }
  if (group == 0 && active) {
    double* out = partial + (static_cast<int64_t>(b) * nblk + blockIdx.x) * K * K;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        double v = static_cast<double>(acc[r][s]);
        for (int g = 1; g < GROUPS; ++g) v += group_sum[g][t][r * 4 + s];
        const int i = ti * 4 + r, j = tj * 4 + s;
        if (i < K && j < K && i <= j) out[i * K + j] = v;
      }
    }
  }
}

// Sums the per-block partials and writes G symmetric. One warp per entry of the upper
// triangle, lanes striding over the blocks: hundreds of partials are summed in parallel, in
// a fixed order (deterministic, no atomics).
template <typename out_t>
__global__ void gram_finalize_kernel(const double* __restrict__ partial, int K, int nblk,
                                     out_t* __restrict__ G) {
  const int b = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const double* pb = partial + static_cast<int64_t>(b) * nblk * K * K;
  for (int e = warp; e < K * K; e += warps) {
    const int i = e / K, j = e % K;
    if (i > j) continue;  // uniform across the warp: e is the same for all lanes
    double s = 0.0;
    for (int blk = lane; blk < nblk; blk += 32) s += pb[static_cast<int64_t>(blk) * K * K + e];
    s = warp_sum(s);
    if (lane == 0) {
      G[static_cast<int64_t>(b) * K * K + i * K + j] = static_cast<out_t>(s);
      G[static_cast<int64_t>(b) * K * K + j * K + i] = static_cast<out_t>(s);
    }
  }
}

// Launches the partial-sum kernel; returns the [B, nblk, K*K] float64 partials and nblk.
template <typename scalar_t>
std::pair<at::Tensor, int> launch_gram_partials(const at::Tensor& Jb) {
  using acc_t = at::opmath_type<scalar_t>;
  const int B = static_cast<int>(Jb.size(0)), K = static_cast<int>(Jb.size(1));
  const int64_t n = Jb.size(2);
  const scalar_t* J = Jb.const_data_ptr<scalar_t>();
  // Enough blocks to fill the GPU a few times over, split among the batch entries.
  const int target = 4 * cuda::multiprocessor_count(Jb.get_device());
  const int per_entry = std::max(1, target / std::max(1, B));
  auto blocks_for = [&](int64_t cols_per_block) {
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(per_entry, (n + cols_per_block - 1) / cols_per_block)));
  };
  int nblk = 1;
  at::Tensor partial;
  auto alloc = [&](int blocks) {
    nblk = blocks;
    partial = at::empty({static_cast<int64_t>(B) * nblk * K * K}, Jb.options().dtype(at::kDouble));
  };
  TORCH_CHECK(B <= 65535, "gram: batch size ", B, " exceeds the CUDA grid limit of 65535");
#define HRGRAD_LAUNCH_REG(KM, U)                                                                   \
  do {                                                                                              \
    alloc(blocks_for(static_cast<int64_t>(kThreads) * U));                                          \
    launch<gram_registers_kernel<scalar_t, acc_t, KM, U>>({dim3(nblk, B), kThreads}, J, K, n, nblk, \
                                                          partial.mutable_data_ptr<double>());     \
  } while (0)
  if (K <= 2) {
    HRGRAD_LAUNCH_REG(2, 4);
  } else if (K <= 4) {
    HRGRAD_LAUNCH_REG(4, 4);
  } else if (K <= 8) {
    HRGRAD_LAUNCH_REG(8, 4);
  } else if (K <= 16) {
    HRGRAD_LAUNCH_REG(16, 2);
  } else if (K <= 32) {
    alloc(blocks_for(32));
    launch<gram_tiles_kernel<scalar_t, acc_t, 32>>({dim3(nblk, B), kThreads}, J, K, n, nblk,
                                                   partial.mutable_data_ptr<double>());
  } else {
    alloc(blocks_for(32));
    launch<gram_tiles_kernel<scalar_t, acc_t, 64>>({dim3(nblk, B), kThreads}, J, K, n, nblk,
                                                   partial.mutable_data_ptr<double>());
  }
#undef HRGRAD_LAUNCH_REG
  return {partial, nblk};
}

at::Tensor gram_cuda(const at::Tensor& J, std::optional<at::ScalarType> dtype) {
  const at::Tensor Jb = as_batched_jacobian(J, "gram");
  const at::ScalarType out_dtype = gram_out_dtype(J, dtype);
  const cuda::DeviceGuard guard(Jb.device());
  at::Tensor G;
  if (Jb.size(0) == 0) {  // empty batch: nothing to launch (a 0-block grid is a CUDA error)
    G = at::empty({0, Jb.size(1), Jb.size(1)}, Jb.options().dtype(out_dtype));
  } else if (Jb.size(1) > 64) {
    // Outside the skinny regime a tiled GEMM is the right tool.
    const at::Tensor Ja = Jb.to(out_dtype);
    G = at::matmul(Ja, Ja.transpose(1, 2));
  } else {
    const int B = static_cast<int>(Jb.size(0)), K = static_cast<int>(Jb.size(1));
    G = at::empty({B, K, K}, Jb.options().dtype(out_dtype));
    std::pair<at::Tensor, int> partials;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Jb.scalar_type(), "gram_cuda",
                                    [&] { partials = launch_gram_partials<scalar_t>(Jb); });
    AT_DISPATCH_FLOATING_TYPES(out_dtype, "gram_finalize", [&] {
      launch<gram_finalize_kernel<scalar_t>>({static_cast<unsigned>(B), 256}, partials.first.const_data_ptr<double>(), K,
                                             partials.second, G.mutable_data_ptr<scalar_t>());
    });
  }
  return J.dim() == 2 ? G.squeeze(0) : G;
}

// ---- hrgrad_weights: one block per batch entry, the same solve as the CPU kernel ------------
// The K x K solve is short, sequential and latency-bound, so one thread does it, with its
// scratch in shared memory when it fits (48 KB: K <= 52) and in global memory otherwise.
constexpr int64_t kMaxStaticSmem = 48 * 1024;

template <typename scalar_t>
__global__ void hrgrad_weights_kernel(const scalar_t* __restrict__ G, int K, int length_model, double rtol,
                                      bool scratch_in_smem, scalar_t* __restrict__ w, int* __restrict__ status,
                                      double* __restrict__ workspace) {
  HRGRAD_DYNAMIC_SHARED(double, smem_scratch);
  const int b = blockIdx.x;
  if (threadIdx.x != 0) return;
  double* ws = scratch_in_smem ? smem_scratch : workspace + b * hrgrad_solve_workspace(K);
  status[b] = hrgrad_solve<scalar_t, scalar_t>(G + static_cast<int64_t>(b) * K * K, K, length_model, rtol,
                                               w + static_cast<int64_t>(b) * K, ws);
}

std::tuple<at::Tensor, at::Tensor> hrgrad_weights_cuda(const at::Tensor& G, c10::string_view length_model,
                                                       std::optional<double> rcond) {
  const at::Tensor Gb = as_batched_gram(G);
  const int lm = parse_length_model(std::string(length_model));
  const double rtol = resolve_rcond(rcond, G);
  const cuda::DeviceGuard guard(Gb.device());
  const int64_t B = Gb.size(0), K = Gb.size(1);
  TORCH_CHECK(B <= 2147483647LL, "hrgrad_weights: batch size ", B, " exceeds the CUDA grid limit");
  at::Tensor w = at::empty({B, K}, Gb.options());
  at::Tensor status = at::empty({B}, Gb.options().dtype(at::kInt));
  const int64_t scratch_bytes = hrgrad_solve_workspace(K) * static_cast<int64_t>(sizeof(double));
  const bool in_smem = scratch_bytes <= kMaxStaticSmem;
  // Global scratch only when shared memory is too small; allocated through the caching
  // allocator, so the device never waits on the host.
  at::Tensor workspace = at::empty({in_smem ? 1 : B * hrgrad_solve_workspace(K)}, Gb.options().dtype(at::kDouble));
  if (B > 0) AT_DISPATCH_FLOATING_TYPES(Gb.scalar_type(), "hrgrad_weights_cuda", [&] {
    launch<hrgrad_weights_kernel<scalar_t>>(
        {static_cast<unsigned>(B), 32, static_cast<size_t>(in_smem ? scratch_bytes : 0)}, Gb.const_data_ptr<scalar_t>(),
        static_cast<int>(K), lm, rtol, in_smem, w.mutable_data_ptr<scalar_t>(), status.mutable_data_ptr<int>(),
        workspace.mutable_data_ptr<double>());
  });
  if (G.dim() == 2) return {w.squeeze(0), status.squeeze(0)};
  return {w, status};
}

// ---- combine: out[b, c] (+)= sum_k w[b, k] J[b, k, c] --------------------------------------
template <typename scalar_t, typename acc_t, bool kAccumulate, int UNROLL>
__global__ void __launch_bounds__(kThreads)
combine_kernel(const scalar_t* __restrict__ J, const acc_t* __restrict__ w, int K, int64_t n,
               scalar_t* __restrict__ out) {
  HRGRAD_DYNAMIC_SHARED(acc_t, ws);
  const int b = blockIdx.y;
  for (int k = threadIdx.x; k < K; k += blockDim.x) ws[k] = w[static_cast<int64_t>(b) * K + k];
  __syncthreads();
  const scalar_t* Jb = J + static_cast<int64_t>(b) * K * n;
  scalar_t* ob = out + static_cast<int64_t>(b) * n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * UNROLL;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * UNROLL + threadIdx.x; base < n;
       base += stride) {
    acc_t s[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) s[u] = acc_t(0);
    for (int k = 0; k < K; ++k) {
      const acc_t wk = ws[k];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int64_t c = base + static_cast<int64_t>(u) * kThreads;
        if (c < n) s[u] += wk * static_cast<acc_t>(Jb[static_cast<int64_t>(k) * n + c]);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t c = base + static_cast<int64_t>(u) * kThreads;
      if (c < n) {
        ob[c] = kAccumulate ? static_cast<scalar_t>(static_cast<acc_t>(ob[c]) + s[u]) : static_cast<scalar_t>(s[u]);
      }
    }
  }
}

template <bool kAccumulate>
void launch_combine(const at::Tensor& Jb, const at::Tensor& w, at::Tensor& out) {
  const int64_t B = Jb.size(0), K = Jb.size(1), n = Jb.size(2);
  if (B == 0) return;
  TORCH_CHECK(B <= 65535, "combine: batch size ", B, " exceeds the CUDA grid limit of 65535");
  constexpr int U = 4;
  const int target = 4 * cuda::multiprocessor_count(Jb.get_device());
  const int64_t per_entry = std::max<int64_t>(1, target / std::max<int64_t>(1, B));
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(per_entry * 4, (n + kThreads * U - 1) / (kThreads * U))));
  const at::ScalarType acc = acc_type_of(Jb.scalar_type());
  const at::Tensor wb = w.reshape({B, K}).to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Jb.scalar_type(), "combine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch<combine_kernel<scalar_t, acc_t, kAccumulate, U>>(
        {dim3(blocks, B), kThreads, K * sizeof(acc_t)}, Jb.const_data_ptr<scalar_t>(), wb.const_data_ptr<acc_t>(),
        static_cast<int>(K), n, out.mutable_data_ptr<scalar_t>());
  });
}

at::Tensor combine_cuda(const at::Tensor& J, const at::Tensor& w) {
  const at::Tensor Jb = as_batched_jacobian(J, "combine");
  check_combine_weights(J, w, "combine");
  const cuda::DeviceGuard guard(Jb.device());
  at::Tensor out = at::empty({Jb.size(0), Jb.size(2)}, Jb.options());
  launch_combine<false>(Jb, w, out);
  return J.dim() == 2 ? out.squeeze(0) : out;
}

void combine_accumulate_cuda(at::Tensor& out, const at::Tensor& J, const at::Tensor& w) {
  const at::Tensor Jb = check_combine_accumulate(out, J, w);
  const cuda::DeviceGuard guard(Jb.device());
  launch_combine<true>(Jb, w, out);
}

}  // namespace

HRGRAD_EXT_CUDA_KERNELS(m) {
  m.impl("gram", &gram_cuda);
  m.impl("hrgrad_weights", &hrgrad_weights_cuda);
  m.impl("combine", &combine_cuda);
  m.impl("combine_accumulate_", &combine_accumulate_cuda);
}

}  // namespace hrgrad_ext
