// Exact small solvers on the K x K Gram form, written once as plain host/device code: the CPU
// kernels and the CUDA kernels (one thread per problem) call the same functions. Everything is
// float64 whatever G's dtype. The two builds agree to rounding, not bitwise: nvcc contracts
// a*b+c into fused multiply-adds where the host compiler does not.
//
// What lives here:
//   jacobi_eigen      eigen-decomposition of a small symmetric matrix;
//   eigen_factor      the truncated factor R (C ~= R^T R) built from it;
//   nnls              Lawson-Hanson non-negative least squares on vectors given as rows;
//   cone_factor / cone_project
//                     projection of J^T u onto the dual cone {x : J x >= 0} (UPGrad, DualProj,
//                     the HRGrad fallback);
//   mgda_solve        the minimum-norm point of the convex hull of the task gradients (MGDA).
//
// Every problem is solved in the coordinates of a factor of the (normalised) Gram matrix:
// row i of R is a vector r_i with r_i . r_j = C_ij, i.e. task i's gradient written in an
// orthonormal basis of the span of the gradients. Working with the vectors rather than with C
// keeps the accuracy of a QR-based least-squares solve (errors ~ eps * cond, not eps * cond^2)
// and lets conflicts r_j . x be computed as plain dot products.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define HRGRAD_HD __host__ __device__
#else
#define HRGRAD_HD
#endif

