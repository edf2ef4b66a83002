// Autograd of the cone ops (dual_cone_weights, mgda_weights): they are not differentiable. Both
// are active-set solves, piecewise smooth in G with kinks wherever the active set changes, and
// no derivative is implemented; a gradient or tangent on G or U raises (see
// check_not_differentiable) instead of silently being taken as zero. The status outputs are
// integers. Aggregators built on these ops (UPGrad, MGDA) are therefore not differentiable
// either, as in TorchJD.
#include "autograd/autograd_common.h"

#include <tuple>

namespace hrgrad_ext::autograd {
namespace {

constexpr const char* kWhy = "an exact active-set solve; its derivative is not implemented";

std::tuple<at::Tensor, at::Tensor> dual_cone_weights_autograd(c10::DispatchKeySet ks, const at::Tensor& G,
                                                              const at::Tensor& U, std::optional<double> rcond) {
  static const auto op =
      op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, std::optional<double>)>(
          "hrgrad_ext::dual_cone_weights");
  check_not_differentiable("dual_cone_weights", "G", G, kWhy);
  check_not_differentiable("dual_cone_weights", "U", U, kWhy);
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.redispatch(below_autograd(ks), G, U, rcond);
}

std::tuple<at::Tensor, at::Tensor> mgda_weights_autograd(c10::DispatchKeySet ks, const at::Tensor& G,
                                                         std::optional<double> rcond) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, std::optional<double>)>(
      "hrgrad_ext::mgda_weights");
  check_not_differentiable("mgda_weights", "G", G, kWhy);
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.redispatch(below_autograd(ks), G, rcond);
}

}  // namespace

TORCH_LIBRARY_IMPL(hrgrad_ext, Autograd, m) {
  m.impl("dual_cone_weights", &dual_cone_weights_autograd);
  m.impl("mgda_weights", &mgda_weights_autograd);
}

}  // namespace hrgrad_ext::autograd
