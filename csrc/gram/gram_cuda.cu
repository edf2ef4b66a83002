// CUDA kernels of the gram family: gram, hrgrad_weights, combine, combine_accumulate_.
//
// gram is a split-n reduction, not a GEMM: J is skinny (K <= 64 rows, n up to ~1e9 columns),
// so the kernel is bound by reading J once. Each block reduces a strided share of the columns
// of one batch entry into a private K x K partial and writes it to a float64 workspace; a
// second small kernel sums the partials in a fixed order (deterministic, no atomics) and
// writes the symmetric result.
//   K <= 8:  every thread keeps the K(K+1)/2 products of its columns in registers.
//   K <= 64: a block stages a chunk of columns in shared memory and each thread owns a 4x4
//            register tile of G (upper-triangular tiles only). The loads are double-buffered:
//            each thread's share of the next chunk is loaded into registers while the tiles
//            of the current one are multiplied, so the DRAM latency overlaps the float64 FMAs
//            instead of following them.
//   K  > 64: float64 GEMMs over chunks of columns (not the skinny regime this is built for).
// Products and sums are float64 whatever the input dtype, as in the CPU kernel. The rotation
// solve decides rank deficiency from the eigenvalues of the cosine matrix relative to eps of
// G's dtype; a G summed in float32 carries ~1e-7 relative noise, which turned rank-deficient
// float32 problems into conflicting updates without the RANK_DEFICIENT flag. The price is one
// float64 FMA per product: about (K + 1) / 2 per element of J read for K <= 8, which memory
// traffic still hides, and about K / 2 on the tile path, which at K = 64 with float32 input is
// bound by float64 throughput (estimated ~2x the float32-accumulation time on an H100, ~3x on
// an A100; bench/bench_gram.py measures it).
// Any batch size: the batch is folded into gridDim.x (blocks b * nblk ... b * nblk + nblk - 1
// serve entry b), in several launches when that exceeds the grid.

#include <algorithm>
#include <limits>
#include <type_traits>

#include "common/cuda_kernel.h"
#include "gram/gram_common.h"

