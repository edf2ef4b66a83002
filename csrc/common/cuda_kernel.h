// What a csrc/**/*_cuda.cu file includes instead of the CUDA runtime and c10/cuda headers.
//
// The same .cu source is compiled two ways:
//   * by nvcc, for the GPU (the shipped build);
//   * as plain C++ with HRGRAD_EXT_CUDA_EMULATION defined, against the CPU emulator of
//     tests/cuda_emu/ (threads of a block as fibers, checked barriers and warp shuffles,
//     poisoned shared memory, CUDA launch limits), so that the kernels are tested on every CI
//     run without a GPU.
// To make the second possible without rewriting the source, the few constructs that are not
// C++ go through this header:
//   launch<kernel>({grid, block, dynamic_smem}, args...)   instead of kernel<<<...>>>(args...)
//   HRGRAD_SHARED(type, name, [N][M]);                      instead of __shared__ type name[N][M];
//   HRGRAD_DYNAMIC_SHARED(type, name);                      instead of extern __shared__ ...
//   HRGRAD_EXT_CUDA_KERNELS(m) { m.impl(...); }             instead of TORCH_LIBRARY_IMPL(hrgrad_ext, CUDA, m)
// Everything else (__global__, threadIdx, __syncthreads, __shfl_*_sync, math functions) is
// written as usual. The host-side surface (stream, device guard, multiprocessor count) is kept
// to the functions below; on the GPU it goes through the LibTorch stable ABI (the current
// stream of torch, its device guard), like the rest of the compiled core (common/tensor.h).
#pragma once

#include "common/tensor.h"

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <string>
#include <string_view>
#include <utility>

#if defined(HRGRAD_EXT_CUDA_EMULATION)
#include "cuda_emulator.h"  // tests/cuda_emu/: on the include path of the emulation build only
#else
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <torch/csrc/stable/accelerator.h>
#endif

namespace hrgrad_ext::cuda {

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t dynamic_smem = 0;  // bytes; above 48 KB only after allow_dynamic_shared_memory
};

// "gram_tiles_kernel<float, 32>": the kernel's name for error messages, from the compiler's
// spelling of the template argument ("... [with auto Kernel = NAME; ...]" with g++ and nvcc).
template <auto Kernel>
std::string kernel_name() {
  std::string_view f = __PRETTY_FUNCTION__;
  const size_t at = f.find("Kernel = ");
  if (at == std::string_view::npos) return std::string(f);
  f.remove_prefix(at + 9);
  std::string name(f.substr(0, std::min(f.find(';'), f.rfind(']'))));
  for (const std::string_view scope : {"hrgrad_ext::", "{anonymous}::", "(anonymous namespace)::", "_GLOBAL__N_"}) {
    for (size_t p; (p = name.find(scope)) != std::string::npos;) {
      name.erase(p, scope == "_GLOBAL__N_" ? name.find("::", p) + 2 - p : scope.size());
    }
  }
  return name;
}

#if defined(HRGRAD_EXT_CUDA_EMULATION)

using DeviceGuard = hrgrad_cuda_emu::DeviceGuard;
inline int multiprocessor_count(int /*device*/) { return hrgrad_cuda_emu::multiprocessor_count(); }

template <auto Kernel, typename... Args>
void launch(const LaunchConfig& cfg, Args&&... args) {
  hrgrad_cuda_emu::launch<Kernel>(kernel_name<Kernel>(), cfg.grid, cfg.block, cfg.dynamic_smem,
                                  std::forward<Args>(args)...);
}

template <auto Kernel>
void allow_dynamic_shared_memory(size_t bytes) {
  hrgrad_cuda_emu::set_max_dynamic_shared_memory(kernel_name<Kernel>(), bytes);
}

#define HRGRAD_SHARED(type, name, dims)      \
  using name##_shared_type_ = type dims;         \
  static const char name##_shared_site_ = 0;     \
  auto& name = ::hrgrad_cuda_emu::shared_array<name##_shared_type_>(&name##_shared_site_)