namespace hrgrad_ext {

// Bit flags of the status outputs (also documented in hrgrad_ext.ops.Status).
enum SolveStatus : int {
  kStatusZeroTasks = 1,      // some tasks had zero gradient and were left out
  kStatusRankDeficient = 2,  // eigenvalues of the (cosine) Gram matrix were dropped
  kStatusFallback = 4,       // HRGrad: C^+ 1 conflicted; projected onto the dual cone instead
  kStatusZeroUpdate = 8,     // no non-zero update exists (all zero, or the cone is {0})
  kStatusNonFinite = 16,     // G had NaN/Inf: the weights are NaN
};

// A task whose norm is below this fraction of the largest norm counts as a zero gradient.
constexpr double kZeroTaskRelNorm = 1e-12;
// |x|^2 below this fraction of (sum of the magnitudes that formed x)^2 counts as total
// cancellation: x is zero to the resolution of a float64 Gram matrix (a Gram matrix resolves
// vector components only down to ~sqrt(eps) of their norms, ~1e-8; this sits 100x above).
constexpr double kCancelTol = 1e-12;
// Relative conflict accepted at the solution of a projection: the active-set solver stops when
// no task outside its active set has r_j . x < -kConeTol |r_j| |x| (plus the rounding bound of
// that dot product, see nnls).
constexpr double kConeTol = 1e-12;
constexpr double kEps = 2.220446049250313e-16;

// x - x is 0 for every finite x and NaN for NaN and +-Inf; spelled out because std::isfinite
// and CUDA's isfinite are not both available in one host/device function.
HRGRAD_HD inline bool is_finite(double x) { return x - x == 0.0; }

HRGRAD_HD inline double dot_n(const double* a, const double* b, int n) {
  double s = 0.0;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

HRGRAD_HD inline double norm_n(const double* a, int n) { return sqrt(dot_n(a, a, n)); }

// The threads that solve one problem together. SoloTeam: one thread (the CPU kernels and the
// one-thread CUDA solves). A team shares the problem's scratch; its members split the loops
// whose iterations are independent (rank, rank + size, ...), meet at sync(), and compute
// every scalar that steers control flow redundantly from the same shared data after a sync,
// so they all take the same branches. The CUDA kernels define a warp-wide team.
struct SoloTeam {
  HRGRAD_HD int rank() const { return 0; }
  HRGRAD_HD int size() const { return 1; }
  HRGRAD_HD bool leader() const { return true; }
  HRGRAD_HD void sync() const {}
  HRGRAD_HD int broadcast(int x) const { return x; }  // the leader's x, to every member
};

// Pair i of step `step` of the round-robin (tournament) ordering of mm indices (mm even): index
// mm - 1 stays, the others turn one place per step, so the mm - 1 steps of mm / 2 disjoint
// pairs meet every pair once. p < q.
HRGRAD_HD inline void round_robin_pair(int step, int i, int mm, int& p, int& q) {
  const int n = mm - 1;
  const int a = i == 0 ? n : (step + i) % n;
  const int b = i == 0 ? step : (step - i + n) % n;
  p = a < b ? a : b;
  q = a < b ? b : a;
}

// The Jacobi rotation (c, s) that annihilates A_pq (non-zero) of a symmetric A.
HRGRAD_HD inline void jacobi_angle(double app, double aqq, double apq, double& c, double& s) {
  const double theta = (aqq - app) / (2.0 * apq);
  const double t = (theta >= 0.0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
  c = 1.0 / sqrt(t * t + 1.0);
  s = t * c;
}

// (x, y) <- (c x - s y, s x + c y): one rotation of a pair of entries.
HRGRAD_HD inline void rotate(double& x, double& y, double c, double s) {
  const double x0 = x, y0 = y;
  x = c * x0 - s * y0;
  y = s * x0 + c * y0;
}

// Doubles of scratch jacobi_eigen needs beside A and V (the cosines and sines of one step).
HRGRAD_HD inline int64_t jacobi_scratch(int64_t m) { return m + (m & 1); }

// Jacobi eigen-decomposition of the symmetric m x m matrix A (overwritten: its diagonal
// becomes the eigenvalues), eigenvectors in the columns of V. Jacobi is chosen over faster
// methods because it is tiny, branch-light and accurate for small eigenvalues, which is what
// decides rank deficiency here. At most 60 sweeps (it converges quadratically; 60 is never
// reached on matrices of this size). One thread (SoloTeam: the CPU kernels, the one-thread
// CUDA solves) rotates in the cyclic row ordering, applying each rotation before the next
// (jacobi_eigen_cyclic). A team of several threads (a warp) uses the round-robin ordering
// instead (jacobi_eigen_parallel), which lets it rotate K / 2 pairs at once; that ordering
// costs one thread about twice the time of the cyclic one (measured on the CPU: the pair
// lookups and the step's extra passes), so the two builds agree to rounding, not bitwise.
// rot: jacobi_scratch(m) doubles shared by the team (unused by one thread).
template <class Team>
HRGRAD_HD inline void jacobi_eigen_parallel(double* A, double* V, double* rot, int m, const Team& team);
HRGRAD_HD inline void jacobi_eigen_cyclic(double* A, double* V, int m);

template <class Team>
HRGRAD_HD inline void jacobi_eigen(double* A, double* V, double* rot, int m, const Team& team) {
  if (team.size() == 1) jacobi_eigen_cyclic(A, V, m);
  else jacobi_eigen_parallel(A, V, rot, m, team);
}

HRGRAD_HD inline void jacobi_eigen(double* A, double* V, double* rot, int m) {
  jacobi_eigen(A, V, rot, m, SoloTeam{});
}

// The cyclic ordering, one rotation after the other.
HRGRAD_HD inline void jacobi_eigen_cyclic(double* A, double* V, int m) {
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
        double c, s;
        jacobi_angle(A[p * m + p], A[q * m + q], apq, c, s);
        for (int k = 0; k < m; ++k) rotate(A[k * m + p], A[k * m + q], c, s);  // A <- A R (columns p, q)
        for (int k = 0; k < m; ++k) rotate(V[k * m + p], V[k * m + q], c, s);  // V <- V R
        for (int k = 0; k < m; ++k) rotate(A[p * m + k], A[q * m + k], c, s);  // A <- R^T A (rows p, q)
        A[p * m + q] = 0.0;  // the annihilated pair, exactly
        A[q * m + p] = 0.0;
      }
    }
  }
}

