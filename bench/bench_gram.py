"""Benchmark of the HRGrad kernels against eager PyTorch, torch.compile and conflictfree.

Times, per (K, n): ``gram`` (vs ``J @ J.T``), ``hrgrad_weights`` (vs an eager float64
pseudo-inverse of the cosine matrix), ``combine`` (vs ``w @ J``), the whole ``hrgrad`` update
(vs the same Gram-form update in eager PyTorch and under torch.compile, and
``conflictfree.ConFIG_update`` when it is installed), plus a plain read of J (``J.sum(0)``)
as the achievable-bandwidth yardstick. On CUDA it also reports the fraction of the device's
peak memory bandwidth that gram (one read of J) and hrgrad (two reads) reach.

    python bench/bench_gram.py --device cuda --out bench_gram.json
    python bench/bench_gram.py --device cpu --quick

Output: JSON with the device name, versions and one record per case (milliseconds, medians).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
from timing import median_ms

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


def timer(device: torch.device, repeats: int, warmup: int):
    def run(fn) -> float | str:
        try:
            return median_ms(fn, device, warmup, repeats)
        except Exception as exc:  # a baseline failing (e.g. cuSOLVER on large n) is a result
            return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"

    return run


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--K", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    p.add_argument("--n", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--quick", action="store_true", help="small CPU-friendly set: K in {2, 8}, n in {1e4, 1e5}")
    p.add_argument("--scale-n", type=float, default=0.0, help="also run hrgrad alone at K=8 and this n (e.g. 2e8)")
    p.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.quick:
        args.K, args.n, args.repeats = [2, 8], [1e4, 1e5], 5
    run = timer(device, args.repeats, args.warmup)
    try:
        from conflictfree.grad_operator import ConFIG_update
    except ImportError:
        ConFIG_update = None

    compiled_gram = torch.compile(lambda J: J @ J.T) if not args.no_compile else None
    compiled_update = torch.compile(eager_gram_update) if not args.no_compile else None
    compiled_combine = torch.compile(lambda J, w: w @ J) if not args.no_compile else None
    peak = peak_bandwidth(device)
    records = []
    for n_f in args.n:
        n = int(n_f)
        for K in args.K:
            J = torch.randn(K, n, device=device, dtype=dtype)
            G = ops.gram(J, dtype=torch.float64)
            w = torch.randn(K, device=device, dtype=dtype)
            rec = {"K": K, "n": n}
            rec["read_J_ms"] = run(lambda: J.sum(0))
            rec["gram_ms"] = run(lambda: ops.gram(J))
            rec["gram_eager_ms"] = run(lambda: J @ J.T)
            rec["weights_ms"] = run(lambda: ops.hrgrad_weights(G))
            rec["weights_eager_ms"] = run(lambda: eager_weights(G))
            rec["combine_ms"] = run(lambda: ops.combine(J, w))
            rec["combine_eager_ms"] = run(lambda: w @ J)
            rec["hrgrad_ms"] = run(lambda: hrgrad_ext.hrgrad(J))
            rec["hrgrad_eager_ms"] = run(lambda: eager_gram_update(J))
            if compiled_gram is not None:
                rec["gram_compile_ms"] = run(lambda: compiled_gram(J))
                rec["combine_compile_ms"] = run(lambda: compiled_combine(J, w))
                rec["hrgrad_compile_ms"] = run(lambda: compiled_update(J))
            if ConFIG_update is not None and dtype in (torch.float32, torch.float64):
                rec["conflictfree_ms"] = run(lambda: ConFIG_update(J))
            bytes_J = J.numel() * J.element_size()
            for key, reads in (("gram", 1), ("hrgrad", 2), ("read_J", 1)):
                t = rec.get(f"{key}_ms")
                if isinstance(t, float) and t > 0:
                    rec[f"{key}_GBps"] = reads * bytes_J / (t * 1e-3) / 1e9
                    if peak:
                        rec[f"{key}_bw_fraction"] = reads * bytes_J / (t * 1e-3) / peak
            for base in ("hrgrad_eager_ms", "hrgrad_compile_ms", "conflictfree_ms"):
                if isinstance(rec.get(base), float) and isinstance(rec["hrgrad_ms"], float):
                    rec[f"speedup_vs_{base[:-3].replace('hrgrad_', '')}"] = rec[base] / rec["hrgrad_ms"]
            records.append(rec)
            print(
                f"K={K:3d} n={n:>10d}  gram {rec['gram_ms']!s:.8} (eager {rec['gram_eager_ms']!s:.8})  "
                f"hrgrad {rec['hrgrad_ms']!s:.8} (eager {rec['hrgrad_eager_ms']!s:.8}, "
                f"conflictfree {rec.get('conflictfree_ms', '-')!s:.8}) ms",
                file=sys.stderr,
            )

    scale = None
    if args.scale_n:
        n = int(args.scale_n)
        J = torch.randn(8, n, device=device, dtype=dtype)
        t = run(lambda: hrgrad_ext.hrgrad(J))
        ok = bool(torch.isfinite(hrgrad_ext.hrgrad(J)).all())
        scale = {"K": 8, "n": n, "hrgrad_ms": t, "finite": ok}
        del J
    result = {
        "benchmark": "gram",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "hrgrad_ext": hrgrad_ext.__version__,
        "build": hrgrad_ext.build_info(),
        "threads": torch.get_num_threads(),
        "peak_bandwidth_GBps": peak / 1e9 if peak else None,
        "conflictfree": ConFIG_update is not None,
        "repeats": args.repeats,
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