namespace hrgrad_ext {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
using cuda::launch;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Calls launch_range(b0, count) for consecutive ranges of the batch whose grid, count *
// blocks_per_entry blocks, fits in gridDim.x.
template <typename F>
void over_batch(int64_t B, int64_t blocks_per_entry, F&& launch_range) {
  const int64_t per_launch = std::max<int64_t>(1, kMaxGridX / blocks_per_entry);
  for (int64_t b0 = 0; b0 < B; b0 += per_launch) launch_range(b0, std::min(per_launch, B - b0));
}

// ---- gram, K <= KMAX <= 8: products in registers ---------------------------------------------
// partial: [B, nblk, K * K] float64, upper triangle (i <= j) filled.
template <typename scalar_t, int KMAX, int UNROLL>
__global__ void __launch_bounds__(kThreads)
gram_registers_kernel(const scalar_t* __restrict__ J, int K, int64_t n, int nblk, double* __restrict__ partial) {
  constexpr int P = KMAX * (KMAX + 1) / 2;
  const int b = blockIdx.x / nblk, blk = blockIdx.x % nblk;
  const scalar_t* Jb = J + static_cast<int64_t>(b) * K * n;
  double acc[P];
#pragma unroll
  for (int p = 0; p < P; ++p) acc[p] = 0.0;

  const int64_t stride = static_cast<int64_t>(nblk) * kThreads * UNROLL;
  for (int64_t base = static_cast<int64_t>(blk) * kThreads * UNROLL + threadIdx.x; base < n; base += stride) {
    double v[UNROLL][KMAX];
    // All loads of this iteration before any arithmetic: KMAX * UNROLL independent coalesced
    // loads in flight per thread is what hides DRAM latency here.
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t c = base + static_cast<int64_t>(u) * kThreads;
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        v[u][k] = (k < K && c < n) ? static_cast<double>(Jb[static_cast<int64_t>(k) * n + c]) : 0.0;
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
    const double s = warp_sum(acc[p]);
    if (lane == 0) warp_partial[warp][p] = s;
  }
  __syncthreads();
  double* out = partial + static_cast<int64_t>(blockIdx.x) * K * K;
  for (int p = threadIdx.x; p < P; p += kThreads) {
    int i = 0, rem = p;  // p -> (i, j), i <= j, in the order of the accumulation above
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

// ---- gram, 8 < K <= KMAX (16, 32 or 64): shared-memory chunks, 4x4 register tiles ------------
template <int KMAX>
struct TileShape {
  static constexpr int kTiles = (KMAX / 4) * (KMAX / 4);  // 16, 64 or 256 tiles of 4x4
  static constexpr int kGroups = kThreads / kTiles;         // column groups sharing a chunk
  static constexpr int kChunk = 2048 / KMAX;                // columns staged per iteration: 128, 64, 32
  static constexpr int kLd = kChunk + 1;                    // +1: fewer bank conflicts on column reads
  static constexpr int kLoads = KMAX * kChunk / kThreads;   // elements of a chunk per thread: 8
  // The chunk buffer, reused after the loop for the sums of the column groups.
  static constexpr int kSmemDoubles = std::max(KMAX * kLd, kGroups > 1 ? kGroups * kTiles * 16 : 0);
};

// A thread's share of the chunk of columns [c0, c0 + kChunk) (zeros past K and n), in the
// input type: element e = threadIdx.x + q * kThreads of the chunk is row e / kChunk, column
// e % kChunk (consecutive threads, consecutive columns: coalesced).
template <typename scalar_t, int KMAX>
__device__ __forceinline__ void gram_fetch_chunk(const scalar_t* __restrict__ Jb, int K, int64_t n, int64_t c0,
                                                 scalar_t (&share)[TileShape<KMAX>::kLoads]) {
  constexpr int CHUNK = TileShape<KMAX>::kChunk;
#pragma unroll
  for (int q = 0; q < TileShape<KMAX>::kLoads; ++q) {
    const int e = threadIdx.x + q * kThreads, k = e / CHUNK;
    const int64_t col = c0 + e % CHUNK;
    share[q] = (k < K && col < n) ? Jb[static_cast<int64_t>(k) * n + col] : scalar_t(0);
  }
}

template <typename scalar_t, int KMAX>
__global__ void __launch_bounds__(kThreads)
gram_tiles_kernel(const scalar_t* __restrict__ J, int K, int64_t n, int nblk, double* __restrict__ partial) {
  using S = TileShape<KMAX>;
  constexpr int T = KMAX / 4, CHUNK = S::kChunk, LD = S::kLd, GROUPS = S::kGroups;
  constexpr int COLS_PER_GROUP = CHUNK / GROUPS;
  HRGRAD_SHARED(double, smem, [S::kSmemDoubles]);

  const int b = blockIdx.x / nblk, blk = blockIdx.x % nblk;
  const scalar_t* Jb = J + static_cast<int64_t>(b) * K * n;
  const int t = threadIdx.x % S::kTiles, group = threadIdx.x / S::kTiles;
  const int ti = t / T, tj = t % T;
  const bool active = ti <= tj;
  double acc[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int s = 0; s < 4; ++s) acc[r][s] = 0.0;

  static_assert(S::kLoads * kThreads == KMAX * CHUNK, "a chunk is a whole number of loads per thread");
  const int64_t step = static_cast<int64_t>(nblk) * CHUNK;
  scalar_t share[S::kLoads];  // this thread's share of the next chunk, loaded a chunk ahead
  int64_t c0 = static_cast<int64_t>(blk) * CHUNK;
  if (c0 < n) gram_fetch_chunk<scalar_t, KMAX>(Jb, K, n, c0, share);
  for (; c0 < n; c0 += step) {
#pragma unroll
    for (int q = 0; q < S::kLoads; ++q) {
      const int e = threadIdx.x + q * kThreads;
      smem[(e / CHUNK) * LD + e % CHUNK] = static_cast<double>(share[q]);
    }
    __syncthreads();
    // The next chunk's loads go out now and land while this chunk's products are summed.
    if (c0 + step < n) gram_fetch_chunk<scalar_t, KMAX>(Jb, K, n, c0 + step, share);
    if (active) {
      for (int c = group * COLS_PER_GROUP; c < (group + 1) * COLS_PER_GROUP; ++c) {
        double a[4], bb[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          a[r] = smem[(ti * 4 + r) * LD + c];
          bb[r] = smem[(tj * 4 + r) * LD + c];
        }
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
          for (int s = 0; s < 4; ++s) acc[r][s] += a[r] * bb[s];
      }
    }
    __syncthreads();  // before the next chunk (or the group sums) overwrites the buffer
  }

  // Sum the column groups through the (now free) chunk buffer: group g, tile t at (g * T^2 + t) * 16.
  if (GROUPS > 1) {
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int s = 0; s < 4; ++s) smem[(group * S::kTiles + t) * 16 + r * 4 + s] = acc[r][s];
    __syncthreads();
  }
  if (group == 0 && active) {
    double* out = partial + static_cast<int64_t>(blockIdx.x) * K * K;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        double v = acc[r][s];
        for (int g = 1; g < GROUPS; ++g) v += smem[(g * S::kTiles + t) * 16 + r * 4 + s];
        const int i = ti * 4 + r, j = tj * 4 + s;
        if (i < K && j < K && i <= j) out[i * K + j] = v;
      }
    }
  }
}