// The round-robin (parallel) ordering: a sweep is mm - 1 steps of mm / 2
// disjoint pairs (mm = m rounded up to even; a pair with the padding index m is skipped).
// Disjoint rotations touch disjoint rows and columns, so a step's angles all come from the A
// the step starts with, whatever order its rotations are applied in; they are applied together,
// A <- R^T A R with R their product (all column updates, then all row updates), as in the
// parallel Jacobi method of Brent and Luk (1985). A team splits the angles and the two
// updates of each step and meets three times per step: a sweep is mm - 1 dependent steps
// instead of m (m - 1) / 2 dependent rotations (on a GPU each solve was pure latency: a warp
// took 25 ms for one 64 x 64 problem in the cyclic ordering, docs/RESULTS.md). Every element is
// computed by the same expression in the same order whatever the team's size, so the result
// does not depend on it. A and V must be complete when the team enters (the caller syncs).
template <class Team>
HRGRAD_HD inline void jacobi_eigen_parallel(double* A, double* V, double* rot, int m, const Team& team) {
  const int k0 = team.rank(), dk = team.size();
  const int mm = m + (m & 1), half = mm / 2;
  double* cosine = rot;
  double* sine = rot + half;
  for (int i = k0; i < m; i += dk)
    for (int j = 0; j < m; ++j) V[i * m + j] = (i == j) ? 1.0 : 0.0;
  team.sync();
  for (int sweep = 0; sweep < 60; ++sweep) {
    // every member sums the same entries in the same order: the same decision everywhere
    double off = 0.0, diag = 0.0;
    for (int i = 0; i < m; ++i) {
      diag += A[i * m + i] * A[i * m + i];
      for (int j = i + 1; j < m; ++j) off += A[i * m + j] * A[i * m + j];
    }
    // every member has its sums before A changes: in the next step, or in the caller once
    // the leader has left with the result (the HRGrad fallback reuses A as scratch)
    team.sync();
    if (off <= 1e-32 * diag || off == 0.0) break;
    for (int step = 0; step < mm - 1; ++step) {
      for (int i = k0; i < half; i += dk) {  // the angles, from the A of the step's start
        int p, q;
        round_robin_pair(step, i, mm, p, q);
        double c = 1.0, s = 0.0;  // A_pq = 0: the identity (an exact no-op below)
        const double apq = q < m ? A[p * m + q] : 0.0;
        if (apq != 0.0) jacobi_angle(A[p * m + p], A[q * m + q], apq, c, s);
        cosine[i] = c;
        sine[i] = s;
      }
      team.sync();  // every angle is read after every member has read its A_pq, A_pp, A_qq
      // A <- A R, V <- V R: item e is row k = e % m of pair i = e / m (a member's items advance
      // by the team's size: i and k are stepped, not divided, and the pair is looked up when i
      // changes)
      for (int e = k0, i = k0 / m, k = k0 % m, pi = -1, p = 0, q = 0; e < half * m; e += dk) {
        if (i != pi) round_robin_pair(step, pi = i, mm, p, q);
        if (q < m) {
          rotate(A[k * m + p], A[k * m + q], cosine[i], sine[i]);
          rotate(V[k * m + p], V[k * m + q], cosine[i], sine[i]);
        }
        for (k += dk; k >= m; k -= m) ++i;
      }
      team.sync();  // every column update, before the row updates read rows p and q
      // A <- R^T A: item e is column k = e % m of pair i = e / m
      for (int e = k0, i = k0 / m, k = k0 % m, pi = -1, p = 0, q = 0; e < half * m; e += dk) {
        if (i != pi) round_robin_pair(step, pi = i, mm, p, q);
        if (q < m) {
          rotate(A[p * m + k], A[q * m + k], cosine[i], sine[i]);
          if (k == q) A[p * m + q] = 0.0;  // the annihilated pair, exactly
          if (k == p) A[q * m + p] = 0.0;
        }
        for (k += dk; k >= m; k -= m) ++i;
      }
      team.sync();  // the next step (and the convergence sums) read the whole of A
    }
  }
}


// Symmetrised entry (i, j) of G as a double.
template <typename in_t>
HRGRAD_HD inline double gram_entry(const in_t* G, int K, int i, int j) {
  return 0.5 * (static_cast<double>(G[i * K + j]) + static_cast<double>(G[j * K + i]));
}

// Cosine of tasks i and j (norms d), clamped to [-1, 1]; 1 on the diagonal.
template <typename in_t>
HRGRAD_HD inline double cosine_entry(const in_t* G, int K, const double* d, int i, int j) {
  if (i == j) return 1.0;
  const double c = gram_entry(G, K, i, j) / (d[i] * d[j]);
  return c > 1.0 ? 1.0 : (c < -1.0 ? -1.0 : c);
}

// Cosine matrix of the m active tasks idx[0..m) (norms d).
template <typename in_t>
HRGRAD_HD inline void cosine_matrix(const in_t* G, int K, const double* d, const int* idx, int m,
                                    double* C) {
  for (int r = 0; r < m; ++r)
    for (int c = 0; c < m; ++c) C[r * m + c] = cosine_entry(G, K, d, idx[r], idx[c]);
}

// True when every entry of the K x K matrix G is finite.
template <typename in_t>
HRGRAD_HD inline bool all_finite(const in_t* G, int K) {
  bool finite = true;
  for (int i = 0; i < K * K; ++i) finite = finite && is_finite(static_cast<double>(G[i]));
  return finite;
}

