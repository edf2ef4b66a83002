// The K x K "rotation solve" of HRGrad (spec: shared/spec/HRGRAD.md), written once as
// plain host/device code so that the CPU kernel and the CUDA kernel (one thread per batch
// entry) run exactly the same arithmetic. Everything is float64 whatever G's dtype.
//
// Given the Gram matrix G = J J^T of K task gradients g_i it returns weights w with
// update = J^T w:
//   d_i = sqrt(G_ii), C = D^-1 G D^-1, a = C^+ 1, |x|^2 = a^T C a,
//   cos_i = (C a)_i / |x|, len = length model, w_i = len * a_i / (d_i |x|).
// Working in the normalised coordinates (C, a) keeps the arithmetic scale-free: gradients
// of size 1e-10 or 1e15 give the same a, and only len carries the scale.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define HRGRAD_HD __host__ __device__
#else
#define HRGRAD_HD
#endif

namespace hrgrad_ext {

enum LengthModel : int {
  kLengthProjection = 0,
  kLengthMin = 1,
  kLengthMax = 2,
  kLengthHarmonic = 3,
  kLengthArithmetic = 4,
  kLengthGeometric = 5,
};

// Bit flags of the status output (also documented in hrgrad_ext.ops.Status).
enum SolveStatus : int {
  kStatusZeroTasks = 1,      // some tasks had zero gradient and were left out
  kStatusRankDeficient = 2,  // the pseudo-inverse dropped eigenvalues of C
  kStatusFallback = 4,       // C^+ 1 conflicted; projected onto the dual cone instead
  kStatusZeroUpdate = 8,     // no non-zero update exists (all zero, or cone is {0})
  kStatusNonFinite = 16,     // G had NaN/Inf: the weights are NaN
};

// A task whose norm is below this fraction of the largest norm counts as a zero gradient.
constexpr double kZeroTaskRelNorm = 1e-12;
// (C a)_i below this means the pseudo-inverse direction does not improve task i.
constexpr double kConflictTol = 1e-9;
// |x|^2 / |a|_1^2 below this counts as total cancellation of the unit gradients.
constexpr double kCancelTol = 1e-12;

// Doubles of scratch the solve needs for K tasks.
HRGRAD_HD inline int64_t hrgrad_solve_workspace(int64_t K) { return 2 * K * K + 7 * K; }

// x - x is 0 for every finite x and NaN for NaN and +-Inf; spelled out because std::isfinite
// and CUDA's isfinite are not both available in one host/device function.
HRGRAD_HD inline bool is_finite(double x) { return x - x == 0.0; }

// Cyclic Jacobi eigen-decomposition of the symmetric m x m matrix A (overwritten: its
// diagonal becomes the eigenvalues), eigenvectors in the columns of V. Jacobi is chosen
// over faster methods because it is tiny, branch-light and accurate for small eigenvalues,
// which is what decides rank deficiency here.
HRGRAD_HD inline void jacobi_eigen(double* A, double* V, int m) {
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < m; ++j) V[i * m + j] = (i == j) ? 1.0 : 0.0;
  for (int sweep = 0; sweep < 60; ++sweep) {
    double off = 0.0, diag = 0.0;
    for (int i = 0; i < m; ++i) {
      diag += A[i * m + i] * A[i * m + i];
      for (int j = i + 1; j < m; ++j) off += A[i * m + j] * A[i * m + j];
    }
    if (off <= 1e-32 * diag || off == 0.0) break;
    for (int p = 0; p < m - 1; ++p) {
      for (int q = p + 1; q < m; ++q) {
        const double apq = A[p * m + q];
        if (apq == 0.0) continue;
        const double theta = (A[q * m + q] - A[p * m + p]) / (2.0 * apq);
        const double t = (theta >= 0.0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
        const double c = 1.0 / sqrt(t * t + 1.0);
        const double s = t * c;
        for (int k = 0; k < m; ++k) {  // A <- A R (columns p, q)
          const double akp = A[k * m + p], akq = A[k * m + q];
          A[k * m + p] = c * akp - s * akq;
          A[k * m + q] = s * akp + c * akq;
        }
        for (int k = 0; k < m; ++k) {  // A <- R^T A (rows p, q)
          const double apk = A[p * m + k], aqk = A[q * m + k];
          A[p * m + k] = c * apk - s * aqk;
          A[q * m + k] = s * apk + c * aqk;
        }
        A[p * m + q] = 0.0;
        A[q * m + p] = 0.0;
        for (int k = 0; k < m; ++k) {  // V <- V R
          const double vkp = V[k * m + p], vkq = V[k * m + q];
          V[k * m + p] = c * vkp - s * vkq;
          V[k * m + q] = s * vkp + c * vkq;
        }
      }
    }
  }
}

// Cosine matrix of the m active tasks idx[0..m) (norms d), symmetrised because G may carry
// rounding asymmetry, and clamped to [-1, 1].
template <typename in_t>
HRGRAD_HD inline void cosine_matrix(const in_t* G, int K, const double* d, const int* idx, int m,
                                    double* C) {
  for (int r = 0; r < m; ++r) {
    const int i = idx[r];
    for (int c = 0; c < m; ++c) {
      const int j = idx[c];
      const double gij = 0.5 * (static_cast<double>(G[i * K + j]) + static_cast<double>(G[j * K + i]));
      const double cij = (r == c) ? 1.0 : gij / (d[i] * d[j]);
      C[r * m + c] = cij > 1.0 ? 1.0 : (cij < -1.0 ? -1.0 : cij);
    }
  }
}

// Solves one K x K problem. G is read with row stride K (any element type convertible to
// double), w receives K weights. rtol: eigenvalues of C below rtol * max eigenvalue are
// treated as zero. Returns the status bit flags.
template <typename in_t, typename out_t>
HRGRAD_HD int hrgrad_solve(const in_t* G, int K, int length_model, double rtol, out_t* w,
                           double* ws) {
  double* C = ws;              // m x m cosine matrix, then eigenvalues on its diagonal
  double* V = C + K * K;       // m x m eigenvectors
  double* d = V + K * K;       // K norms
  double* a = d + K;           // m coefficients (normalised coordinates)
  double* Ca = a + K;          // m
  double* b = Ca + K;          // m scratch
  double* mu = b + K;          // m dual-cone multipliers
  double* ones_C = mu + K;     // m: C 1
  int* idx = reinterpret_cast<int*>(ones_C + K);  // m active indices (fits in K doubles)

  int status = 0;
  bool finite = true;
  double dmax = 0.0;
  for (int i = 0; i < K * K; ++i) finite = finite && is_finite(static_cast<double>(G[i]));
  if (!finite) {
    for (int i = 0; i < K; ++i) w[i] = static_cast<out_t>(NAN);
    return kStatusNonFinite;
  }
  for (int i = 0; i < K; ++i) {
    const double gii = static_cast<double>(G[i * K + i]);
    d[i] = gii > 0.0 ? sqrt(gii) : 0.0;
    dmax = d[i] > dmax ? d[i] : dmax;
  }
  int m = 0;
  for (int i = 0; i < K; ++i) {
    if (d[i] > 0.0 && d[i] > kZeroTaskRelNorm * dmax) idx[m++] = i;
  }
  for (int i = 0; i < K; ++i) w[i] = static_cast<out_t>(0.0);
  if (m < K) status |= kStatusZeroTasks;
  if (m == 0) return status | kStatusZeroUpdate;

  cosine_matrix(G, K, d, idx, m, C);
  jacobi_eigen(C, V, m);
  double lmax = 0.0;
  for (int k = 0; k < m; ++k) lmax = C[k * m + k] > lmax ? C[k * m + k] : lmax;
  const double cutoff = rtol * lmax;
  // a = V diag(1/lambda) V^T 1 over the kept eigenvalues.
  for (int k = 0; k < m; ++k) {
    const double lk = C[k * m + k];
    double proj = 0.0;
    for (int r = 0; r < m; ++r) proj += V[r * m + k];
    if (lk > cutoff && lk > 0.0) {
      b[k] = proj / lk;
    } else {
      b[k] = 0.0;
      status |= kStatusRankDeficient;
    }
  }
  for (int r = 0; r < m; ++r) {
    double s = 0.0;
    for (int k = 0; k < m; ++k) s += V[r * m + k] * b[k];
    a[r] = s;
  }
  // C is needed again but the eigen-decomposition overwrote it: rebuild it from G into V's
  // storage (V is no longer needed) rather than keeping a third K x K scratch matrix.
  double* Cm = V;
  cosine_matrix(G, K, d, idx, m, Cm);
  double camin = 1e300;
  for (int r = 0; r < m; ++r) {
    double s = 0.0;
    for (int c = 0; c < m; ++c) s += Cm[r * m + c] * a[c];
    Ca[r] = s;
    camin = s < camin ? s : camin;
  }

  if (camin < kConflictTol) {
    // The pseudo-inverse direction conflicts with some task (possible only when C is
    // singular and 1 is outside its range). Fall back to the projection of the mean of the
    // unit gradients onto the dual cone {x : J x >= 0}: x = sum (1 + mu_i) g_i / d_i with
    // mu >= 0 minimising 1/2 mu^T C mu + mu^T C 1 (projected Gauss-Seidel; C_ii = 1).
    status |= kStatusFallback;
    for (int r = 0; r < m; ++r) {
      double s = 0.0;
      for (int c = 0; c < m; ++c) s += Cm[r * m + c];
      ones_C[r] = s;
      mu[r] = 0.0;
    }
    for (int it = 0; it < 2000; ++it) {
      double change = 0.0, scale = 1e-300;
      for (int r = 0; r < m; ++r) {
        double grad = ones_C[r];
        for (int c = 0; c < m; ++c) grad += Cm[r * m + c] * mu[c];
        double nv = mu[r] - grad;  // divided by C_rr = 1
        nv = nv > 0.0 ? nv : 0.0;
        change = fmax(change, fabs(nv - mu[r]));
        scale = fmax(scale, fabs(nv));
        mu[r] = nv;
      }
      if (change <= 1e-15 * (1.0 + scale)) break;
    }
    for (int r = 0; r < m; ++r) a[r] = 1.0 + mu[r];
    for (int r = 0; r < m; ++r) {
      double s = 0.0;
      for (int c = 0; c < m; ++c) s += Cm[r * m + c] * a[c];
      Ca[r] = s;
    }
  }

  double xn2 = 0.0, asum = 0.0;
  for (int r = 0; r < m; ++r) {
    xn2 += a[r] * Ca[r];
    asum += fabs(a[r]);
  }
  // |x| below 1e-6 |a| means the unit gradients cancel to rounding level (e.g. g_2 = -g_1,
  // whose cosine is -1 only up to round-off): no direction is determined, return zero.
  if (!(xn2 > kCancelTol * asum * asum) || !(asum > 0.0)) return status | kStatusZeroUpdate;
  const double xn = sqrt(xn2);

  double len = 0.0;
  if (length_model == kLengthProjection) {
    for (int r = 0; r < m; ++r) len += d[idx[r]] * Ca[r] / xn;
  } else {
    double scale = 0.0;
    if (length_model == kLengthMin) {
      scale = 1e300;
      for (int r = 0; r < m; ++r) scale = fmin(scale, d[idx[r]]);
    } else if (length_model == kLengthMax) {
      for (int r = 0; r < m; ++r) scale = fmax(scale, d[idx[r]]);
    } else if (length_model == kLengthHarmonic) {
      for (int r = 0; r < m; ++r) scale += 1.0 / d[idx[r]];
      scale = m / scale;
    } else if (length_model == kLengthArithmetic) {
      for (int r = 0; r < m; ++r) scale += d[idx[r]];
      scale /= m;
    } else {  // geometric, in logs to avoid overflow of the product
      for (int r = 0; r < m; ++r) scale += log(d[idx[r]]);
      scale = exp(scale / m);
    }
    double cos_sum = 0.0;
    for (int r = 0; r < m; ++r) cos_sum += Ca[r] / xn;
    len = scale * cos_sum;
  }
  for (int r = 0; r < m; ++r) {
    const int i = idx[r];
    w[i] = static_cast<out_t>(len * a[r] / (d[i] * xn));
  }
  return status;
}

}  // namespace hrgrad_ext
