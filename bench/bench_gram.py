"""Benchmark of the HRGrad kernels against what a user gets for free (BLAS, eager PyTorch).

Per (K, n), timed side by side in interleaved rounds (same-run ratios):

* ``gram`` (float32 result) against ``J @ J.T`` (BLAS sgemm) - target <= 0.5x for K <= 16 and
  <= 1.0x for K in (16, 64] (issue 10) - and ``gram(J, dtype=float64)`` (the exact float64
  accumulation that ``hrgrad`` uses);
* ``combine`` (``J^T w``) and ``combine_accumulate_`` against ``w @ J`` - target <= 1.0x;
* ``hrgrad`` (gram + weights + combine, including the Python glue of ``hrgrad_ext.hrgrad``)
  against the sum of ``gram(J, float64)`` and ``combine`` timed alone - target <= 1.1x;
* ``hrgrad_weights`` against an eager float64 pseudo-inverse; the eager Gram-form update (and,
  with ``--compile``, the same under torch.compile); ``conflictfree.ConFIG_update`` when
  installed (n <= 1e6); a plain read of J (``J.sum(0)``) as the bandwidth yardstick;
* float64 input (n <= 1e6): ``gram`` and ``combine`` against ``J @ J.T`` and ``w @ J`` in float64.

Each record also gives bytes moved and achieved GB/s (and, on CUDA, the fraction of the
device's peak bandwidth). One command does a whole CPU run, every thread count in its own
process::

    python bench/bench_gram.py --device cpu --threads 1 2 --out docs/bench/gram_cpu.json
    python bench/bench_gram.py --device cuda --out bench_gram.json
    python bench/bench_gram.py --device cpu --quick          # small, for a smoke run

Output: JSON with the machine (CPU model, threads, load average at start) and one record per
case (milliseconds: medians, and minima over the rounds).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from timing import compare, machine, per_thread_count

import hrgrad_ext
from hrgrad_ext import ops


def eager_gram_update(J: torch.Tensor) -> torch.Tensor:
    """The HRGrad update written in plain PyTorch (Gram form, float64 K x K work)."""
    G = (J @ J.T).double()
    d = G.diagonal().sqrt()
    C = G / (d[:, None] * d[None, :])
    a = torch.linalg.pinv(C, hermitian=True) @ torch.ones_like(d)
    Ca = C @ a
    xn = (a @ Ca).sqrt()
    length = (d * Ca).sum() / xn
    w = length * a / (d * xn)
    return w.to(J.dtype) @ J


def eager_weights(G: torch.Tensor) -> torch.Tensor:
    d = G.diagonal().sqrt()
    C = G / (d[:, None] * d[None, :])
    a = torch.linalg.pinv(C, hermitian=True) @ torch.ones_like(d)
    Ca = C @ a
    xn = (a @ Ca).sqrt()
    return (d * Ca).sum() / xn * a / (d * xn)


def peak_bandwidth(device: torch.device) -> float | None:
    """Theoretical DRAM bandwidth in bytes/s from the device properties (None if unknown)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8.0  # double data rate


def gram_target(K: int) -> float:
    return 0.5 if K <= 16 else 1.0


def ms(res: dict, key: str) -> float | None:
    r = res.get(key, {})
    return r.get("median_ms")