// Task norms d_i = sqrt(G_ii) and the active tasks (norm above kZeroTaskRelNorm of the largest)
// in idx; returns their number m.
template <typename in_t>
HRGRAD_HD inline int active_tasks(const in_t* G, int K, double* d, int* idx) {
  double dmax = 0.0;
  for (int i = 0; i < K; ++i) {
    const double gii = static_cast<double>(G[i * K + i]);
    d[i] = gii > 0.0 ? sqrt(gii) : 0.0;
    dmax = d[i] > dmax ? d[i] : dmax;
  }
  int m = 0;
  for (int i = 0; i < K; ++i)
    if (d[i] > 0.0 && d[i] > kZeroTaskRelNorm * dmax) idx[m++] = i;
  return m;
}

// The truncated factor of an eigen-decomposed m x m matrix: eigenvalues lambda, eigenvectors in
// the columns of V (row stride m). Overwrites row i of V with r_i = (sqrt(lambda_k) V_ik) over
// the kept eigenvalues (lambda_k > cutoff), so that r_i . r_j = (V diag(lambda) V^T)_ij minus
// the dropped part. Returns the number r of kept eigenvalues (the length of each r_i).
HRGRAD_HD inline int eigen_factor(double* V, const double* lambda, int m, double cutoff) {
  int r = 0;
  for (int k = 0; k < m; ++k) {
    if (!(lambda[k] > cutoff && lambda[k] > 0.0)) continue;
    const double s = sqrt(lambda[k]);
    for (int i = 0; i < m; ++i) V[i * m + r] = s * V[i * m + k];  // r <= k: in place
    ++r;
  }
  return r;
}

// ---- Lawson-Hanson non-negative least squares ---------------------------------------------
//
//   minimise | sum_j u_j e_j - f |  over u >= 0,
//
// for m vectors e_j of length dim (row j of E, row stride lde) and a target f. This is the
// classical active-set method of Lawson and Hanson (Solving Least Squares Problems, 1974,
// ch. 23): a passive set P of indices is grown one at a time (the index whose vector makes the
// largest angle-normalised gain e_j . res / |e_j| with the residual res = f - E u), the least
// squares problem restricted to P is solved, and indices whose coefficient would turn negative
// are dropped on the segment to the new solution. The least-squares solves use an orthonormal
// basis Q of span{e_j : j in P} (modified Gram-Schmidt, applied twice so that Q is orthonormal
// to working precision), kept with the triangular T (E_P = Q^T T), plus one step of iterative
// refinement against the explicit vectors.
//
// Termination. In exact arithmetic every outer iteration ends with u the least-squares solution
// on P with u_P > 0 and a strictly smaller residual than the previous one, so no P repeats and
// the method stops after finitely many steps; each inner iteration removes at least one index,
// so there are at most |P| of them per outer iteration. In floating point the loops are bounded
// explicitly: at most nnls_max_adds(m) additions, at most m candidate rejections per addition,
// at most m drops per addition; an index is rejected (as in Lawson-Hanson) when rounding makes
// its vector dependent on P or its new coefficient non-positive. The cap, 3m + 16 additions, is
// a safety net: on 860,000 random rank-deficient and K > n solves (K = 4 ... 64, with and
// without a common descent direction; HRGrad fallbacks, UPGrad projections, MGDA) the most
// additions one solve took was 56, at K = 64 (cap 208), and on average 0.2-0.55 K. A capped solve
// is reported (kNnlsCapped), never returned as if solved.
//
// Stopping. The solve stops when no index outside P has e_j . res / |e_j| above
// kConeTol |res| plus a bound on the rounding error of that dot product, or when the residual
// has cancelled (|res| <= zero_tol * the magnitudes that formed it).
enum NnlsOutcome : int { kNnlsSolved = 0, kNnlsZero = 1, kNnlsCapped = 2 };

HRGRAD_HD inline int nnls_max_adds(int m) { return 3 * m + 16; }

// Doubles of scratch nnls needs besides Q and T: res, the candidate vector (dim each), and
// gain, z, y, |e_j|, a column of T (m each); ints: passive list and state (m each).
HRGRAD_HD inline int64_t nnls_vectors(int64_t m, int64_t dim) { return 2 * dim + 5 * m; }

