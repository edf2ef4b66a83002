// The K x K "rotation solve" of HRGrad (spec: shared/spec/HRGRAD.md), written once as
// plain host/device code: the CPU kernel and the CUDA kernel (one thread per batch entry) call
// this same function, so they agree to rounding (not bitwise: nvcc contracts multiply-adds
// into FMAs where the host compiler does not). Everything is float64 whatever G's dtype.
//
// Given the Gram matrix G = J J^T of K task gradients g_i it returns weights w with
// update = J^T w:
//   d_i = sqrt(G_ii), C = D^-1 G D^-1, a = C^+ 1, |x|^2 = a^T C a,
//   cos_i = (C a)_i / |x|, len = length model, w_i = len * a_i / (d_i |x|).
// Working in the normalised coordinates (C, a) keeps the arithmetic scale-free: gradients
// of size 1e-10 or 1e15 give the same a, and only len carries the scale.
//
// When C is singular and C^+ 1 conflicts with a task, the direction is instead the exact
// projection of the mean unit gradient sum_i g_i / d_i onto the dual cone {x : J x >= 0},
// computed by the Lawson-Hanson active-set solver of cone_solve.h on the factor of C that the
// eigen-decomposition already gives (FALLBACK). That projection is unique, so it does not
// depend on the order of the tasks, and it is zero exactly when no non-zero update in the span
// of the gradients conflicts with none of them (ZERO_UPDATE).
#pragma once

#include <cmath>
#include <cstdint>

#include "gram/cone_solve.h"

namespace hrgrad_ext {

enum LengthModel : int {
  kLengthProjection = 0,
  kLengthMin = 1,
  kLengthMax = 2,
  kLengthHarmonic = 3,
  kLengthArithmetic = 4,
  kLengthGeometric = 5,
};

// (C a)_i below this means the pseudo-inverse direction does not improve task i.
constexpr double kConflictTol = 1e-9;

// Doubles of scratch the solve needs for K tasks: C (then the basis of the fallback solve),
// the eigenvectors (then the factor rows), the fallback's triangular factor, vectors, ints.
HRGRAD_HD inline int64_t hrgrad_solve_workspace(int64_t K) {
  return 3 * K * K + 6 * K + nnls_vectors(K, K) + 2 * K;
}

// Solves one K x K problem. G is read with row stride K (any element type convertible to
// double), w receives K weights. rtol: eigenvalues of C below rtol * max eigenvalue are
// treated as zero. Returns the status bit flags.
// With a team of several threads (cone_solve.h: SoloTeam, or a warp on the GPU) every member
// calls this with the same arguments and scratch: the team splits the eigen-decomposition, the
// O(K^3) part; the leader alone does the rest, and only its w and return value count.
template <typename in_t, typename out_t, class Team = SoloTeam>
HRGRAD_HD int hrgrad_solve(const in_t* G, int K, int length_model, double rtol, out_t* w,
                           double* ws, const Team& team = Team{}) {
  double* C = ws;              // m x m cosine matrix, then eigenvalues on its diagonal; fallback: Q
  double* V = C + K * K;       // m x m eigenvectors; fallback: the factor rows r_i
  double* T = V + K * K;       // fallback: triangular factor of the active-set solve
  double* d = T + K * K;       // K norms
  double* a = d + K;           // m coefficients (normalised coordinates)
  double* Ca = a + K;          // m
  double* b = Ca + K;          // m scratch: eigen-coordinates, then the eigenvalues
  double* target = b + K;      // m: fallback target, minus the mean unit gradient
  double* mu = target + K;     // m: fallback multipliers
  double* vec = mu + K;        // nnls vectors
  int* idx = reinterpret_cast<int*>(vec + nnls_vectors(K, K));  // m active indices
  int* iws = idx + K;          // 2m ints for nnls (idx and iws fit in 2K doubles)

  // The leader prepares C; m = 0 tells the team the leader's status is final.
  int status = 0, m = 0;
  if (team.leader()) {
    for (int i = 0; i < K; ++i) w[i] = static_cast<out_t>(0.0);
    if (!all_finite(G, K)) {
      for (int i = 0; i < K; ++i) w[i] = static_cast<out_t>(NAN);
      status = kStatusNonFinite;
    } else {
      m = active_tasks(G, K, d, idx);
      if (m < K) status |= kStatusZeroTasks;
      if (m == 0) status |= kStatusZeroUpdate;
      else cosine_matrix(G, K, d, idx, m, C);
    }
  }
  m = team.broadcast(m);  // also the barrier after which every member sees C
  if (m == 0) return status;
  jacobi_eigen(C, V, b, m, team);  // b and target (2K doubles) are free until after it
  if (!team.leader()) return status;
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
  // C a with the cosines read again from G (the eigen-decomposition overwrote C).
  double camin = 1e300;
  for (int r = 0; r < m; ++r) {
    double s = 0.0;
    for (int c = 0; c < m; ++c) s += cosine_entry(G, K, d, idx[r], idx[c]) * a[c];
    Ca[r] = s;
    camin = s < camin ? s : camin;
  }

  if (camin < kConflictTol) {
    // The pseudo-inverse direction conflicts with some task (possible only when C is
    // singular and 1 is outside its range). Project the mean of the unit gradients onto the
    // dual cone instead: x = sum_i (1 + mu_i) g_i / d_i with mu >= 0 minimising
    // |sum_i (1 + mu_i) r_i| over the factor rows r_i of C (C = R^T R up to the eigenvalues
    // below the cut-off, the same truncation as the pseudo-inverse).
    status |= kStatusFallback;
    for (int k = 0; k < m; ++k) b[k] = C[k * m + k];
    const int r = eigen_factor(V, b, m, cutoff);
    for (int c = 0; c < r; ++c) target[c] = 0.0;
    for (int k = 0; k < m; ++k)
      for (int c = 0; c < r; ++c) target[c] -= V[k * m + c];
    const int outcome = nnls(V, m, m, r, target, sqrt(kCancelTol), mu, C, m, T, m, vec, iws);
    // A zero residual: the mean unit gradient lies in minus the cone of the gradients, so the
    // dual cone holds no non-zero update in their span. A capped solve (never seen; see nnls)
    // also returns the zero update, which conflicts with nothing.
    if (outcome != kNnlsSolved) return status | kStatusZeroUpdate;
    for (int k = 0; k < m; ++k) a[k] = 1.0 + mu[k];
    for (int k = 0; k < m; ++k) {
      double s = 0.0;
      for (int c = 0; c < m; ++c) s += cosine_entry(G, K, d, idx[k], idx[c]) * a[c];
      Ca[k] = s;
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
