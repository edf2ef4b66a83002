// The tensor API of the compiled core: the LibTorch stable ABI (torch/csrc/stable, torch 2.10+)
// and the header-only pieces of c10 it allows (torch/headeronly). Nothing else of torch is
// included by the kernels, so one binary runs on every torch from 2.10 on; the build sets
// TORCH_TARGET_VERSION to 2.10, which makes the headers hide anything newer.
//
// What the kernels need from a tensor library is small and kept here: shapes and dtypes,
// allocation of outputs on an input's device, contiguous/reshape views, dtype conversion,
// the intra-op thread pool, dtype dispatch and checks that raise a RuntimeError in Python.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Dispatch.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// A failed shim call as an exception. STABLE_TORCH_ERROR_CODE_CHECK (which carries the shim's
// own message) is newer than the headers of torch 2.10 / 2.11, which have the header-only
// TORCH_ERROR_CODE_CHECK alone; a build against those uses that.
#ifdef STABLE_TORCH_ERROR_CODE_CHECK
#define HRGRAD_SHIM_CHECK(call) STABLE_TORCH_ERROR_CODE_CHECK(call)
#else
#define HRGRAD_SHIM_CHECK(call) TORCH_ERROR_CODE_CHECK(call)
#endif

namespace hrgrad_ext {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

inline constexpr ScalarType kFloat = ScalarType::Float;
inline constexpr ScalarType kDouble = ScalarType::Double;
inline constexpr ScalarType kHalf = ScalarType::Half;
inline constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
inline constexpr ScalarType kInt = ScalarType::Int;

// A failed check raises RuntimeError(message) in Python: the stable ABI turns a C++ exception
// thrown by a kernel into a torch error. (STD_TORCH_CHECK would prefix the C++ function, file
// and line; the message alone is what a user should read, as with ATen's TORCH_CHECK.)
template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw std::runtime_error(message.str());
}
#define HRGRAD_CHECK(cond, ...)                                   \
  do {                                                            \
    if (!(cond)) [[unlikely]] ::hrgrad_ext::fail(__VA_ARGS__);   \
  } while (0)

// "[2, 3]": a shape as error messages print it (the spelling of torch.Size in ATen's messages).
inline std::string shape_str(const Tensor& t) {
  std::ostringstream s;
  s << '[';
  for (int64_t d = 0; d < t.dim(); ++d) s << (d ? ", " : "") << t.size(d);
  s << ']';
  return s.str();
}

inline bool same_shape(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != b.size(d)) return false;
  }
  return true;
}

// "cpu" or "cuda:0".
inline std::string device_str(const Tensor& t) {
  return t.is_cuda() ? "cuda:" + std::to_string(t.get_device_index()) : (t.is_cpu() ? "cpu" : "another device");
}

inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.is_cuda() == b.is_cuda() && a.is_cpu() == b.is_cpu() && a.get_device_index() == b.get_device_index();
}

// The stable C API's code of a dtype (the kernels allocate only these).
inline int32_t shim_dtype(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return aoti_torch_dtype_float32();
    case ScalarType::Double: return aoti_torch_dtype_float64();
    case ScalarType::Half: return aoti_torch_dtype_float16();
    case ScalarType::BFloat16: return aoti_torch_dtype_bfloat16();
    case ScalarType::Int: return aoti_torch_dtype_int32();
    default: fail("hrgrad_ext: no allocation of dtype ", t);
  }
}

// A new uninitialised contiguous tensor on the device of `like`, in `like`'s dtype unless one
// is given. Through the empty_strided shim (a direct call of the allocator), not a boxed
// dispatcher call of aten::new_empty: the fused backward kernels allocate up to ten outputs per
// call, and the host overhead per op is a target (bench/bench_overhead.py).
inline Tensor empty_on(const Tensor& like, std::vector<int64_t> sizes, std::optional<ScalarType> dtype = std::nullopt) {
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (size_t d = sizes.size(); d-- > 0;) {
    strides[d] = stride;
    stride *= sizes[d] > 1 ? sizes[d] : 1;
  }
  int32_t device_type = 0;
  HRGRAD_SHIM_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  AtenTensorHandle out = nullptr;
  HRGRAD_SHIM_CHECK(aoti_torch_empty_strided(static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(),
                                             shim_dtype(dtype.value_or(like.scalar_type())), device_type,
                                             like.get_device_index(), &out));
  return Tensor(out);
}

// t itself when already contiguous (no dispatcher call), else a contiguous copy.
inline Tensor make_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }
using torch::stable::reshape;
using torch::stable::squeeze;
using torch::stable::unsqueeze;
// The tensor itself when it already has the dtype (like Tensor::to).
inline Tensor to_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}

// torch's intra-op thread pool (at::parallel_for): f(begin, end) over [begin, end).
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  torch::stable::parallel_for(begin, end, grain, f);
}
inline int num_threads() { return static_cast<int>(torch::stable::get_num_threads()); }

// Accumulation type of an element type: float for half/bfloat16/float, double for double.
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// dtype dispatch: the body sees `scalar_t`, as with ATen's AT_DISPATCH_* macros.
#define HRGRAD_DISPATCH_FLOATING(TYPE, NAME, ...)                          \
  THO_DISPATCH_SWITCH(TYPE, NAME, THO_DISPATCH_CASE(::hrgrad_ext::kFloat, __VA_ARGS__) \
                                      THO_DISPATCH_CASE(::hrgrad_ext::kDouble, __VA_ARGS__))
#define HRGRAD_DISPATCH_FLOATING_AND_HALF(TYPE, NAME, ...)                               \
  THO_DISPATCH_SWITCH(TYPE, NAME, THO_DISPATCH_CASE(::hrgrad_ext::kFloat, __VA_ARGS__)   \
                                      THO_DISPATCH_CASE(::hrgrad_ext::kDouble, __VA_ARGS__) \
                                      THO_DISPATCH_CASE(::hrgrad_ext::kHalf, __VA_ARGS__)   \
                                      THO_DISPATCH_CASE(::hrgrad_ext::kBFloat16, __VA_ARGS__))

}  // namespace hrgrad_ext
