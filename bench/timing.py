"""Shared timing for the benchmarks: medians in milliseconds, CUDA events on the GPU."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms after ``warmup`` untimed calls.

    On CUDA each call is bracketed by events and waited for, so the time is the device's
    (including launch gaps), not the host's enqueue time.
    """
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def environment(device: torch.device) -> dict:
    """What a benchmark's JSON records about where it ran: device, versions, build, threads."""
    import platform

    import hrgrad_ext

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "hrgrad_ext": hrgrad_ext.__version__,
        "build": hrgrad_ext.build_info(),
        "threads": torch.get_num_threads(),
    }


def write_json(result: dict, out: str | None) -> None:
    """The JSON to ``out``, or to stdout without one."""
    import json

    text = json.dumps(result, indent=2)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
    else:
        print(text)