#define HRGRAD_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::hrgrad_cuda_emu::dynamic_shared())
#define HRGRAD_EXT_CUDA_KERNELS(m) STABLE_TORCH_LIBRARY_IMPL(hrgrad_ext_emu, CPU, m)

#else  // nvcc

// Constructed from a tensor's get_device_index().
using DeviceGuard = torch::stable::accelerator::DeviceGuard;

// torch's current stream on the current device (the one the DeviceGuard of the op selected),
// from the stable C shim aoti_torch_get_current_cuda_stream. It lives in libtorch_cuda, which
// a CPU build of torch does not have: looked up at run time (hrgrad_ext makes torch's loaded
// libraries global first), so a CUDA wheel still imports under a CPU torch, where no CUDA
// tensor, hence no call of this, can exist.
inline cudaStream_t current_stream() {
  using CurrentStreamShim = int32_t (*)(int32_t, void**);
  static const auto shim =
      reinterpret_cast<CurrentStreamShim>(dlsym(RTLD_DEFAULT, "aoti_torch_get_current_cuda_stream"));
  HRGRAD_CHECK(shim != nullptr, "hrgrad_ext: torch's CUDA stream shim (aoti_torch_get_current_cuda_stream) is not "
               "loaded; the CUDA kernels need a CUDA build of torch");
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  HRGRAD_CHECK(err == cudaSuccess, "cudaGetDevice: ", cudaGetErrorString(err));
  void* stream = nullptr;
  HRGRAD_CHECK(shim(device, &stream) == AOTI_TORCH_SUCCESS, "aoti_torch_get_current_cuda_stream failed on device ",
               device);
  return static_cast<cudaStream_t>(stream);
}

// Cached: the attribute query is cheap but not free, and ops call it on every launch.
inline int multiprocessor_count(int device) {
  static std::atomic<int> counts[64] = {};
  std::atomic<int>& cached = counts[device & 63];
  int n = cached.load(std::memory_order_relaxed);
  if (n == 0) {
    const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    HRGRAD_CHECK(err == cudaSuccess, "cudaDeviceGetAttribute: ", cudaGetErrorString(err));
    cached.store(n, std::memory_order_relaxed);
  }
  return n;
}

template <auto Kernel, typename... Args>
void launch(const LaunchConfig& cfg, Args&&... args) {
  Kernel<<<cfg.grid, cfg.block, cfg.dynamic_smem, current_stream()>>>(std::forward<Args>(args)...);
  const cudaError_t err = cudaGetLastError();
  HRGRAD_CHECK(err == cudaSuccess, "CUDA kernel launch failed: ", kernel_name<Kernel>(), " grid (", cfg.grid.x, ",",
              cfg.grid.y, ",", cfg.grid.z, ") block (", cfg.block.x, ",", cfg.block.y, ",", cfg.block.z, ") ",
              cfg.dynamic_smem, " bytes of dynamic shared memory: ", cudaGetErrorString(err));
}

// The opt-in for more than 48 KB of dynamic shared memory (up to the device's limit).
template <auto Kernel>
void allow_dynamic_shared_memory(size_t bytes) {
  const cudaError_t err =
      cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  HRGRAD_CHECK(err == cudaSuccess, "cudaFuncSetAttribute(", kernel_name<Kernel>(), ", ", bytes,
              " bytes of dynamic shared memory): ", cudaGetErrorString(err));
}

#define HRGRAD_SHARED(type, name, dims) __shared__ type name dims
#define HRGRAD_DYNAMIC_SHARED(type, name)                      \
  extern __shared__ __align__(16) unsigned char hrgrad_dynamic_smem_[]; \
  type* name = reinterpret_cast<type*>(hrgrad_dynamic_smem_)
#define HRGRAD_EXT_CUDA_KERNELS(m) STABLE_TORCH_LIBRARY_IMPL(hrgrad_ext, CUDA, m)

#endif

}  // namespace hrgrad_ext::cuda