namespace nnls_detail {

enum IndexState : int { kFree = 0, kPassive = 1, kRejected = 2 };

// q <- e minus its projection on the p orthonormal rows of Q (row stride ldq), twice; the
// coefficients of e in that basis are accumulated in tcol. Returns |q|.
HRGRAD_HD inline double orthogonalise(const double* Q, int ldq, int p, const double* e, int dim, double* tcol,
                                      double* q) {
  for (int i = 0; i < dim; ++i) q[i] = e[i];
  for (int l = 0; l < p; ++l) tcol[l] = 0.0;
  for (int pass = 0; pass < 2; ++pass) {
    for (int l = 0; l < p; ++l) {
      const double* ql = Q + l * ldq;
      const double s = dot_n(ql, q, dim);
      tcol[l] += s;
      for (int i = 0; i < dim; ++i) q[i] -= s * ql[i];
    }
  }
  return norm_n(q, dim);
}

// Solves T z = b in place (T upper triangular p x p, row stride ldt).
HRGRAD_HD inline void back_substitute(const double* T, int ldt, int p, double* b) {
  for (int k = p - 1; k >= 0; --k) {
    double s = b[k];
    for (int l = k + 1; l < p; ++l) s -= T[k * ldt + l] * b[l];
    b[k] = s / T[k * ldt + k];
  }
}

// z = least-squares coefficients of f on the passive vectors: T z = Q f, then one step of
// iterative refinement with the explicit residual f - E_P z (tmp, c: scratch of dim, p).
HRGRAD_HD inline void solve_passive(const double* E, int lde, int dim, const double* f, const double* Q, int ldq,
                                    const double* T, int ldt, const double* y, const int* P, int p, double* z,
                                    double* tmp, double* c) {
  for (int k = 0; k < p; ++k) z[k] = y[k];
  back_substitute(T, ldt, p, z);
  for (int i = 0; i < dim; ++i) tmp[i] = f[i];
  for (int k = 0; k < p; ++k) {
    const double* e = E + P[k] * lde;
    for (int i = 0; i < dim; ++i) tmp[i] -= z[k] * e[i];
  }
  for (int l = 0; l < p; ++l) c[l] = dot_n(Q + l * ldq, tmp, dim);
  back_substitute(T, ldt, p, c);
  for (int k = 0; k < p; ++k) z[k] += c[k];
}

}  // namespace nnls_detail