def fmt(x: float | None, spec: str = "9.4f") -> str:
    return "failed" if x is None else format(x, spec)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--K", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    p.add_argument("--n", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    p.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=15,
                   help="interleaved rounds per case (a third of it, at least 3, for n >= 1e7)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="CPU thread counts; several: one process each, results under 'runs'")
    p.add_argument("--compile", action="store_true", help="also time torch.compile baselines")
    p.add_argument("--no-float64", action="store_true", help="skip the float64-input cases")
    p.add_argument("--no-compile", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--quick", action="store_true", help="K in {2, 8, 32}, n in {1e4, 1e5}, 5 rounds")
    p.add_argument("--scale-n", type=float, default=0.0, help="also run hrgrad alone at K=8 and this n (e.g. 2e8)")
    p.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    args = p.parse_args(argv)
    if args.threads and per_thread_count(__file__, argv, args.threads, args.out):
        return 0
    if args.threads:
        torch.set_num_threads(args.threads[0])

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.quick:
        args.K, args.n, args.rounds = [2, 8, 32], [1e4, 1e5], 5
    try:
        from conflictfree.grad_operator import ConFIG_update
    except ImportError:
        ConFIG_update = None

    compiled_update = torch.compile(eager_gram_update) if args.compile else None
    compiled_gram = torch.compile(lambda J: J @ J.T) if args.compile else None
    peak = peak_bandwidth(device)
    info = machine(device)
    records = []
    for n_f in args.n:
        n = int(n_f)
        rounds = args.rounds if n < 10**7 else max(3, args.rounds // 3)
        for K in args.K:
            J = torch.randn(K, n, device=device, dtype=dtype)
            G = ops.gram(J, dtype=torch.float64)
            w = torch.randn(K, device=device, dtype=dtype)
            out = torch.zeros(n, device=device, dtype=dtype)
            # The targets' operands interleaved among themselves; the other baselines (with
            # large temporaries that flush the caches between the kernels' calls) on their own.
            targets = {
                "read_J": lambda: J.sum(0),
                "gram": lambda: ops.gram(J),
                "gram_f64": lambda: ops.gram(J, dtype=torch.float64),
                "mm": lambda: J @ J.T,
                "combine": lambda: ops.combine(J, w),
                "combine_accumulate": lambda: torch.ops.hrgrad_ext.combine_accumulate_(out, J, w),
                "wJ": lambda: w @ J,
                "hrgrad": lambda: hrgrad_ext.hrgrad(J),
                "weights": lambda: ops.hrgrad_weights(G),
            }
            others = {
                "weights_eager": lambda: eager_weights(G),
                "hrgrad_eager": lambda: eager_gram_update(J),
            }
            if compiled_update is not None:
                others["hrgrad_compile"] = lambda: compiled_update(J)
                others["mm_compile"] = lambda: compiled_gram(J)
            if ConFIG_update is not None and n <= 10**6 and dtype in (torch.float32, torch.float64):
                others["conflictfree"] = lambda: ConFIG_update(J)
            res = compare(targets, device, args.warmup, rounds)
            res.update(compare(others, device, 1, max(3, rounds // 3)))
            rec = {"K": K, "n": n, "dtype": args.dtype, "rounds": rounds, "ms": res}
            ratios = {}
            if ms(res, "gram") and ms(res, "mm"):
                ratios["gram_vs_mm"] = ms(res, "gram") / ms(res, "mm")
                ratios["gram_vs_mm_min"] = res["gram"]["min_ms"] / res["mm"]["min_ms"]
                ratios["gram_target"] = gram_target(K)
            if ms(res, "gram_f64") and ms(res, "mm"):
                ratios["gram_f64_vs_mm"] = ms(res, "gram_f64") / ms(res, "mm")
            if ms(res, "combine") and ms(res, "wJ"):
                ratios["combine_vs_wJ"] = ms(res, "combine") / ms(res, "wJ")
                ratios["combine_vs_wJ_min"] = res["combine"]["min_ms"] / res["wJ"]["min_ms"]
            if ms(res, "combine_accumulate") and ms(res, "wJ"):
                ratios["combine_accumulate_vs_wJ"] = ms(res, "combine_accumulate") / ms(res, "wJ")
            if ms(res, "hrgrad") and ms(res, "gram_f64") and ms(res, "combine"):
                ratios["hrgrad_vs_gram_f64_plus_combine"] = ms(res, "hrgrad") / (ms(res, "gram_f64") + ms(res, "combine"))
            for base in ("hrgrad_eager", "hrgrad_compile", "conflictfree"):
                if ms(res, base) and ms(res, "hrgrad"):
                    ratios[f"speedup_vs_{base.replace('hrgrad_', '')}"] = ms(res, base) / ms(res, "hrgrad")
            rec["ratios"] = ratios
            bytes_J = J.numel() * J.element_size()
            rec["bytes_J"] = bytes_J
            rec["flops_gram"] = K * (K + 1) * n  # K(K+1)/2 multiply-adds per column
            gbps = {}
            for key, reads in (("read_J", 1), ("gram", 1), ("combine", 1), ("wJ", 1), ("mm", 1), ("hrgrad", 2)):
                t = ms(res, key)
                if t:
                    gbps[key] = reads * bytes_J / (t * 1e-3) / 1e9
                    if peak:
                        rec.setdefault("bw_fraction", {})[key] = reads * bytes_J / (t * 1e-3) / peak
            rec["GBps"] = gbps
            records.append(rec)
            print(f"K={K:3d} n={n:>9d}  gram {fmt(ms(res, 'gram'))}  mm {fmt(ms(res, 'mm'))}  "
                  f"({ratios.get('gram_vs_mm', float('nan')):.2f}x, target {gram_target(K)})  "
                  f"combine {ratios.get('combine_vs_wJ', float('nan')):.2f}x  "
                  f"hrgrad {ratios.get('hrgrad_vs_gram_f64_plus_combine', float('nan')):.2f}x of gram64+combine",
                  file=sys.stderr, flush=True)
            del J, G, out
        if dtype == torch.float32 and not args.no_float64 and n <= 10**6:
            for K in args.K:
                J = torch.randn(K, n, device=device, dtype=torch.float64)
                w = torch.randn(K, device=device, dtype=torch.float64)
                res = compare({"gram": lambda: ops.gram(J), "mm": lambda: J @ J.T,
                               "combine": lambda: ops.combine(J, w), "wJ": lambda: w @ J},
                              device, args.warmup, args.rounds)
                rec = {"K": K, "n": n, "dtype": "float64", "rounds": args.rounds, "ms": res,
                       "ratios": {"gram_vs_mm": ms(res, "gram") / ms(res, "mm"),
                                  "combine_vs_wJ": ms(res, "combine") / ms(res, "wJ")}}
                records.append(rec)
                print(f"K={K:3d} n={n:>9d}  float64: gram {rec['ratios']['gram_vs_mm']:.2f}x dgemm, "
                      f"combine {rec['ratios']['combine_vs_wJ']:.2f}x", file=sys.stderr, flush=True)
                del J

    scale = None
    if args.scale_n:
        n = int(args.scale_n)
        J = torch.randn(8, n, device=device, dtype=dtype)
        t = compare({"hrgrad": lambda: hrgrad_ext.hrgrad(J)}, device, args.warmup, max(3, args.rounds // 3))
        ok = bool(torch.isfinite(hrgrad_ext.hrgrad(J)).all())
        scale = {"K": 8, "n": n, "hrgrad_ms": t["hrgrad"].get("median_ms"), "finite": ok}
        del J
    result = {
        "benchmark": "gram",
        "machine": info,
        "device": info["device"] if device.type == "cuda" else info["cpu_model"],
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "hrgrad_ext": hrgrad_ext.__version__,
        "build": hrgrad_ext.build_info(),
        "peak_bandwidth_GBps": peak / 1e9 if peak else None,
        "conflictfree": ConFIG_update is not None,
        "metric": "milliseconds per call, median (and min) over interleaved rounds; ratios of medians",
        "records": records,
        "scale_test": scale,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