// Sums the per-block partials of each upper-triangular entry (b, i, j) and writes G
// symmetric. One warp per entry, its lanes striding over the blocks: a fixed order
// (deterministic, no atomics). Entries e0 .. e0 + gridDim.x * 8 of the B * K(K+1)/2.
template <typename out_t>
__global__ void __launch_bounds__(kThreads)
gram_finalize_kernel(const double* __restrict__ partial, int K, int nblk, int64_t e0, int64_t entries,
                     out_t* __restrict__ G) {
  const int64_t e = e0 + static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (e >= entries) return;  // the whole warp leaves together
  const int lane = threadIdx.x & 31, P = K * (K + 1) / 2;
  const int64_t b = e / P;
  int i = 0, rem = static_cast<int>(e - b * P);
  while (rem >= K - i) {
    rem -= K - i;
    ++i;
  }
  const int j = i + rem;
  const double* pe = partial + b * nblk * K * K + i * K + j;
  double s = 0.0;
  for (int blk = lane; blk < nblk; blk += 32) s += pe[static_cast<int64_t>(blk) * K * K];
  s = warp_sum(s);
  if (lane == 0) {
    G[b * K * K + i * K + j] = static_cast<out_t>(s);
    G[b * K * K + j * K + i] = static_cast<out_t>(s);
  }
}

// Launches one partial-sum kernel over the batch; returns the [B, nblk, K*K] float64 partials
// and nblk. cols_per_block: columns a block covers per iteration.
template <auto kernel, typename scalar_t>
std::pair<Tensor, int> gram_partials(const Tensor& Jb, int64_t cols_per_block) {
  const int64_t B = Jb.size(0), K = Jb.size(1), n = Jb.size(2);
  // Enough blocks to fill the GPU a few times over, split among the batch entries.
  const int64_t per_entry = std::max<int64_t>(1, 4 * cuda::multiprocessor_count(Jb.get_device()) / B);
  const int nblk = static_cast<int>(std::min<int64_t>(per_entry, (n + cols_per_block - 1) / cols_per_block));
  Tensor partial = empty_on(Jb, {B * nblk * K * K}, kDouble);
  const scalar_t* J = Jb.const_data_ptr<scalar_t>();
  double* out = partial.mutable_data_ptr<double>();
  over_batch(B, nblk, [&](int64_t b0, int64_t count) {
    launch<kernel>({static_cast<unsigned>(count * nblk), kThreads}, J + b0 * K * n, static_cast<int>(K), n, nblk,
                   out + b0 * nblk * K * K);
  });
  return {partial, nblk};
}

template <typename scalar_t>
std::pair<Tensor, int> launch_gram_partials(const Tensor& Jb) {
  const int64_t K = Jb.size(1);
  if (K <= 2) return gram_partials<gram_registers_kernel<scalar_t, 2, 4>, scalar_t>(Jb, kThreads * 4);
  if (K <= 4) return gram_partials<gram_registers_kernel<scalar_t, 4, 4>, scalar_t>(Jb, kThreads * 4);
  if (K <= 8) return gram_partials<gram_registers_kernel<scalar_t, 8, 2>, scalar_t>(Jb, kThreads * 2);
  if (K <= 16) return gram_partials<gram_tiles_kernel<scalar_t, 16>, scalar_t>(Jb, TileShape<16>::kChunk);
  if (K <= 32) return gram_partials<gram_tiles_kernel<scalar_t, 32>, scalar_t>(Jb, TileShape<32>::kChunk);
  return gram_partials<gram_tiles_kernel<scalar_t, 64>, scalar_t>(Jb, TileShape<64>::kChunk);
}

