// CPU kernels of the gram family: gram, hrgrad_weights, combine, combine_accumulate_.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/cpu_clones.h"
#include "gram/gram_common.h"

namespace hrgrad_ext {
namespace {

// Columns per chunk: a chunk of K rows converted to double stays in L1/L2.
constexpr int64_t kChunk = 512;

// Dot product with eight independent lanes: without -ffast-math the compiler may not
// reorder a single running sum, so spelling out the lanes is what lets it vectorise.
HRGRAD_CPU_CLONES double dot(const double* a, const double* b, int64_t len) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    for (int l = 0; l < 8; ++l) lanes[l] += a[j + l] * b[j + l];
  }
  double s = 0.0;
  for (; j < len; ++j) s += a[j] * b[j];
  for (int l = 0; l < 8; ++l) s += lanes[l];
  return s;
}

// G[b] = J[b] J[b]^T. One pass over J: each chunk of columns is converted once to double and
// all K(K+1)/2 dot products are formed from it. Chunks are split over threads, each thread
// keeps its own partial G (summed at the end), so the result does not depend on scheduling
// beyond the order of those few partial sums.
template <typename scalar_t>
void gram_cpu_kernel(const scalar_t* J, int64_t B, int64_t K, int64_t n, double* G) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const int nthreads = at::get_num_threads();
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* Jb = J + b * K * n;
    std::vector<double> partial(static_cast<size_t>(nthreads) * K * K, 0.0);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      double* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * K * K;
      std::vector<double> buf(static_cast<size_t>(K) * kChunk);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t start = c * kChunk;
        const int64_t len = std::min(kChunk, n - start);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* row = Jb + k * n + start;
          double* dst = buf.data() + k * kChunk;
          for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<double>(row[j]);
        }
        for (int64_t i = 0; i < K; ++i) {
          const double* ri = buf.data() + i * kChunk;
          for (int64_t k = i; k < K; ++k) acc[i * K + k] += dot(ri, buf.data() + k * kChunk, len);
        }
      }
    });
    double* Gb = G + b * K * K;
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t k = i; k < K; ++k) {
        double s = 0.0;
        for (int t = 0; t < nthreads; ++t) s += partial[static_cast<size_t>(t) * K * K + i * K + k];
        Gb[i * K + k] = s;
        Gb[k * K + i] = s;
      }
    }
  }
}

at::Tensor gram_cpu(const at::Tensor& J, std::optional<at::ScalarType> dtype) {
  const at::Tensor Jb = as_batched_jacobian(J, "gram");
  const at::ScalarType out_dtype = gram_out_dtype(J, dtype);
  const int64_t B = Jb.size(0), K = Jb.size(1), n = Jb.size(2);
  at::Tensor G = at::empty({B, K, K}, Jb.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Jb.scalar_type(), "gram_cpu", [&] {
    gram_cpu_kernel<scalar_t>(Jb.const_data_ptr<scalar_t>(), B, K, n, G.mutable_data_ptr<double>());
  });
  G = G.to(out_dtype);
  return J.dim() == 2 ? G.squeeze(0) : G;
}

std::tuple<at::Tensor, at::Tensor> hrgrad_weights_cpu(const at::Tensor& G, c10::string_view length_model,
                                                      std::optional<double> rcond) {
  const at::Tensor Gb = as_batched_gram(G);
  const int lm = parse_length_model(std::string(length_model));
  const double rtol = resolve_rcond(rcond, G);
  const int64_t B = Gb.size(0), K = Gb.size(1);
  at::Tensor w = at::empty({B, K}, Gb.options());
  at::Tensor status = at::empty({B}, Gb.options().dtype(at::kInt));
  int* st = status.mutable_data_ptr<int>();
  AT_DISPATCH_FLOATING_TYPES(Gb.scalar_type(), "hrgrad_weights_cpu", [&] {
    const scalar_t* g = Gb.const_data_ptr<scalar_t>();
    scalar_t* wp = w.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<double> ws(static_cast<size_t>(hrgrad_solve_workspace(K)));
      for (int64_t b = b0; b < b1; ++b) {
        st[b] = hrgrad_solve<scalar_t, scalar_t>(g + b * K * K, static_cast<int>(K), lm, rtol,
                                                 wp + b * K, ws.data());
      }
    });
  });
  if (G.dim() == 2) return {w.squeeze(0), status.squeeze(0)};
  return {w, status};
}

// out[b, :] (+)= sum_k w[b, k] J[b, k, :], accumulated in acc_t (float for half/bfloat16).
template <typename scalar_t, typename acc_t, bool kAccumulate>
void combine_cpu_kernel(const scalar_t* J, const acc_t* w, int64_t B, int64_t K, int64_t n,
                        scalar_t* out) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, B * nchunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(kChunk);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nchunks, start = (t % nchunks) * kChunk;
      const int64_t len = std::min(kChunk, n - start);
      std::fill(acc.begin(), acc.begin() + len, acc_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const acc_t wk = w[b * K + k];
        const scalar_t* row = J + (b * K + k) * n + start;
        for (int64_t j = 0; j < len; ++j) acc[j] += wk * static_cast<acc_t>(row[j]);
      }
      scalar_t* o = out + b * n + start;
      for (int64_t j = 0; j < len; ++j) {
        o[j] = kAccumulate ? static_cast<scalar_t>(static_cast<acc_t>(o[j]) + acc[j])
                           : static_cast<scalar_t>(acc[j]);
      }
    }
  });
}

at::Tensor combine_cpu(const at::Tensor& J, const at::Tensor& w) {
  const at::Tensor Jb = as_batched_jacobian(J, "combine");
  check_combine_weights(J, w, "combine");
  const int64_t B = Jb.size(0), K = Jb.size(1), n = Jb.size(2);
  const at::ScalarType acc = acc_type_of(Jb.scalar_type());
  const at::Tensor wb = w.reshape({B, K}).to(acc).contiguous();
  at::Tensor out = at::empty({B, n}, Jb.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Jb.scalar_type(), "combine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    combine_cpu_kernel<scalar_t, acc_t, false>(Jb.const_data_ptr<scalar_t>(), wb.const_data_ptr<acc_t>(),
                                               B, K, n, out.mutable_data_ptr<scalar_t>());
  });
  return J.dim() == 2 ? out.squeeze(0) : out;
}

void combine_accumulate_cpu(at::Tensor& out, const at::Tensor& J, const at::Tensor& w) {
  const at::Tensor Jb = check_combine_accumulate(out, J, w);
  const int64_t K = Jb.size(1), n = Jb.size(2);
  const at::ScalarType acc = acc_type_of(Jb.scalar_type());
  const at::Tensor wb = w.reshape({1, K}).to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Jb.scalar_type(), "combine_accumulate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    combine_cpu_kernel<scalar_t, acc_t, true>(Jb.const_data_ptr<scalar_t>(), wb.const_data_ptr<acc_t>(),
                                              1, K, n, out.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(hrgrad_ext, CPU, m) {
  m.impl("gram", &gram_cpu);
  m.impl("hrgrad_weights", &hrgrad_weights_cpu);
  m.impl("combine", &combine_cpu);
  m.impl("combine_accumulate_", &combine_accumulate_cpu);
}

}  // namespace hrgrad_ext