// Q: at least min(m, dim) rows of dim doubles (row stride ldq >= dim); T: m x m (row stride
// ldt >= m); vec: nnls_vectors(m, dim) doubles; iws: 2m ints. u (m) receives the solution.
// zero_tol: relative cancellation at which the residual counts as zero (kNnlsZero).
HRGRAD_HD inline int nnls(const double* E, int lde, int m, int dim, const double* f, double zero_tol, double* u,
                          double* Q, int ldq, double* T, int ldt, double* vec, int* iws) {
  using namespace nnls_detail;
  double* res = vec;         // dim: f - E u
  double* cand = res + dim;  // dim: candidate vector orthogonalised against Q; refinement scratch
  double* gain = cand + dim; // m: e_j . res / |e_j|
  double* z = gain + m;      // m: least-squares coefficients on P (in P order)
  double* y = z + m;         // m: Q f
  double* enorm = y + m;     // m: |e_j|
  double* col = enorm + m;   // m: a column of T; refinement scratch
  int* P = iws;              // m: passive indices in insertion order
  int* state = P + m;        // m: IndexState

  const double fnorm = norm_n(f, dim);
  for (int j = 0; j < m; ++j) {
    u[j] = 0.0;
    state[j] = kFree;
    enorm[j] = norm_n(E + j * lde, dim);
  }
  int p = 0;
  int outcome = kNnlsCapped;
  const int max_adds = nnls_max_adds(m);
  for (int add = 0; add <= max_adds; ++add) {
    // Residual, the magnitudes that formed it, and the gain of every free index.
    double scale = fnorm;
    for (int i = 0; i < dim; ++i) res[i] = f[i];
    for (int k = 0; k < p; ++k) {
      const int j = P[k];
      const double* e = E + j * lde;
      for (int i = 0; i < dim; ++i) res[i] -= u[j] * e[i];
      scale += u[j] * enorm[j];
    }
    const double rnorm = norm_n(res, dim);
    if (!(rnorm > zero_tol * scale)) {
      outcome = kNnlsZero;
      break;
    }
    if (add == max_adds) break;  // capped: u is feasible but not optimal
    // Rounding bound of gain_j: res carries ~(p + 1) eps * scale, the dot product dim eps |res|.
    const double noise = 2.0 * kEps * ((m + 1) * scale + dim * rnorm);
    const double threshold = kConeTol * rnorm + noise;
    for (int j = 0; j < m; ++j)
      gain[j] = (state[j] == kFree && enorm[j] > 0.0) ? dot_n(E + j * lde, res, dim) / enorm[j] : 0.0;

    // The entering index: the largest gain above the threshold whose vector is independent of
    // P to working precision and whose new least-squares coefficient is positive.
    int t = -1;
    for (int attempt = 0; attempt < m; ++attempt) {
      t = -1;
      double best = threshold;
      for (int j = 0; j < m; ++j) {
        if (state[j] == kFree && gain[j] > best) {
          best = gain[j];
          t = j;
        }
      }
      if (t < 0) break;
      const double rho = orthogonalise(Q, ldq, p, E + t * lde, dim, col, cand);
      if (!(rho > kConeTol * enorm[t])) {
        state[t] = kRejected;
        continue;
      }
      double* qp = Q + p * ldq;
      for (int i = 0; i < dim; ++i) qp[i] = cand[i] / rho;
      for (int l = 0; l < p; ++l) T[l * ldt + p] = col[l];
      T[p * ldt + p] = rho;
      y[p] = dot_n(qp, f, dim);
      P[p] = t;
      solve_passive(E, lde, dim, f, Q, ldq, T, ldt, y, P, p + 1, z, cand, col);
      if (!(z[p] > 0.0)) {
        state[t] = kRejected;
        continue;
      }
      state[t] = kPassive;
      ++p;
      break;
    }
    if (t < 0) {
      outcome = kNnlsSolved;
      break;
    }
    for (int j = 0; j < m; ++j)
      if (state[j] == kRejected) state[j] = kFree;

    // Inner loop: move from u towards z, dropping the coefficients that reach zero first.
    for (int drop = 0; drop < m; ++drop) {
      bool feasible = true;
      for (int k = 0; k < p; ++k) feasible = feasible && z[k] > 0.0;
      if (feasible) break;
      double alpha = 1.0;
      int first = -1;
      for (int k = 0; k < p; ++k) {
        if (z[k] > 0.0) continue;
        const double uk = u[P[k]];
        const double ak = uk / (uk - z[k]);
        if (first < 0 || ak < alpha) {
          alpha = ak;
          first = k;
        }
      }
      for (int k = 0; k < p; ++k) u[P[k]] += alpha * (z[k] - u[P[k]]);
      u[P[first]] = 0.0;
      int kept = 0;
      for (int k = 0; k < p; ++k) {
        const int j = P[k];
        if (u[j] > 0.0) {
          P[kept++] = j;
        } else {
          u[j] = 0.0;
          state[j] = kFree;
        }
      }
      p = kept;
      // Rebuild Q, T, y for the smaller P (a subset of independent vectors stays independent).
      for (int k = 0; k < p; ++k) {
        const double rho = orthogonalise(Q, ldq, k, E + P[k] * lde, dim, col, cand);
        double* qk = Q + k * ldq;
        for (int i = 0; i < dim; ++i) qk[i] = cand[i] / rho;
        for (int l = 0; l < k; ++l) T[l * ldt + k] = col[l];
        T[k * ldt + k] = rho;
        y[k] = dot_n(qk, f, dim);
      }
      solve_passive(E, lde, dim, f, Q, ldq, T, ldt, y, P, p, z, cand, col);
    }
    for (int k = 0; k < p; ++k) u[P[k]] = z[k] > 0.0 ? z[k] : 0.0;
  }
  return outcome;
}

// ---- projection onto the dual cone {x : J x >= 0} -------------------------------------------
//
// For a weight vector u, the projection of J^T u onto the dual cone is J^T w with
// w = u + D^-1 mu, mu >= 0 (D = diag of the task norms), the mu of
//   minimise | sum_j mu_j r_j + sum_i u_i d_i r_i |  over mu >= 0
// with r_i the factor rows of the cosine matrix: the nnls above. The projection onto a closed
// convex cone is unique, so the update J^T w does not depend on the order of the tasks; the
// weights are unique too whenever the tasks active at the solution are linearly independent
// (always, for inputs in general position). Tasks with a zero gradient (ZERO_TASKS) impose no
// constraint and keep their weight u_i.
//
// cone_factor computes what every target of one G shares (norms, active tasks, factor), in
// `factor` (cone_factor_size(K) doubles) using `scratch` (cone_factor_scratch(K) doubles); cone_project then
// projects one target with cone_project_workspace(K) doubles of its own.