// K > 64: G = sum over chunks of columns of Jc Jc^T, each chunk converted to float64 and
// multiplied by a float64 GEMM (cuBLAS through torch's matmul: exact products, float64 sums,
// never TF32). At most one chunk of J is converted at a time (2^22 elements, 32 MB), not the
// whole J. Each chunk's product is one "block" of the [B, nchunks, K, K] partials that
// gram_finalize_kernel sums in a fixed order and mirrors (exactly symmetric, deterministic).
constexpr int64_t kGemmChunkElements = int64_t(1) << 22;

std::pair<Tensor, int> gram_gemm_partials(const Tensor& Jb) {
  const int64_t B = Jb.size(0), K = Jb.size(1), n = Jb.size(2);
  const int64_t cols = Jb.scalar_type() == kDouble ? n : std::max<int64_t>(1, kGemmChunkElements / (B * K));
  const int64_t nchunks = (n + cols - 1) / cols;
  Tensor partial = empty_on(Jb, {B, nchunks, K, K}, kDouble);
  Tensor J = Jb;  // a handle (stable narrow takes a non-const one), not a copy
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t c0 = c * cols;
    const Tensor Jc = to_dtype(torch::stable::narrow(J, 2, c0, std::min(cols, n - c0)), kDouble);
    Tensor block = torch::stable::select(partial, 1, c);
    torch::stable::copy_(block, torch::stable::matmul(Jc, torch::stable::transpose(Jc, 1, 2)));
  }
  return {partial, static_cast<int>(nchunks)};
}

Tensor gram_cuda(const Tensor& J, std::optional<ScalarType> dtype) {
  const Tensor Jb = as_batched_jacobian(J, "gram");
  const ScalarType out_dtype = gram_out_dtype(J, dtype);
  const cuda::DeviceGuard guard(Jb.get_device_index());
  const int64_t B = Jb.size(0), K = Jb.size(1);
  Tensor G;
  if (B == 0) {  // nothing to launch (a 0-block grid is a CUDA error)
    G = empty_on(Jb, {0, K, K}, out_dtype);
  } else {
    G = empty_on(Jb, {B, K, K}, out_dtype);
    std::pair<Tensor, int> partials;
    if (K > 64) {
      partials = gram_gemm_partials(Jb);
    } else {
      HRGRAD_DISPATCH_FLOATING_AND_HALF(Jb.scalar_type(), "gram_cuda",
                                        [&] { partials = launch_gram_partials<scalar_t>(Jb); });
    }
    const int64_t entries = B * (K * (K + 1) / 2), per_launch = kMaxGridX * (kThreads / 32);
    HRGRAD_DISPATCH_FLOATING(out_dtype, "gram_finalize", [&] {
      for (int64_t e0 = 0; e0 < entries; e0 += per_launch) {
        const int64_t warps = std::min(per_launch, entries - e0);
        launch<gram_finalize_kernel<scalar_t>>({static_cast<unsigned>((warps + kThreads / 32 - 1) / (kThreads / 32)), kThreads},
                                               partials.first.const_data_ptr<double>(), static_cast<int>(K),
                                               partials.second, e0, entries, G.mutable_data_ptr<scalar_t>());
      }
    });
  }
  return J.dim() == 2 ? squeeze(G, 0) : G;
}

