// Kernels with planted bugs and launches at the CUDA limits, for the self-test of the emulator
// (tests/test_cuda_emulation.py). Built into the emulation library only, never shipped.
#include "common/cuda_kernel.h"

// The self-test registers its launchers with the full C++ API (a test library, never shipped;
// the project's kernels go through the stable ABI of common/tensor.h).
#include <ATen/ATen.h>
#include <torch/library.h>

namespace hrgrad_cuda_emu_selftest {
namespace {

using hrgrad_ext::cuda::launch;

// out[t] = x[n - 1 - t] through shared memory. with_barrier = false is the planted bug: no
// __syncthreads between the writes of the buffer and the reads of other threads' entries.
__global__ void reverse_kernel(const float* x, int n, bool with_barrier, float* out) {
  HRGRAD_SHARED(float, buffer, [1024]);
  const int t = threadIdx.x;
  buffer[t] = x[t];
  if (with_barrier) __syncthreads();
  out[t] = buffer[n - 1 - t];
}

// One warp per row of 32: the row sum by butterfly shuffles. Lanes >= active_lanes return
// before the shuffles, the planted bug when active_lanes < 32 (a divergent shuffle).
__global__ void row_sum_kernel(const float* x, int active_lanes, float* out) {
  const int lane = threadIdx.x;
  if (lane >= active_lanes) return;
  float v = x[blockIdx.x * 32 + lane];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (lane == 0) out[blockIdx.x] = v;
}

// The first warp waits at one barrier, the other warps at another.
__global__ void split_barrier_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Thread 0 returns before the barrier the others wait at.
__global__ void early_exit_kernel(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// One warp: every warp intrinsic the emulator provides, on x[lane]; out[lane][0..8).
__global__ void warp_intrinsics_kernel(const float* x, float* out) {
  const int lane = threadIdx.x;
  const float v = x[lane];
  float* o = out + lane * 8;
  o[0] = __shfl_sync(0xffffffffu, v, 3);  // lane 3's value
  float scan = v;                         // inclusive prefix sum
  for (int d = 1; d < 32; d <<= 1) {
    const float t = __shfl_up_sync(0xffffffffu, scan, d);
    if (lane >= d) scan += t;
  }
  o[1] = scan;
  float segment = v;  // lane 8k: the sum of lanes 8k .. 8k + 7
  for (int d = 4; d > 0; d >>= 1) segment += __shfl_down_sync(0xffffffffu, segment, d, 8);
  o[2] = segment;
  o[3] = __shfl_xor_sync(0xffffffffu, v, 1, 4);
  o[4] = static_cast<float>(__ballot_sync(0xffffffffu, v > 0.0f) & 0xffffu);
  o[5] = static_cast<float>(__all_sync(0xffffffffu, v > -100.0f) + 2 * __any_sync(0xffffffffu, v > 100.0f));
  __syncwarp();
  if (lane < 16) {  // two half-warp shuffles with their own masks, at different calls
    o[6] = __shfl_xor_sync(0x0000ffffu, v, 8);
  } else {
    o[6] = __shfl_xor_sync(0xffff0000u, v, 8);
  }
  o[7] = __shfl_sync(0xffffffffu, v, lane + 40);  // source lane taken modulo 32
}

template <int kOptedIn>
__global__ void noop_kernel(int) {}

// 40 KB of static shared memory.
__global__ void static_shared_kernel(float* out) {
  HRGRAD_SHARED(float, big, [10 * 1024]);
  big[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = big[0];
}

at::Tensor reverse(const at::Tensor& x, bool with_barrier) {
  TORCH_CHECK(x.dim() == 1 && x.numel() <= 1024 && x.numel() > 0 && x.scalar_type() == at::kFloat);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int n = static_cast<int>(x.numel());
  launch<reverse_kernel>({1, static_cast<unsigned>(n)}, xc.const_data_ptr<float>(), n, with_barrier,
                         out.mutable_data_ptr<float>());
  return out;
}

at::Tensor row_sums(const at::Tensor& x, int64_t active_lanes) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 32 && x.size(0) > 0 && x.scalar_type() == at::kFloat);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.size(0)}, x.options());
  launch<row_sum_kernel>({static_cast<unsigned>(x.size(0)), 32}, xc.const_data_ptr<float>(),
                         static_cast<int>(active_lanes), out.mutable_data_ptr<float>());
  return out;
}

at::Tensor warp_intrinsics(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 1 && x.numel() == 32 && x.scalar_type() == at::kFloat);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({32, 8}, x.options());
  launch<warp_intrinsics_kernel>({1, 32}, xc.const_data_ptr<float>(), out.mutable_data_ptr<float>());
  return out;
}

at::Tensor split_barrier(int64_t threads) {
  at::Tensor out = at::zeros({threads});
  launch<split_barrier_kernel>({1, static_cast<unsigned>(threads)}, out.mutable_data_ptr<float>());
  return out;
}

at::Tensor early_exit(int64_t threads) {
  at::Tensor out = at::zeros({threads});
  launch<early_exit_kernel>({1, static_cast<unsigned>(threads)}, out.mutable_data_ptr<float>());
  return out;
}

void launch_noop(at::IntArrayRef grid, at::IntArrayRef block, int64_t dynamic_smem, int64_t opt_in) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3);
  const dim3 g(grid[0], grid[1], grid[2]), b(block[0], block[1], block[2]);
  if (opt_in > 0) {
    hrgrad_ext::cuda::allow_dynamic_shared_memory<noop_kernel<1>>(static_cast<size_t>(opt_in));
    launch<noop_kernel<1>>({g, b, static_cast<size_t>(dynamic_smem)}, 0);
  } else {
    launch<noop_kernel<0>>({g, b, static_cast<size_t>(dynamic_smem)}, 0);
  }
}

at::Tensor static_shared(int64_t dynamic_smem) {
  at::Tensor out = at::zeros({64});
  launch<static_shared_kernel>({1, 64, static_cast<size_t>(dynamic_smem)}, out.mutable_data_ptr<float>());
  return out;
}

}  // namespace
}  // namespace hrgrad_cuda_emu_selftest

TORCH_LIBRARY(hrgrad_cuda_emu_selftest, m) {
  using namespace hrgrad_cuda_emu_selftest;
  m.def("reverse(Tensor x, bool with_barrier) -> Tensor", &reverse);
  m.def("row_sums(Tensor x, int active_lanes) -> Tensor", &row_sums);
  m.def("warp_intrinsics(Tensor x) -> Tensor", &warp_intrinsics);
  m.def("split_barrier(int threads) -> Tensor", &split_barrier);
  m.def("early_exit(int threads) -> Tensor", &early_exit);
  m.def("launch_noop(int[] grid, int[] block, int dynamic_smem, int opt_in=0) -> ()", &launch_noop);
  m.def("static_shared(int dynamic_smem) -> Tensor", &static_shared);
}
