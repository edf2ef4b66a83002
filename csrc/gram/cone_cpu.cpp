// CPU kernels of the cone ops: dual_cone_weights (projection onto the dual cone of the task
// gradients, UPGrad's building block) and mgda_weights (minimum-norm point of their convex
// hull). The solves themselves are in cone_solve.h, shared with the CUDA kernels.
#include <vector>

#include "gram/cone_common.h"

namespace hrgrad_ext {
namespace {

std::tuple<Tensor, Tensor> dual_cone_weights_cpu(const Tensor& G, const Tensor& U,
                                                         std::optional<double> rcond) {
  const DualConeCall call(G, U, rcond);
  const int64_t B = call.B, K = call.K, T = call.T;
  if (B * T == 0) return call.result();
  // Phase 1: one factor per Gram matrix; phase 2: every (matrix, target) pair on its own.
  const int64_t fsize = cone_factor_size(K);
  std::vector<double> factors(static_cast<size_t>(B * fsize));
  int* st = call.status.mutable_data_ptr<int>();
  HRGRAD_DISPATCH_FLOATING(call.Gb.scalar_type(), "dual_cone_weights_cpu", [&] {
    const scalar_t* g = call.Gb.const_data_ptr<scalar_t>();
    const scalar_t* u = call.Ub.const_data_ptr<scalar_t>();
    scalar_t* w = call.W.mutable_data_ptr<scalar_t>();
    parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<double> scratch(static_cast<size_t>(cone_factor_scratch(K)));
      for (int64_t b = b0; b < b1; ++b)
        cone_factor<scalar_t>(g + b * K * K, static_cast<int>(K), call.rtol, factors.data() + b * fsize, scratch.data());
    });
    parallel_for(0, B * T, 1, [&](int64_t i0, int64_t i1) {
      std::vector<double> ws(static_cast<size_t>(cone_project_workspace(K)));
      for (int64_t i = i0; i < i1; ++i) {
        st[i] = cone_project<scalar_t, scalar_t>(factors.data() + (i / T) * fsize, static_cast<int>(K), u + i * K,
                                                 w + i * K, ws.data());
      }
    });
  });
  return call.result();
}

std::tuple<Tensor, Tensor> mgda_weights_cpu(const Tensor& G, std::optional<double> rcond) {
  const MgdaCall call(G, rcond);
  const int64_t K = call.K;
  int* st = call.status.mutable_data_ptr<int>();
  HRGRAD_DISPATCH_FLOATING(call.Gb.scalar_type(), "mgda_weights_cpu", [&] {
    const scalar_t* g = call.Gb.const_data_ptr<scalar_t>();
    scalar_t* wp = call.w.mutable_data_ptr<scalar_t>();
    parallel_for(0, call.B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<double> ws(static_cast<size_t>(mgda_workspace(K)));
      for (int64_t b = b0; b < b1; ++b)
        st[b] = mgda_solve<scalar_t, scalar_t>(g + b * K * K, static_cast<int>(K), call.rtol, wp + b * K, ws.data());
    });
  });
  return call.result();
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(hrgrad_ext, CPU, m) {
  m.impl("dual_cone_weights", TORCH_BOX(&dual_cone_weights_cpu));
  m.impl("mgda_weights", TORCH_BOX(&mgda_weights_cpu));
}

}  // namespace hrgrad_ext
