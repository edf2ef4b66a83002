// Input validation shared by every op. A failed check raises a Python RuntimeError with the
// message; the Python wrappers in hrgrad_ext.ops turn the common cases into ValueError /
// TypeError before the op is reached, these checks are the last line for direct
// torch.ops.hrgrad_ext callers.
#pragma once
#include "common/tensor.h"

namespace hrgrad_ext {

inline bool is_supported_float(ScalarType t) {
  return t == kFloat || t == kDouble || t == kHalf || t == kBFloat16;
}

// Accumulation type: float32 for reduced precision and float32 inputs, float64 for float64.
inline ScalarType acc_type_of(ScalarType t) { return t == kDouble ? kDouble : kFloat; }

#define HRGRAD_CHECK_FLOAT(op, name, t)                                                   \
  HRGRAD_CHECK(::hrgrad_ext::is_supported_float((t).scalar_type()), op, ": ", name,       \
               " must be float16, bfloat16, float32 or float64, got ", (t).scalar_type())

#define HRGRAD_CHECK_SAME_DEVICE(op, a, an, b, bn)                                        \
  HRGRAD_CHECK(::hrgrad_ext::same_device(a, b), op, ": ", an, " is on ",                  \
               ::hrgrad_ext::device_str(a), " but ", bn, " is on ", ::hrgrad_ext::device_str(b))

}  // namespace hrgrad_ext