// ---- hrgrad_weights: one block (one warp) per batch entry -----------------------------------
// The K x K solve is short and latency-bound. It runs the source of the CPU kernel
// (gram/hrgrad_solve.h) with its scratch (hrgrad_solve_workspace(K) doubles) in shared memory
// when that fits in 48 KB and in global memory otherwise:
//   K <= 4: one thread solves (the other lanes leave);
//   K  > 4: the whole warp (WarpTeam): the lanes split the angles and updates of every step of
//           the round-robin Jacobi (cone_solve.h: K / 2 disjoint rotations per step, K - 1
//           dependent steps per sweep, 3 __syncwarp each), the O(K^3) part of the solve, and
//           lane 0 does the rest. Before (cyclic Jacobi, a warp above K = 16 only) one H200
//           took 0.23 ms at K = 8, 3.2 ms at K = 32 and 25 ms at K = 64 for one problem.
// The arithmetic is that of the CPU kernel, but not bit for bit: nvcc contracts a * b + c into
// FMAs where the host compiler does not, and exp / log come from another math library, so the
// weights agree to rounding (the dual-cone fallback included: an exact active-set solve,
// cone_solve.h). The warp's Jacobi rotates in another order than one thread's (round-robin,
// K / 2 pairs at once, against cyclic), so the two agree to rounding too.
constexpr int64_t kMaxDynamicSmem = 48 * 1024;  // without the opt-in attribute
constexpr int kWarpSolveAbove = 4;              // K above which a warp solves

// The 32 lanes of a warp as a team of cone_solve.h (lane 0 leads). __syncwarp orders the
// lanes' shared- and global-memory accesses to the problem's scratch.
struct WarpTeam {
  __device__ int rank() const { return threadIdx.x % 32; }
  __device__ int size() const { return 32; }
  __device__ bool leader() const { return threadIdx.x % 32 == 0; }
  __device__ void sync() const { __syncwarp(); }
  __device__ int broadcast(int x) const {
    __syncwarp();
    return __shfl_sync(0xffffffffu, x, 0);
  }
};

template <typename scalar_t, bool kWarpSolve>
__global__ void hrgrad_weights_kernel(const scalar_t* __restrict__ G, int K, int length_model, double rtol,
                                      bool scratch_in_smem, scalar_t* __restrict__ w, int* __restrict__ status,
                                      double* __restrict__ workspace) {
  HRGRAD_DYNAMIC_SHARED(double, smem_scratch);
  const int64_t b = blockIdx.x;
  double* ws = scratch_in_smem ? smem_scratch : workspace + b * hrgrad_solve_workspace(K);
  if constexpr (kWarpSolve) {
    const int s = hrgrad_solve<scalar_t, scalar_t>(G + b * K * K, K, length_model, rtol, w + b * K, ws, WarpTeam{});
    if (threadIdx.x == 0) status[b] = s;
  } else {
    if (threadIdx.x != 0) return;
    status[b] = hrgrad_solve<scalar_t, scalar_t>(G + b * K * K, K, length_model, rtol, w + b * K, ws);
  }
}

std::tuple<Tensor, Tensor> hrgrad_weights_cuda(const Tensor& G, std::string length_model,
                                                       std::optional<double> rcond) {
  const Tensor Gb = as_batched_gram(G);
  const int lm = parse_length_model(length_model);
  const double rtol = resolve_rcond(rcond, G);
  const cuda::DeviceGuard guard(Gb.get_device_index());
  const int64_t B = Gb.size(0), K = Gb.size(1);
  Tensor w = empty_on(Gb, {B, K});
  Tensor status = empty_on(Gb, {B}, kInt);
  const int64_t scratch_bytes = hrgrad_solve_workspace(K) * static_cast<int64_t>(sizeof(double));
  const bool in_smem = scratch_bytes <= kMaxDynamicSmem;
  // Global scratch only when shared memory is too small; allocated through the caching
  // allocator, so the device never waits on the host.
  Tensor workspace = empty_on(Gb, {in_smem ? 1 : B * hrgrad_solve_workspace(K)}, kDouble);
  if (B > 0) HRGRAD_DISPATCH_FLOATING(Gb.scalar_type(), "hrgrad_weights_cuda", [&] {
    const auto run = [&](auto warp_solve) {
      over_batch(B, 1, [&](int64_t b0, int64_t count) {
        launch<hrgrad_weights_kernel<scalar_t, decltype(warp_solve)::value>>(
            {static_cast<unsigned>(count), 32, static_cast<size_t>(in_smem ? scratch_bytes : 0)},
            Gb.const_data_ptr<scalar_t>() + b0 * K * K, static_cast<int>(K), lm, rtol, in_smem,
            w.mutable_data_ptr<scalar_t>() + b0 * K, status.mutable_data_ptr<int>() + b0,
            workspace.mutable_data_ptr<double>() + (in_smem ? 0 : b0 * hrgrad_solve_workspace(K)));
      });
    };
    if (K > kWarpSolveAbove) run(std::true_type{});
    else run(std::false_type{});
  });
  if (G.dim() == 2) return {squeeze(w, 0), squeeze(status, 0)};
  return {w, status};
}

