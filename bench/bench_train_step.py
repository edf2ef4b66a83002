"""End-to-end BGK APNN training-step benchmark (the speed goal of issue 5).

Times one full optimisation step (sampling, losses, task gradients, aggregation, Adam step) of
the BGK APNN with an f-network ResNet ``--f-width`` wide and three macro MLPs ``--macro-width``
wide, ``--points`` interior points x ``--nv`` velocity nodes per task, for:

* ``single``    - one eps, plain eager APNN step (reverse-mode input derivatives, one backward);
* ``single_total`` - the same with K times the points (the same total number of points as a
                  K-task step: issue 10's "segmented <= 2x one single-eps step");
* ``separate``  - HRGrad over K tasks with K eager forward/backward passes (the baseline);
* ``segmented`` - HRGrad over K tasks with per-task gradients in one pass (vmap over per-task
                  parameter copies, forward/reverse-mode input derivatives, fused residual ops).
* ``compiled``  - ``segmented`` with its loss function under ``torch.compile`` (inductor; the
                  compilation happens in the warm-up steps and is not timed).
* ``cudagraphs`` - ``compiled`` in ``mode="reduce-overhead"`` (CUDA graphs; GPU only).

Modes are timed in turn, each over its own steps (a step changes the parameters, so the
modes cannot share inputs). Issue 10's CPU targets: segmented <= 1.0x separate and <= 2.0x
single_total. On the CPU, ``--malloc keep`` (the default) first applies
:func:`hrgrad_ext.train.segmented.keep_freed_memory` for every mode (the segmented trainer does
it itself; applying it up front keeps the comparison fair); ``--malloc default`` leaves glibc's
malloc alone, which makes every step page-fault its large activations again.

    python bench/bench_train_step.py --device cpu --quick --threads 1 2 --out docs/bench/train_step_cpu.json
    python bench/bench_train_step.py --device cuda --K 4 8 --out bench_train_step.json

Prints a table and writes JSON (one record per (mode, K), the ratios of the issue's targets and
the machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from timing import machine, per_thread_count

from hrgrad_ext.train.config import TrainConfig
from hrgrad_ext.train.trainer import Trainer

KN = [1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003, 1e-4, 3e-5, 1e-5, 3e-6]


def make_trainer(args, K: int, method: str, grad_mode: str, compile: str = "off", point_factor: int = 1) -> Trainer:
    cfg = TrainConfig(
        problem="bgk", method=method, eps=KN[:K], iters=10**6, device=args.device, dtype=args.dtype,
        nv=args.nv, points={"interior": args.points * point_factor, "initial": args.initial * point_factor},
        grad_mode=grad_mode, compile=compile,
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
    argv = sys.argv[1:] if argv is None else argv
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
    p.add_argument("--modes", nargs="+", default=["single", "single_total", "separate", "segmented", "compiled",
                                                    "cudagraphs"],
                   choices=["single", "single_total", "separate", "segmented", "compiled", "cudagraphs"])
    p.add_argument("--compiled-K", type=int, nargs="+", default=None,
                   help="K values for the compiled / cudagraphs modes (default: --K); each compiles for about a minute")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="CPU thread counts; several: one process each, results under 'runs'")
    p.add_argument("--malloc", choices=["keep", "default"], default="keep",
                   help="CPU: keep freed memory in the process for every mode (see the module docstring)")
    p.add_argument("--quick", action="store_true", help="small sizes for a CPU smoke run")
    p.add_argument("--out", "--json", dest="json", help="write the records here (JSON)")
    args = p.parse_args(argv)
    if args.threads and per_thread_count(__file__, argv, args.threads, args.json):
        return 0
    if args.threads:
        torch.set_num_threads(args.threads[0])
    if args.quick:
        args.points, args.initial, args.f_width, args.macro_width = 64, 16, 32, 16
        args.warmup, args.iters = 2, max(args.iters, 7)
    kept = None
    if not args.device.startswith("cuda") and args.malloc == "keep":
        from hrgrad_ext.train.segmented import keep_freed_memory

        kept = keep_freed_memory()
    info = machine(torch.device(args.device))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    records = []
    runs = []
    if "single" in args.modes:
        runs.append(("single", 1, "sum", "separate"))
    for K in args.K:
        if "single_total" in args.modes:
            runs.append(("single_total", K, "sum", "separate"))
        if "separate" in args.modes:
            runs.append(("separate", K, "hrgrad", "separate"))
        if "segmented" in args.modes:
            runs.append(("segmented", K, "hrgrad", "segmented"))
    for K in args.compiled_K or args.K:
        if "compiled" in args.modes:
            runs.append(("compiled", K, "hrgrad", "segmented"))
        if "cudagraphs" in args.modes and args.device.startswith("cuda"):
            runs.append(("cudagraphs", K, "hrgrad", "segmented"))
    # Every K's non-compiled modes are timed in interleaved rounds (one step of each in turn),
    # so that a change of machine load hits them alike; compiled modes on their own after.
    groups: list[list[tuple]] = []
    for K in args.K:
        groups.append([r for r in runs if r[1] == K and r[0] in ("single_total", "separate", "segmented")]
                      + ([r for r in runs if r[0] == "single"] if K == args.K[0] else []))
    groups += [[r] for r in runs if r[0] in ("compiled", "cudagraphs")]
    for group in groups:
        trainers = []
        for mode, K, method, grad_mode in group:
            compile = {"compiled": "default", "cudagraphs": "reduce-overhead"}.get(mode, "off")
            if mode == "single_total":  # one eps, K times the points of a task
                tr = make_trainer(args, 1, method, grad_mode, compile, point_factor=K)
            else:
                tr = make_trainer(args, K, method, grad_mode, compile)
            t0 = time.perf_counter()
            # compiled modes compile on their first step (and CUDA graphs record on the next ones)
            time_steps(tr, max(args.warmup, 3) if compile != "off" else args.warmup, 0)
            trainers.append((mode, K, method, compile, time.perf_counter() - t0 if compile != "off" else 0.0, tr))
        times = {id(t[-1]): [] for t in trainers}
        for _ in range(args.iters):
            for *_, tr in trainers:
                times[id(tr)] += time_steps(tr, 0, 1)
        for mode, K, method, compile, compile_s, tr in trainers:
            ts = times[id(tr)]
            rec = {"mode": mode, "K": K, "method": method, "median_ms": statistics.median(ts), "min_ms": min(ts),
                   "points_per_task": args.points * (K if mode == "single_total" else 1), "nv": args.nv,
                   "parameters": sum(p.numel() for p in tr.params), "compile": compile, "compile_s": compile_s,
                   "device": device_name, "dtype": args.dtype, "torch": torch.__version__}
            records.append(rec)
            print(f"{mode:>12} K={K:<2} {rec['median_ms']:9.2f} ms (min {rec['min_ms']:.2f})  "
                  f"{rec['parameters']} params  {device_name}", flush=True)
        del trainers
    by = {(r["mode"], r["K"]): r["median_ms"] for r in records}
    ratios = {}
    for K in args.K:
        seg = by.get(("segmented", K))
        if seg and by.get(("separate", K)):
            ratios[f"K{K}_segmented_vs_separate"] = seg / by[("separate", K)]
        if seg and by.get(("single_total", K)):
            ratios[f"K{K}_segmented_vs_single_total"] = seg / by[("single_total", K)]
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}", flush=True)
    report = {"benchmark": "train_step", "machine": info, "threads": torch.get_num_threads(),
              "malloc_keep_freed_memory": kept, "quick": args.quick,
              "sizes": {"points": args.points, "initial": args.initial, "nv": args.nv, "f_width": args.f_width,
                        "f_depth": args.f_depth, "macro_width": args.macro_width, "macro_depth": args.macro_depth},
              "metric": "wall ms per training step, median over iters (after warm-up); modes of one K interleaved",
              "records": records, "ratios": ratios}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
