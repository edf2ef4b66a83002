// CPU kernels of the cone ops: dual_cone_weights (projection onto the dual cone of the task
// gradients, UPGrad's building block) and mgda_weights (minimum-norm point of their convex
// hull). The solves themselves are in cone_solve.h, shared with the CUDA kernels.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "gram/cone_common.h"

namespace hrgrad_ext {
namespace {

std::tuple<at::Tensor, at::Tensor> dual_cone_weights_cpu(const at::Tensor& G, const at::Tensor& U,
                                                         std::optional<double> rcond) {
  constexpr const char* op = "dual_cone_weights";
  const at::Tensor Gb = as_batched_gram(G, op);
  const at::Tensor Ub = as_batched_targets(U, G, op);
  const double rtol = resolve_rcond(rcond, G, op);
  const int64_t B = Gb.size(0), K = Gb.size(1), T = Ub.size(1);
  at::Tensor W = at::empty({B, T, K}, Gb.options());
  at::Tensor status = at::empty({B, T}, Gb.options().dtype(at::kInt));
  if (B * T > 0) {
    // Phase 1: one factor per Gram matrix; phase 2: every (matrix, target) pair on its own.
    const int64_t fsize = cone_factor_size(K);
    std::vector<double> factors(static_cast<size_t>(B * fsize));
    int* st = status.mutable_data_ptr<int>();
    AT_DISPATCH_FLOATING_TYPES(Gb.scalar_type(), "dual_cone_weights_cpu", [&] {
      const scalar_t* g = Gb.const_data_ptr<scalar_t>();
      const scalar_t* u = Ub.const_data_ptr<scalar_t>();
      scalar_t* w = W.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<double> scratch(static_cast<size_t>(cone_factor_scratch(K)));
        for (int64_t b = b0; b < b1; ++b)
          cone_factor<scalar_t>(g + b * K * K, static_cast<int>(K), rtol, factors.data() + b * fsize, scratch.data());
      });
      at::parallel_for(0, B * T, 1, [&](int64_t i0, int64_t i1) {
        std::vector<double> ws(static_cast<size_t>(cone_project_workspace(K)));
        for (int64_t i = i0; i < i1; ++i) {
          st[i] = cone_project<scalar_t, scalar_t>(factors.data() + (i / T) * fsize, static_cast<int>(K),
                                                   u + i * K, w + i * K, ws.data());
        }
      });
    });
  }
  if (G.dim() == 2) return {W.squeeze(0), status.squeeze(0)};
  return {W, status};
}

std::tuple<at::Tensor, at::Tensor> mgda_weights_cpu(const at::Tensor& G, std::optional<double> rcond) {
  constexpr const char* op = "mgda_weights";
  const at::Tensor Gb = as_batched_gram(G, op);
  const double rtol = resolve_rcond(rcond, G, op);
  const int64_t B = Gb.size(0), K = Gb.size(1);
  at::Tensor w = at::empty({B, K}, Gb.options());
  at::Tensor status = at::empty({B}, Gb.options().dtype(at::kInt));
  int* st = status.mutable_data_ptr<int>();
  AT_DISPATCH_FLOATING_TYPES(Gb.scalar_type(), "mgda_weights_cpu", [&] {
    const scalar_t* g = Gb.const_data_ptr<scalar_t>();
    scalar_t* wp = w.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<double> ws(static_cast<size_t>(mgda_workspace(K)));
      for (int64_t b = b0; b < b1; ++b)
        st[b] = mgda_solve<scalar_t, scalar_t>(g + b * K * K, static_cast<int>(K), rtol, wp + b * K, ws.data());
    });
  });
  if (G.dim() == 2) return {w.squeeze(0), status.squeeze(0)};
  return {w, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(hrgrad_ext, CPU, m) {
  m.impl("dual_cone_weights", &dual_cone_weights_cpu);
  m.impl("mgda_weights", &mgda_weights_cpu);
}

}  // namespace hrgrad_ext