HRGRAD_HD inline int64_t cone_factor_size(int64_t K) { return K * K + 2 * K + 4; }
HRGRAD_HD inline int64_t cone_factor_scratch(int64_t K) { return K * K + jacobi_scratch(K); }
HRGRAD_HD inline int64_t cone_project_workspace(int64_t K) {
  return 2 * K * K + 2 * K + nnls_vectors(K, K) + K;  // Q, T, f, mu, nnls vectors, 2K ints
}

namespace cone_detail {
struct FactorView {
  double* d;    // K norms
  double* R;    // m x m, row stride m: factor rows of the active tasks (r used columns)
  int* idx;     // K active task indices (stored in K/2 + 1 doubles)
  double* meta; // m, r, status
};
HRGRAD_HD inline FactorView view(double* factor, int K) {
  FactorView v;
  v.d = factor;
  v.R = v.d + K;
  v.meta = v.R + K * K;
  v.idx = reinterpret_cast<int*>(v.meta + 4);
  return v;
}
}  // namespace cone_detail

// Returns the status shared by every target (ZERO_TASKS, RANK_DEFICIENT, NON_FINITE).
template <typename in_t>
HRGRAD_HD int cone_factor(const in_t* G, int K, double rtol, double* factor, double* scratch) {
  cone_detail::FactorView f = cone_detail::view(factor, K);
  int status = 0, m = 0, r = 0;
  if (!all_finite(G, K)) {
    status = kStatusNonFinite;
  } else {
    m = active_tasks(G, K, f.d, f.idx);
    if (m < K) status |= kStatusZeroTasks;
    if (m > 0) {
      double* C = scratch;
      cosine_matrix(G, K, f.d, f.idx, m, C);
      jacobi_eigen(C, f.R, scratch + K * K, m);
      double lmax = 0.0;
      for (int k = 0; k < m; ++k) {
        C[k] = C[k * m + k];  // eigenvalues to the front of the scratch
        lmax = C[k] > lmax ? C[k] : lmax;
      }
      r = eigen_factor(f.R, C, m, rtol * lmax);
      if (r < m) status |= kStatusRankDeficient;
    }
  }
  f.meta[0] = m;
  f.meta[1] = r;
  f.meta[2] = status;
  return status;
}

// Projects J^T u (u: K weights with stride u_stride) onto the dual cone; writes the K weights
// of the projection to w. Returns the status of this target (the factor's flags, plus
// ZERO_UPDATE when the projection is zero: then w = 0).
template <typename in_t, typename out_t>
HRGRAD_HD int cone_project(const double* factor, int K, const in_t* u_in, out_t* w, double* ws) {
  const cone_detail::FactorView f = cone_detail::view(const_cast<double*>(factor), K);
  const int m = static_cast<int>(f.meta[0]), r = static_cast<int>(f.meta[1]);
  int status = static_cast<int>(f.meta[2]);
  if (status & kStatusNonFinite) {
    for (int i = 0; i < K; ++i) w[i] = static_cast<out_t>(NAN);
    return status;
  }
  double* Q = ws;           // K x K
  double* T = Q + K * K;    // K x K
  double* target = T + K * K;  // K (r used)
  double* mu = target + K;  // K (m used)
  double* vec = mu + K;
  int* iws = reinterpret_cast<int*>(vec + nnls_vectors(K, K));

  // Target in factor coordinates, divided by the sum of the magnitudes that form it so that
  // the solve sees numbers of order one whatever the scale of G and u.
  double tscale = 0.0;
  for (int k = 0; k < m; ++k) tscale += fabs(static_cast<double>(u_in[f.idx[k]])) * f.d[f.idx[k]];
  for (int i = 0; i < K; ++i) w[i] = static_cast<out_t>(u_in[i]);
  if (!is_finite(tscale)) {
    for (int i = 0; i < K; ++i) w[i] = static_cast<out_t>(NAN);
    return status | kStatusNonFinite;
  }
  if (m == 0 || r == 0 || !(tscale > 0.0)) return status | kStatusZeroUpdate;  // J^T u = 0
  for (int c = 0; c < r; ++c) target[c] = 0.0;
  for (int k = 0; k < m; ++k) {
    const double coef = static_cast<double>(u_in[f.idx[k]]) * f.d[f.idx[k]] / tscale;
    const double* rk = f.R + k * m;
    for (int c = 0; c < r; ++c) target[c] -= coef * rk[c];  // nnls fits sum mu r = -target
  }
  const int outcome = nnls(f.R, m, m, r, target, sqrt(kCancelTol), mu, Q, K, T, K, vec, iws);
  if (outcome != kNnlsSolved) {  // zero projection (or a capped solve: 0 is always safe)
    for (int i = 0; i < K; ++i) w[i] = static_cast<out_t>(0.0);
    return status | kStatusZeroUpdate;
  }
  for (int k = 0; k < m; ++k) {
    const int i = f.idx[k];
    w[i] = static_cast<out_t>(static_cast<double>(u_in[i]) + mu[k] * tscale / f.d[i]);
  }
  return status;
}

