// Input validation shared by every op. TORCH_CHECK raises a Python RuntimeError with the
// message; the Python wrappers in hrgrad_ext.ops turn the common cases into ValueError /
// TypeError before the op is reached, these checks are the last line for direct
// torch.ops.hrgrad_ext callers.
#pragma once
#include <ATen/ATen.h>

namespace hrgrad_ext {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Accumulation type: float32 for reduced precision and float32 inputs, float64 for float64.
inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

#define HRGRAD_CHECK_FLOAT(op, name, t)                                                   \
  TORCH_CHECK(::hrgrad_ext::is_supported_float((t).scalar_type()), op, ": ", name,        \
              " must be float16, bfloat16, float32 or float64, got ", (t).scalar_type())

#define HRGRAD_CHECK_SAME_DEVICE(op, a, an, b, bn)                                        \
  TORCH_CHECK((a).device() == (b).device(), op, ": ", an, " is on ", (a).device(), " but ", \
              bn, " is on ", (b).device())

}  // namespace hrgrad_ext
