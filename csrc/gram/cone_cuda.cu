// CUDA kernels of the cone ops: dual_cone_weights and mgda_weights.
//
// Each solve is a short, sequential, latency-bound K x K computation (cone_solve.h, shared with
// the CPU kernels), so one thread runs one whole problem: dual_cone_weights first factors every
// Gram matrix (one thread per matrix), then projects every (matrix, target) pair (one thread per
// pair; UPGrad's K projections of one matrix run side by side); mgda_weights runs one thread per
// matrix. Each thread keeps its scratch in global memory (reached through L1); the number of
// threads is capped so that the scratch stays within kScratchBudget, the threads then striding
// over the problems. Nothing synchronises with the host.

#include <algorithm>

#include "common/cuda_kernel.h"
#include "gram/cone_common.h"

namespace hrgrad_ext {
namespace {

using cuda::launch;

constexpr int kSolverBlock = 64;                   // threads per block, each solving whole problems
constexpr int64_t kScratchBudget = 256LL << 20;    // bytes of per-thread scratch at most

// Threads for `items` independent solves of `scratch` doubles each: one per item, capped by the
// scratch budget (but never below one block).
int64_t solver_threads(int64_t items, int64_t scratch) {
  const int64_t cap = std::max<int64_t>(kSolverBlock, kScratchBudget / (scratch * static_cast<int64_t>(sizeof(double))));
  return std::min(items, cap);
}

// Blocks for `threads` threads. At most 2^31 - 1 (the grid's x limit): the scratch budget caps
// the threads far below that.
unsigned blocks_for(int64_t threads) {
  return static_cast<unsigned>((threads + kSolverBlock - 1) / kSolverBlock);
}

template <typename scalar_t>
__global__ void
cone_factor_kernel(const scalar_t* __restrict__ G, int K, double rtol, int64_t B, int64_t threads,
                   double* __restrict__ factors, double* __restrict__ scratch) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= threads) return;
  double* mine = scratch + tid * cone_factor_scratch(K);
  for (int64_t b = tid; b < B; b += threads)
    cone_factor<scalar_t>(G + b * K * K, K, rtol, factors + b * cone_factor_size(K), mine);
}

template <typename scalar_t>
__global__ void
cone_project_kernel(const double* __restrict__ factors, int K, const scalar_t* __restrict__ U, int64_t T,
                    int64_t items, int64_t threads, scalar_t* __restrict__ W, int* __restrict__ status,
                    double* __restrict__ workspace) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= threads) return;
  double* mine = workspace + tid * cone_project_workspace(K);
  for (int64_t i = tid; i < items; i += threads) {
    status[i] = cone_project<scalar_t, scalar_t>(factors + (i / T) * cone_factor_size(K), K, U + i * K,
                                                 W + i * K, mine);
  }
}

template <typename scalar_t>
__global__ void
mgda_weights_kernel(const scalar_t* __restrict__ G, int K, double rtol, int64_t B, int64_t threads,
                    scalar_t* __restrict__ w, int* __restrict__ status, double* __restrict__ workspace) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= threads) return;
  double* mine = workspace + tid * mgda_workspace(K);
  for (int64_t b = tid; b < B; b += threads)
    status[b] = mgda_solve<scalar_t, scalar_t>(G + b * K * K, K, rtol, w + b * K, mine);
}

std::tuple<Tensor, Tensor> dual_cone_weights_cuda(const Tensor& G, const Tensor& U,
                                                          std::optional<double> rcond) {
  const DualConeCall call(G, U, rcond);
  const int64_t B = call.B, K = call.K, T = call.T;
  if (B * T == 0) return call.result();
  const cuda::DeviceGuard guard(call.Gb.get_device_index());
  // Scratch through the caching allocator: the device never waits on the host.
    Tensor factors = empty_on(call.Gb, {B * cone_factor_size(K)}, kDouble);
  const int64_t factor_threads = solver_threads(B, cone_factor_scratch(K));
  Tensor factor_scratch = empty_on(call.Gb, {factor_threads * cone_factor_scratch(K)}, kDouble);
  const int64_t project_threads = solver_threads(B * T, cone_project_workspace(K));
  Tensor workspace = empty_on(call.Gb, {project_threads * cone_project_workspace(K)}, kDouble);
  HRGRAD_DISPATCH_FLOATING(call.Gb.scalar_type(), "dual_cone_weights_cuda", [&] {
    launch<cone_factor_kernel<scalar_t>>({blocks_for(factor_threads), kSolverBlock}, call.Gb.const_data_ptr<scalar_t>(),
                                         static_cast<int>(K), call.rtol, B, factor_threads,
                                         factors.mutable_data_ptr<double>(), factor_scratch.mutable_data_ptr<double>());
    launch<cone_project_kernel<scalar_t>>({blocks_for(project_threads), kSolverBlock}, factors.const_data_ptr<double>(),
                                          static_cast<int>(K), call.Ub.const_data_ptr<scalar_t>(), T, B * T,
                                          project_threads, call.W.mutable_data_ptr<scalar_t>(),
                                          call.status.mutable_data_ptr<int>(), workspace.mutable_data_ptr<double>());
  });
  return call.result();
}

std::tuple<Tensor, Tensor> mgda_weights_cuda(const Tensor& G, std::optional<double> rcond) {
  const MgdaCall call(G, rcond);
  const int64_t B = call.B, K = call.K;
  if (B == 0) return call.result();
  const cuda::DeviceGuard guard(call.Gb.get_device_index());
  const int64_t threads = solver_threads(B, mgda_workspace(K));
  Tensor workspace = empty_on(call.Gb, {threads * mgda_workspace(K)}, kDouble);
  HRGRAD_DISPATCH_FLOATING(call.Gb.scalar_type(), "mgda_weights_cuda", [&] {
    launch<mgda_weights_kernel<scalar_t>>({blocks_for(threads), kSolverBlock}, call.Gb.const_data_ptr<scalar_t>(),
                                          static_cast<int>(K), call.rtol, B, threads, call.w.mutable_data_ptr<scalar_t>(),
                                          call.status.mutable_data_ptr<int>(), workspace.mutable_data_ptr<double>());
  });
  return call.result();
}

}  // namespace

HRGRAD_EXT_CUDA_KERNELS(m) {
  m.impl("dual_cone_weights", TORCH_BOX(&dual_cone_weights_cuda));
  m.impl("mgda_weights", TORCH_BOX(&mgda_weights_cuda));
}

}  // namespace hrgrad_ext