// ---- combine: out[b, c] (+)= sum_k w[b, k] J[b, k, c] --------------------------------------
// The weights are read from global memory: every thread of a block reads the same w[b, k] at
// the same time (one cached transaction per warp), and no shared memory bounds K.
template <typename scalar_t, typename acc_t, bool kAccumulate, int UNROLL>
__global__ void __launch_bounds__(kThreads)
combine_kernel(const scalar_t* __restrict__ J, const acc_t* __restrict__ w, int K, int64_t n, int nblk,
               scalar_t* __restrict__ out) {
  const int b = blockIdx.x / nblk, blk = blockIdx.x % nblk;
  const scalar_t* Jb = J + static_cast<int64_t>(b) * K * n;
  const acc_t* wb = w + static_cast<int64_t>(b) * K;
  scalar_t* ob = out + static_cast<int64_t>(b) * n;
  const int64_t stride = static_cast<int64_t>(nblk) * kThreads * UNROLL;
  for (int64_t base = static_cast<int64_t>(blk) * kThreads * UNROLL + threadIdx.x; base < n; base += stride) {
    acc_t s[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) s[u] = acc_t(0);
    for (int k = 0; k < K; ++k) {
      const acc_t wk = wb[k];
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
void launch_combine(const Tensor& Jb, const Tensor& w, Tensor& out) {
  const int64_t B = Jb.size(0), K = Jb.size(1), n = Jb.size(2);
  if (B == 0) return;
  constexpr int U = 4;
  const int64_t target = 4 * cuda::multiprocessor_count(Jb.get_device());
  const int64_t per_entry = std::max<int64_t>(1, target / B);
  const int nblk = static_cast<int>(std::min<int64_t>(per_entry * 4, (n + kThreads * U - 1) / (kThreads * U)));
  const ScalarType acc = acc_type_of(Jb.scalar_type());
  const Tensor wb = make_contiguous(to_dtype(reshape(w, {B, K}), acc));
  HRGRAD_DISPATCH_FLOATING_AND_HALF(Jb.scalar_type(), "combine_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    over_batch(B, nblk, [&](int64_t b0, int64_t count) {
      launch<combine_kernel<scalar_t, acc_t, kAccumulate, U>>(
          {static_cast<unsigned>(count * nblk), kThreads}, Jb.const_data_ptr<scalar_t>() + b0 * K * n,
          wb.const_data_ptr<acc_t>() + b0 * K, static_cast<int>(K), n, nblk, out.mutable_data_ptr<scalar_t>() + b0 * n);
    });
  });
}

Tensor combine_cuda(const Tensor& J, const Tensor& w) {
  const Tensor Jb = as_batched_jacobian(J, "combine");
  check_combine_weights(J, w, "combine");
  const cuda::DeviceGuard guard(Jb.get_device_index());
  Tensor out = empty_on(Jb, {Jb.size(0), Jb.size(2)});
  launch_combine<false>(Jb, w, out);
  return J.dim() == 2 ? squeeze(out, 0) : out;
}

void combine_accumulate_cuda(Tensor out, const Tensor& J, const Tensor& w) {
  const Tensor Jb = check_combine_accumulate(out, J, w);
  const cuda::DeviceGuard guard(Jb.get_device_index());
  launch_combine<true>(Jb, w, out);
}

}  // namespace

HRGRAD_EXT_CUDA_KERNELS(m) {
  m.impl("gram", TORCH_BOX(&gram_cuda));
  m.impl("hrgrad_weights", TORCH_BOX(&hrgrad_weights_cuda));
  m.impl("combine", TORCH_BOX(&combine_cuda));
  m.impl("combine_accumulate_", TORCH_BOX(&combine_accumulate_cuda));
}

}  // namespace hrgrad_ext