// ---- MGDA: the minimum-norm point of the convex hull of the task gradients ------------------
//
// Least-distance form (Lawson-Hanson ch. 23): the minimum-norm point u* of conv{g_i}, when
// non-zero, is x / |x|^2 for the minimum-norm x with J x >= 1; that x comes from the nnls
//   minimise | sum_j l_j (r_j, 1) - (0, ..., 0, 1) |  over l >= 0
// (vectors r_j of the factor of G / max_i G_ii, with one coordinate appended), and the convex
// weights of u* are l / sum(l). The residual's last coordinate is 1 - sum(l) and its squared
// norm (1 - s) equals s |u*|^2 / max_i G_ii, so the hull contains 0 exactly when the residual
// vanishes. Zero gradients are part of the hull (they make u* = 0).

HRGRAD_HD inline int64_t mgda_workspace(int64_t K) {
  return 2 * K * (K + 1) + K * K + 3 * K + 1 + nnls_vectors(K, K + 1) + K;
}

template <typename in_t, typename out_t>
HRGRAD_HD int mgda_solve(const in_t* G, int K, double rtol, out_t* w, double* ws) {
  const int ld = K + 1;
  double* A = ws;                 // K x K (stride K), later E: K x (K + 1) (stride K + 1)
  double* V = A + K * ld;         // K x K eigenvectors -> factor; later Q (K x (K + 1))
  double* T = V + K * ld;         // K x K
  double* lambda = T + K * K;     // K
  double* l = lambda + K;         // K
  double* target = l + K;         // K + 1
  double* vec = target + ld;
  int* iws = reinterpret_cast<int*>(vec + nnls_vectors(K, ld));

  if (!all_finite(G, K)) {
    for (int i = 0; i < K; ++i) w[i] = static_cast<out_t>(NAN);
    return kStatusNonFinite;
  }
  for (int i = 0; i < K; ++i) w[i] = static_cast<out_t>(0.0);
  double gmax = 0.0;
  for (int i = 0; i < K; ++i) {
    const double gii = static_cast<double>(G[i * K + i]);
    gmax = gii > gmax ? gii : gmax;
  }
  if (!(gmax > 0.0)) return kStatusZeroUpdate;  // every gradient is zero
  int status = 0;
  for (int i = 0; i < K; ++i)
    for (int j = 0; j < K; ++j) A[i * K + j] = gram_entry(G, K, i, j) / gmax;
  jacobi_eigen(A, V, lambda, K);  // lambda and l (2K doubles) are free until after it
  double lmax = 0.0;
  for (int k = 0; k < K; ++k) {
    lambda[k] = A[k * K + k];
    lmax = lambda[k] > lmax ? lambda[k] : lmax;
  }
  const int r = eigen_factor(V, lambda, K, rtol * lmax);
  if (r < K) status |= kStatusRankDeficient;
  double* E = A;
  for (int j = 0; j < K; ++j) {
    for (int c = 0; c < r; ++c) E[j * ld + c] = V[j * K + c];
    E[j * ld + r] = 1.0;
  }
  for (int c = 0; c < r; ++c) target[c] = 0.0;
  target[r] = 1.0;
  const int outcome = nnls(E, ld, K, r + 1, target, sqrt(kCancelTol), l, V, ld, T, K, vec, iws);
  double s = 0.0;
  for (int j = 0; j < K; ++j) s += l[j];
  // 0 in the hull: the residual vanished, or |u*|^2 / max G_ii = (1 - s) / s is below the
  // cancellation level. A capped solve also returns the zero update (always safe).
  if (outcome != kNnlsSolved || !(s > 0.0) || !((1.0 - s) > kCancelTol * s)) return status | kStatusZeroUpdate;
  for (int j = 0; j < K; ++j) w[j] = static_cast<out_t>(l[j] / s);
  return status;
}

}  // namespace hrgrad_ext
