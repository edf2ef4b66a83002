// The one registration point of the extension: every op schema of the torch.ops.hrgrad_ext
// namespace is declared here; CPU and CUDA kernels register their implementations next to
// their code with STABLE_TORCH_LIBRARY_IMPL. All of it goes through the LibTorch stable ABI
// (common/tensor.h), so this library loads on every torch >= 2.10. Autograd (Autograd key,
// every device) is the separate library csrc/autograd, tied to the torch it was built with;
// fake (meta) kernels and vmap rules are registered from Python (hrgrad_ext/ops), as in
// PyTorch's custom-op tutorial.
#include <torch/csrc/stable/library.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

STABLE_TORCH_LIBRARY(hrgrad_ext, m) {
  // --- HRGrad Gram / rotation solve / combine (csrc/gram) ---------------------------------
  // J [..., K, n] -> J J^T [..., K, K]; dtype: float32 or float64 output (default float64
  // for float64 input, else float32; accumulation is never below float32).
  m.def("gram(Tensor J, ScalarType? dtype=None) -> Tensor");
  // G [..., K, K] -> (w [..., K] in G's dtype, status [...] int32 bit flags).
  m.def("hrgrad_weights(Tensor G, str length_model=\"projection\", float? rcond=None) -> (Tensor, Tensor)");
  // J [..., K, n], w [..., K] -> J^T w [..., n] in J's dtype.
  m.def("combine(Tensor J, Tensor w) -> Tensor");
  // out [n] += J^T w for J [K, n] (any shapes with n elements per row), in place.
  m.def("combine_accumulate_(Tensor(a!) out, Tensor J, Tensor w) -> ()");
  // Projection onto the dual cone {x : J x >= 0} from G [..., K, K]: for each weight vector
  // U [..., t, :], W [..., t, :] = U [..., t, :] + D^-1 mu (mu >= 0) with J^T W the projection
  // of J^T U. status [..., T] int32 bit flags.
  m.def("dual_cone_weights(Tensor G, Tensor U, float? rcond=None) -> (Tensor, Tensor)");
  // MGDA: convex weights w [..., K] of the minimum-norm point of the convex hull of the task
  // gradients (zero when the hull contains 0), status [...] int32.
  m.def("mgda_weights(Tensor G, float? rcond=None) -> (Tensor, Tensor)");

  // --- Velocity-space quadrature of the kinetic residuals (csrc/kinetic) ------------------
#include "kinetic/schemas.inc"
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef HRGRAD_EXT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(HRGRAD_EXT_CUDA_ARCHS);
  info["nvcc_version"] = std::string(HRGRAD_EXT_NVCC_VERSION);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string();
  info["nvcc_version"] = pybind11::none();
#endif
  info["torch_version"] = std::string(HRGRAD_EXT_TORCH_VERSION);
  // The oldest torch this binary runs on (TORCH_TARGET_VERSION of the stable ABI, which our
  // CMake always sets). A build that does not pin it (the shared CUDA emulation tool compiles
  // these sources with its own flags) uses the newest stable headers: only the torch it was
  // built with is known to work.
#ifdef TORCH_TARGET_VERSION
  info["torch_min_version"] = std::to_string((TORCH_TARGET_VERSION >> 56) & 0xff) + "." +
                              std::to_string((TORCH_TARGET_VERSION >> 48) & 0xff);
#else
  info["torch_min_version"] = std::string(HRGRAD_EXT_TORCH_VERSION);
#endif
  info["stable_abi"] = true;
  info["compiler"] = std::string(HRGRAD_EXT_COMPILER);
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "hrgrad-ext compiled core: importing it registers torch.ops.hrgrad_ext";
  mod.def("build_info", &build_info, "What this build compiled (CUDA, architectures, versions).");
}
