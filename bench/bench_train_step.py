"""End-to-end BGK APNN training-step benchmark (the speed goal of issue 5).

Times one full optimisation step (sampling, losses, task gradients, aggregation, Adam step) of
the BGK APNN with an f-network ResNet ``--f-width`` wide and three macro MLPs ``--macro-width``
wide, ``--points`` interior points x ``--nv`` velocity nodes per task, for:

* ``single``    - one eps, plain eager APNN step (reverse-mode input derivatives, one backward);
* ``separate``  - HRGrad over K tasks with K eager forward/backward passes (the baseline);
* ``segmented`` - HRGrad over K tasks with per-task gradients in one pass (vmap over per-task
                  parameter copies, forward/reverse-mode input derivatives, fused residual ops).
* ``compiled``  - ``segmented`` with its loss function under ``torch.compile`` (inductor; the
                  compilation happens in the warm-up steps and is not timed).
* ``cudagraphs`` - ``compiled`` in ``mode="reduce-overhead"`` (CUDA graphs; GPU only).

    python bench/bench_train_step.py --device cuda --K 4 8 --out bench_train_step.json
    python bench/bench_train_step.py --quick          # small sizes, CPU smoke run

Prints a table and writes JSON (one record per (mode, K)).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hrgrad_ext.train.config import TrainConfig
from hrgrad_ext.train.trainer import Trainer

KN = [1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003, 1e-4, 3e-5, 1e-5, 3e-6]


def make_trainer(args, K: int, method: str, grad_mode: str, compile: str = "off") -> Trainer:
    cfg = TrainConfig(
        problem="bgk", method=method, eps=KN[:K], iters=10**6, device=args.device, dtype=args.dtype,
        nv=args.nv, points={"interior": args.points, "initial": args.initial}, grad_mode=grad_mode, compile=compile,
        model={"encoding": {"fourier": 0},
               "f": {"kind": "resnet", "width": args.f_width, "depth": args.f_depth, "activation": "tanh"},
               "macro": {"kind": "mlp", "width": args.macro_width, "depth": args.macro_depth, "activation": "tanh"}},
        out="/tmp/hrgrad_bench_unused")
    cfg.log.progress = False
    return Trainer(cfg)


def time_steps(tr: Trainer, warmup: int, iters: int) -> list[float]:
    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        tr.train_step()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        tr.train_step()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--K", type=int, nargs="+", default=[4, 8])
    p.add_argument("--points", type=int, default=512)
    p.add_argument("--initial", type=int, default=128)
    p.add_argument("--nv", type=int, default=64)
    p.add_argument("--f-width", type=int, default=128)
    p.add_argument("--f-depth", type=int, default=3)
    p.add_argument("--macro-width", type=int, default=64)
    p.add_argument("--macro-depth", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["single", "separate", "segmented", "compiled", "cudagraphs"],
                   choices=["single", "separate", "segmented", "compiled", "cudagraphs"])
    p.add_argument("--compiled-K", type=int, nargs="+", default=None,
                   help="K values for the compiled / cudagraphs modes (default: --K); each compiles for about a minute")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small sizes for a CPU smoke run")
    p.add_argument("--out", "--json", dest="json", help="write the records here (JSON)")
    args = p.parse_args(argv)
    if args.quick:
        args.points, args.initial, args.f_width, args.macro_width, args.K = 64, 16, 32, 16, [4]
        args.warmup, args.iters = 1, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    records = []
    runs = []
    if "single" in args.modes:
        runs.append(("single", 1, "sum", "separate"))
    for K in args.K:
        if "separate" in args.modes:
            runs.append(("separate", K, "hrgrad", "separate"))
        if "segmented" in args.modes:
            runs.append(("segmented", K, "hrgrad", "segmented"))
    for K in args.compiled_K or args.K:
        if "compiled" in args.modes:
            runs.append(("compiled", K, "hrgrad", "segmented"))
        if "cudagraphs" in args.modes and args.device.startswith("cuda"):
            runs.append(("cudagraphs", K, "hrgrad", "segmented"))
    for mode, K, method, grad_mode in runs:
        compile = {"compiled": "default", "cudagraphs": "reduce-overhead"}.get(mode, "off")
        tr = make_trainer(args, K, method, grad_mode, compile)
        t0 = time.perf_counter()
        # compiled modes compile on their first step (and CUDA graphs record on the next ones)
        time_steps(tr, max(args.warmup, 3) if compile != "off" else 0, 0)
        compile_s = time.perf_counter() - t0 if compile != "off" else 0.0
        times = time_steps(tr, args.warmup, args.iters)
        rec = {"mode": mode, "K": K, "method": method, "median_ms": statistics.median(times), "min_ms": min(times),
               "points_per_task": args.points, "nv": args.nv, "parameters": sum(p.numel() for p in tr.params),
               "compile": compile, "compile_s": compile_s, "device": device_name, "dtype": args.dtype,
               "torch": torch.__version__}
        records.append(rec)
        print(f"{mode:>10} K={K:<2} {rec['median_ms']:9.2f} ms (min {rec['min_ms']:.2f})  "
              f"{rec['parameters']} params  {device_name}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
