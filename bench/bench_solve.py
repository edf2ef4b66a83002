"""Benchmark of the K x K solves: HRGrad's rotation solve (main path and exact dual-cone
fallback), the dual-cone projections of UPGrad and MGDA's minimum-norm solve, at K in
{2, 8, 32, 64}.

Per K and input kind it times, per problem (a batch of B Gram matrices in one call, divided by
B, and one matrix per call):
  - ``hrgrad_weights``; with ``--n`` also the whole ``hrgrad`` step on a float64 J [K, n] whose
    Gram matrix takes the same path, so that the solve's share of a step is visible;
  - ``dual_cone_weights(G, I)`` (UPGrad's K projections) against scipy's NNLS, one call per
    projection (what a user would otherwise call: Lawson-Hanson in compiled code);
  - ``mgda_weights`` against scipy's NNLS on the same least-distance problem.
Input kinds (K tasks; the last two of rank K // 2): ``full_rank`` (HRGrad's main path),
``fallback`` (C^+ 1 conflicts and the exact projection onto the dual cone is not zero) and
``zero`` (the fallback finds that the cone holds no non-zero update: ZERO_UPDATE), drawn at
random and kept when ``hrgrad_weights`` takes that path.

    python bench/bench_solve.py --out solve.json
    python bench/bench_solve.py --device cuda --out solve_cuda.json
    python bench/bench_solve.py --baseline solve_previous.json   # ratios against another build

``--baseline`` reads the JSON of a run of this script with another build of hrgrad_ext (e.g.
the commit before the exact solver: ``PYTHONPATH=<old checkout>/python python
bench/bench_solve.py --out solve_previous.json``) and adds the ratios previous / this.
Output: JSON with the device, thread count, versions and one record per (K, kind).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import scipy.optimize
import torch
from timing import environment, median_ms, write_json

import hrgrad_ext
from hrgrad_ext import ops

KINDS = ("full_rank", "fallback", "zero")
# (w, status): hrgrad_weights_ex, or hrgrad_weights in the builds before it (--baseline runs)
weights_ex = getattr(ops, "hrgrad_weights_ex", ops.hrgrad_weights)


def _coords(kind: str, K: int, B: int, g: torch.Generator) -> torch.Tensor:
    """B task sets of K gradients written in an orthonormal basis of their span: [B, K, r]."""
    if kind == "full_rank":
        return torch.randn(B, K, K, generator=g, dtype=torch.float64)
    r = max(1, K // 2)
    picked = []
    for _ in range(20):  # keep the candidates that take the wanted path
        coords = torch.randn(4 * B, K, r, generator=g, dtype=torch.float64)
        if kind == "fallback":
            coords[..., 0] = coords[..., 0].abs()  # a common direction: the cone is not {0}
        fallback = (weights_ex(coords @ coords.transpose(1, 2))[1] & 4) != 0
        for X in coords[fallback]:
            # zero or not decided by scipy, so that every build is timed on the same inputs
            units = (X / X.norm(dim=1, keepdim=True)).numpy()
            mu, residual = scipy.optimize.nnls(units.T, -units.sum(0), maxiter=50 * K)
            if (residual <= 1e-6 * (K + mu.sum())) == (kind == "zero"):
                picked.append(X)
        if len(picked) >= B:
            return torch.stack(picked[:B])
    return None  # this path does not occur for K (e.g. K = 2: the fallback is always zero)


def jacobians(kind: str, K: int, B: int, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """B float64 Jacobians [K, n] of the kind; n = the rank when None. The kinds: full_rank
    (HRGrad's main path), fallback (C^+ 1 conflicts; the projection onto the cone is not zero),
    zero (the fallback finds that only the zero update conflicts with no task)."""
    coords = _coords(kind, K, B, torch.Generator().manual_seed(seed))
    if n is None or coords is None:
        return coords
    r = coords.shape[-1]
    # an orthonormal basis of r vectors in R^n with disjoint supports: J J^T = coords coords^T
    basis = torch.zeros(r, n, dtype=torch.float64)
    width = n // r
    for k in range(r):
        basis[k, k * width:(k + 1) * width] = torch.randn(width, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    basis /= basis.norm(dim=1, keepdim=True)
    return coords @ basis


def scipy_upgrad(G: np.ndarray) -> None:
    """UPGrad's K projections with scipy's NNLS on a factor of G (what the op computes)."""
    lam, V = np.linalg.eigh(G)
    keep = lam > 1e-12 * lam.max()
    R = (V[:, keep] * np.sqrt(lam[keep])).T  # G = R^T R
    for i in range(G.shape[0]):
        scipy.optimize.nnls(R, -R[:, i], maxiter=50 * G.shape[0])


def scipy_mgda(G: np.ndarray) -> None:
    lam, V = np.linalg.eigh(G / G.diagonal().max())
    keep = lam > 1e-12 * lam.max()
    R = (V[:, keep] * np.sqrt(lam[keep])).T
    E = np.vstack([R, np.ones(G.shape[0])])
    f = np.zeros(E.shape[0])
    f[-1] = 1.0
    scipy.optimize.nnls(E, f, maxiter=50 * G.shape[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--K", type=int, nargs="+", default=[2, 8, 32, 64])
    p.add_argument("--batch", type=int, default=64, help="Gram matrices per call for the per-problem times")
    p.add_argument("--n", type=float, default=2e5, help="parameters of the hrgrad step (0: skip it)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-scipy", action="store_true", help="skip the scipy baselines")
    p.add_argument("--baseline", help="JSON of this benchmark with another build: adds previous/this ratios")
    p.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    has_cone_ops = hasattr(torch.ops.hrgrad_ext, "dual_cone_weights")  # absent in builds before them

    def run(fn) -> float:
        return median_ms(fn, device, args.warmup, args.repeats)

    records = []
    for K in args.K:
        for kind in KINDS:
            J = jacobians(kind, K, args.batch)
            if J is None:
                continue
            G = (J @ J.transpose(1, 2)).to(device)
            G1 = G[0].contiguous()
            eye = torch.eye(K, dtype=torch.float64, device=device).expand(args.batch, K, K).contiguous()
            _, status = weights_ex(G)
            status = status.cpu()
            rec = {
                "K": K,
                "kind": kind,
                "batch": args.batch,
                "fallback_fraction": float(((status & 4) != 0).double().mean()),
                "zero_update_fraction": float(((status & 8) != 0).double().mean()),
                "hrgrad_weights_ms_per_problem": run(lambda: weights_ex(G)) / args.batch,
                "hrgrad_weights_ms_single": run(lambda: weights_ex(G1)),
            }
            if has_cone_ops:
                rec["upgrad_ms_per_problem"] = run(lambda: ops.dual_cone_weights(G, eye)) / args.batch
                rec["mgda_ms_per_problem"] = run(lambda: ops.mgda_weights(G)) / args.batch
            if not args.no_scipy:
                Gs = [g.cpu().numpy() for g in G[: min(args.batch, 16)]]
                rec["upgrad_scipy_ms_per_problem"] = median_ms(lambda: [scipy_upgrad(g) for g in Gs], torch.device("cpu"), 1, 3) / len(Gs)
                rec["mgda_scipy_ms_per_problem"] = median_ms(lambda: [scipy_mgda(g) for g in Gs], torch.device("cpu"), 1, 3) / len(Gs)
                if has_cone_ops:
                    rec["upgrad_speedup_vs_scipy"] = rec["upgrad_scipy_ms_per_problem"] / rec["upgrad_ms_per_problem"]
                    rec["mgda_speedup_vs_scipy"] = rec["mgda_scipy_ms_per_problem"] / rec["mgda_ms_per_problem"]
            if args.n:
                # one float64 J [K, n] of the same kind (float64 keeps its rank exactly): the
                # solve's share of a whole hrgrad step
                Jn = jacobians(kind, K, 1, n=int(args.n))[0].to(device=device)
                Gn = ops.gram(Jn, dtype=torch.float64)
                rec["step_fallback"] = bool(int(weights_ex(Gn)[1]) & 4)
                rec["hrgrad_step_ms"] = run(lambda: hrgrad_ext.hrgrad(Jn))
                rec["step_solve_ms"] = run(lambda: weights_ex(Gn))
                rec["solve_share_of_step"] = rec["step_solve_ms"] / rec["hrgrad_step_ms"]
                del Jn
            records.append(rec)
            print(
                f"K={K:3d} {kind:12s} fallback {rec['fallback_fraction']:.2f}  hrgrad_weights "
                f"{rec['hrgrad_weights_ms_per_problem'] * 1e3:9.1f} us/problem  "
                f"upgrad {rec.get('upgrad_ms_per_problem', float('nan')) * 1e3:9.1f} us "
                f"(scipy {rec.get('upgrad_scipy_ms_per_problem', float('nan')) * 1e3:9.1f})  "
                f"mgda {rec.get('mgda_ms_per_problem', float('nan')) * 1e3:8.1f} us  "
                f"solve share of step {rec.get('solve_share_of_step', float('nan')):.3f}",
                file=sys.stderr,
            )

    if args.baseline:
        with open(args.baseline) as fh:
            previous = {(r["K"], r["kind"]): r for r in json.load(fh)["records"]}
        for rec in records:
            old = previous.get((rec["K"], rec["kind"]))
            if not old:
                continue
            for key in ("hrgrad_weights_ms_per_problem", "hrgrad_weights_ms_single", "hrgrad_step_ms"):
                if key in old and key in rec:
                    rec[f"previous_{key}"] = old[key]
                    rec[f"speedup_vs_previous_{key.replace('_ms', '')}"] = old[key] / rec[key]

    result = {"benchmark": "solve", **environment(device), "repeats": args.repeats, "n": int(args.n),
              "baseline": args.baseline, "records": records}
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
