// A CPU emulation of the CUDA device API that the project's kernels use, so that the device
// code of csrc/**/*_cuda.cu compiles as plain C++ (with HRGRAD_EXT_CUDA_EMULATION, through
// csrc/common/cuda_kernel.h) and runs on a CPU.
//
// Execution model (cuda_emulator.cpp):
//   * the blocks of a launch run one after another; the threads of a block run as fibers, each
//     up to its next sync point, in thread-index order in even blocks and in reverse order in
//     odd blocks (so a missing barrier shows whichever of writer and reader comes first);
//   * __syncthreads releases only when every thread of the block waits at the same call;
//     __shfl_*_sync / __syncwarp / __ballot_sync only when every lane of the mask waits at the
//     same call with the same mask. Anything else (a lane that exited, a thread at another
//     barrier) is reported as an error naming the kernel, block, thread and source line,
//     instead of the hang or undefined result it would be on a GPU;
//   * shared memory (HRGRAD_SHARED and HRGRAD_DYNAMIC_SHARED) is filled with 0xFF bytes (NaN
//     as float or double) at the start of every block;
//   * a launch is checked against the CUDA limits of an sm_90 device before it runs.
// It is not thread-safe across host threads in the kernels' sense: launches are serialised.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace hrgrad_cuda_emu {

// The built-in variables of the running thread; the scheduler updates them at every switch.
struct Coordinates {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  int lane;  // threadIdx linearised, modulo 32
};
extern Coordinates coordinates;
inline int lane_id() { return coordinates.lane; }

void sync_threads(const std::source_location& where);

enum class WarpOp { shuffle, sync, ballot };
// Waits until every lane of `mask` is at this call; returns for shuffle the value `src_lane`
// offered, for ballot the ballot of the lanes' values (0 / 1), for sync 0.
uint64_t warp_op(WarpOp op, const char* intrinsic, unsigned mask, uint64_t value, int src_lane,
                 const std::source_location& where);
[[noreturn]] void kernel_error(const std::string& what, const std::source_location& where);

// Shared memory of the running block: one buffer per declaration (site), poisoned per block.
void* shared_memory(const void* site, size_t bytes, size_t align);
template <class Array>
Array& shared_array(const void* site) {
  return *static_cast<Array*>(shared_memory(site, sizeof(Array), alignof(Array)));
}
void* dynamic_shared();

void run_launch(const std::string& kernel, dim3 grid, dim3 block, size_t dynamic_smem,
                const std::function<void()>& thread_body);
void set_max_dynamic_shared_memory(const std::string& kernel, size_t bytes);
int multiprocessor_count();

struct DeviceGuard {
  template <class Device>
  explicit DeviceGuard(const Device&) {}
};

template <class F>
struct KernelParams;
template <class... P>
struct KernelParams<void (*)(P...)> {
  using type = std::tuple<std::decay_t<P>...>;
};

// Arguments are converted to the kernel's parameter types once, as a CUDA launch copies them;
// every thread then calls the kernel with its own copy.
template <auto Kernel, class... Args>
void launch(const std::string& name, dim3 grid, dim3 block, size_t dynamic_smem, Args&&... args) {
  const typename KernelParams<decltype(Kernel)>::type params(std::forward<Args>(args)...);
  run_launch(name, grid, block, dynamic_smem, [&params] { std::apply(Kernel, params); });
}

template <class T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <class T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// The value `src` lane offers at this shuffle, once every lane of `mask` has arrived.
template <class T>
T shuffle(const char* intrinsic, unsigned mask, T var, int src, const std::source_location& where) {
  return from_bits<T>(warp_op(WarpOp::shuffle, intrinsic, mask, to_bits(var), src, where));
}

// First lane of the calling lane's segment of `width` lanes (a power of two <= 32).
inline int segment_start(int width, const std::source_location& where) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    kernel_error("warp shuffle width " + std::to_string(width) + " is not a power of two in [1, 32]", where);
  }
  return lane_id() & ~(width - 1);
}

}  // namespace hrgrad_cuda_emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define threadIdx (static_cast<const uint3&>(::hrgrad_cuda_emu::coordinates.thread_idx))
#define blockIdx (static_cast<const uint3&>(::hrgrad_cuda_emu::coordinates.block_idx))
#define blockDim (static_cast<const dim3&>(::hrgrad_cuda_emu::coordinates.block_dim))
#define gridDim (static_cast<const dim3&>(::hrgrad_cuda_emu::coordinates.grid_dim))
constexpr int warpSize = 32;

inline void __syncthreads(const std::source_location& where = std::source_location::current()) {
  ::hrgrad_cuda_emu::sync_threads(where);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const std::source_location& where = std::source_location::current()) {
  ::hrgrad_cuda_emu::warp_op(::hrgrad_cuda_emu::WarpOp::sync, "__syncwarp", mask, 0, -1, where);
}

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
              const std::source_location& where = std::source_location::current()) {
  const int src = ::hrgrad_cuda_emu::segment_start(width, where) + (src_lane & (width - 1));
  return ::hrgrad_cuda_emu::shuffle("__shfl_sync", mask, var, src, where);
}

template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                 const std::source_location& where = std::source_location::current()) {
  const int start = ::hrgrad_cuda_emu::segment_start(width, where), lane = ::hrgrad_cuda_emu::lane_id();
  const int src = lane - start >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return ::hrgrad_cuda_emu::shuffle("__shfl_up_sync", mask, var, src, where);
}

template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                   const std::source_location& where = std::source_location::current()) {
  const int start = ::hrgrad_cuda_emu::segment_start(width, where), lane = ::hrgrad_cuda_emu::lane_id();
  const int src = lane - start + static_cast<int64_t>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return ::hrgrad_cuda_emu::shuffle("__shfl_down_sync", mask, var, src, where);
}

// A source lane in a later segment of `width` lanes reads the caller's own value (as on CUDA).
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  const std::source_location& where = std::source_location::current()) {
  const int start = ::hrgrad_cuda_emu::segment_start(width, where), lane = ::hrgrad_cuda_emu::lane_id();
  const int src = (lane ^ lane_mask) < start + width ? lane ^ lane_mask : lane;
  return ::hrgrad_cuda_emu::shuffle("__shfl_xor_sync", mask, var, src, where);
}

inline unsigned __ballot_sync(unsigned mask, int predicate,
                              const std::source_location& where = std::source_location::current()) {
  return static_cast<unsigned>(::hrgrad_cuda_emu::warp_op(::hrgrad_cuda_emu::WarpOp::ballot, "__ballot_sync", mask,
                                                          predicate != 0, -1, where));
}
inline int __all_sync(unsigned mask, int predicate, const std::source_location& where = std::source_location::current()) {
  return __ballot_sync(mask, predicate, where) == mask;
}
inline int __any_sync(unsigned mask, int predicate, const std::source_location& where = std::source_location::current()) {
  return __ballot_sync(mask, predicate, where) != 0;
}

template <class T>
T __ldg(const T* p) {
  return *p;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
