"""Shared timing for the benchmarks: interleaved same-run comparisons, medians in milliseconds,
CUDA events on the GPU, and the machine facts every JSON records."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms after ``warmup`` untimed calls.

    On CUDA each call is bracketed by events and waited for, so the time is the device's
    (including launch gaps), not the host's enqueue time.
    """
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(_time_once(fn, device) for _ in range(repeats))


def compare(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, rounds: int) -> dict[str, dict]:
    """Times the functions side by side: each round calls every function once, in turn, so a
    change of machine load (other jobs, frequency) hits all of them alike and their ratios
    stay comparable. The order is shuffled every round (fixed seed): on inputs about the size of
    the last-level cache, what a call finds in the cache depends on the call before it, and a
    fixed order would favour the same function every round. A function that raises is reported
    as failed and dropped.

    Returns ``{name: {"median_ms", "min_ms"}}`` (or ``{"failed": message}``).
    """
    live, out = dict(fns), {}
    for name, fn in list(live.items()):
        try:
            for _ in range(warmup):
                fn()
        except Exception as exc:  # a baseline failing (e.g. out of memory) is a result
            out[name] = {"failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            del live[name]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in live}
    order, rng = list(live), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            times[name].append(_time_once(live[name], device))
    for name, ts in times.items():
        out[name] = {"median_ms": statistics.median(ts), "min_ms": min(ts)}
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """What a reader needs to judge the numbers: device, CPU model, threads, versions, and
    the load average when the run started (more than the thread count means the CPU was
    shared with other work and the timings are contended)."""
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "hrgrad_ext_cpu_isa_cap": os.environ.get("HRGRAD_EXT_CPU_ISA") or None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        info["loadavg_1min_at_start"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def per_thread_count(script: str, argv: list[str], threads: list[int], out: str | None) -> bool:
    """With several CPU thread counts, runs ``script`` once per count in a fresh process
    (torch.compile bakes the thread count into its CPU kernels) and writes
    ``{"runs": [report, ...]}`` to ``out``. Returns False (nothing done) for a single count."""
    if len(threads) <= 1:
        return False
    runs = []
    base = []
    skip = False
    for i, a in enumerate(argv):  # drop --threads ... and --out ... from the child arguments
        if skip:
            if a.startswith("--"):
                skip = False
            else:
                continue
        if a in ("--threads", "--out", "--json"):
            skip = True
            continue
        base.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        for t in threads:
            path = os.path.join(tmp, f"threads{t}.json")
            print(f"--- {os.path.basename(script)}: {t} thread(s)", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, script, *base, "--threads", str(t), "--out", path], check=True)
            with open(path) as fh:
                runs.append(json.load(fh))
    text = json.dumps({"runs": runs}, indent=2)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text)
    return True


def environment(device: torch.device) -> dict:
    """What a benchmark's JSON records about where it ran: device, versions, build, threads
    (with :func:`machine`'s CPU model and load average)."""
    import hrgrad_ext

    return {
        **machine(device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "hrgrad_ext": hrgrad_ext.__version__,
        "build": hrgrad_ext.build_info(),
    }


def write_json(result: dict, out: str | None) -> None:
    """The JSON to ``out``, or to stdout without one."""
    text = json.dumps(result, indent=2)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
    else:
        print(text)

