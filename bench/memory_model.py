"""What each kernel must move through memory, and how fast the device could move it.

The kernels of hrgrad-ext are memory-bound on a GPU (docs/CUDA_DESIGN.md reviews each one), so
their limit is the *read-once floor*: the bytes an op cannot avoid moving (every input read
once, every output written once; the per-call scratch of a split reduction, partials of a few
KB, not counted) divided by the device's memory bandwidth. The benchmarks write, beside each
measured time, the op's bytes, this floor, the achieved GB/s and the percentage of the floor
reached (100 % = at the floor).

    from memory_model import bandwidth, gram_bytes, floor_figures
    bw = bandwidth(torch.device("cuda"))           # {"bytes_per_s", "source", "fp64_fma_per_s"}
    floor_figures(gram_bytes(K=8, n=10**7, elem=4), measured_ms, bw)

Byte counts are pure functions of the shapes (unit-tested on the CPU: tests/test_memory_model.py).
Element sizes are in bytes (4 for float32). ``B`` is the batch of a batched op.
"""

from __future__ import annotations

import torch

# HBM bandwidth (bytes/s) and float64 FMA rate (non-tensor, FMA/s = TFLOPS / 2) of the data-centre
# GPUs the project is run on, from the vendors' data sheets. Matched by substring of
# torch.cuda.get_device_name, first match wins (so "GH200" before "H200", variants before the
# family).
DEVICE_TABLE: tuple[tuple[str, float, float], ...] = (
    ("GH200", 4.0e12, 17.0e12),
    ("H200", 4.8e12, 17.0e12),
    ("H100 PCIe", 2.0e12, 13.0e12),
    ("H100 NVL", 3.9e12, 15.0e12),
    ("H100", 3.35e12, 17.0e12),  # SXM5 80GB ("NVIDIA H100 80GB HBM3")
    ("A100-SXM4-80GB", 2.039e12, 4.85e12),
    ("A100 80GB PCIe", 1.935e12, 4.85e12),
    ("A100", 1.555e12, 4.85e12),  # 40 GB variants
    ("L40S", 0.864e12, 0.71e12),
    ("RTX 4090", 1.008e12, 0.65e12),
    ("V100", 0.9e12, 3.9e12),
)
UNKNOWN = "unknown device"


def bandwidth(device: torch.device | str | None = None, name: str | None = None) -> dict:
    """``{"bytes_per_s", "fp64_fma_per_s", "source"}`` of a device.

    From :data:`DEVICE_TABLE` by device name; for a CUDA device not in the table, the
    theoretical bandwidth from torch's device properties (memory clock x bus width, double data
    rate) where this torch reports them; otherwise ``bytes_per_s`` is None and ``source`` says
    "unknown device" (the benchmarks then print bytes and GB/s without a floor). The CPU has no
    entry: its bandwidth depends on the memory configuration, not on the model name.
    """
    device = torch.device(device) if device is not None else None
    if name is None and device is not None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    if name:
        for key, bw, fma in DEVICE_TABLE:
            if key in name:
                return {"bytes_per_s": bw, "fp64_fma_per_s": fma, "source": f"table: {key}"}
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
        if clock_khz and bus_bits:
            return {"bytes_per_s": 2.0 * clock_khz * 1e3 * bus_bits / 8.0, "fp64_fma_per_s": None,
                    "source": f"device properties of {name}"}
    return {"bytes_per_s": None, "fp64_fma_per_s": None, "source": f"{UNKNOWN}: {name or device}"}


def floor_figures(nbytes: int, measured_ms: float | None, bw: dict) -> dict:
    """The figures written beside a measurement: bytes, floor_ms, achieved GB/s, % of floor."""
    out: dict = {"bytes": int(nbytes)}
    rate = bw.get("bytes_per_s")
    out["floor_ms"] = nbytes / rate * 1e3 if rate else None
    if measured_ms:
        out["GBps"] = nbytes / (measured_ms * 1e-3) / 1e9
        out["pct_of_floor"] = 100.0 * out["floor_ms"] / measured_ms if rate else None
    return out


# ---- gram family ---------------------------------------------------------------------------------

def gram_bytes(K: int, n: int, elem: int, out_elem: int = 8, B: int = 1) -> int:
    """gram: J [B, K, n] read once, G [B, K, K] written."""
    return B * (K * n * elem + K * K * out_elem)


def gram_fp64_fma(K: int, n: int, B: int = 1) -> int:
    """float64 multiply-adds of gram: the upper triangle, K (K + 1) / 2 per column."""
    return B * n * K * (K + 1) // 2


def combine_bytes(K: int, n: int, elem: int, B: int = 1, accumulate: bool = False) -> int:
    """combine (out = J^T w): J read once, w read, out written; combine_accumulate_ also reads out."""
    return B * (K * n * elem + K * elem + n * elem * (2 if accumulate else 1))


def hrgrad_weights_bytes(K: int, elem: int, B: int = 1) -> int:
    """hrgrad_weights: G read, weights and a status flag written (latency-bound: a few KB)."""
    return B * (K * K * elem + K * elem + 4)


def hrgrad_bytes(K: int, n: int, elem: int) -> int:
    """hrgrad(J): gram (one read of J), the K x K solve, combine (a second read of J, the
    update written). The weights depend on the whole of G, so two reads of J is the floor of
    any implementation that does not keep J on chip between the passes."""
    return gram_bytes(K, n, elem) + hrgrad_weights_bytes(K, 8) + combine_bytes(K, n, elem)


def read_bytes(K: int, n: int, elem: int) -> int:
    """``J.sum(1)``: the plain read of J the GPU targets compare against."""
    return K * n * elem + K * elem


def dual_cone_weights_bytes(K: int, M: int, elem: int, B: int = 1) -> int:
    """dual_cone_weights(G [B, K, K], targets [B, M, K]) -> weights [B, M, K] (+ status)."""
    return B * (K * K * elem + 2 * M * K * elem + M * 4)


def mgda_weights_bytes(K: int, elem: int, B: int = 1) -> int:
    """mgda_weights(G [B, K, K]) -> weights [B, K] (+ status)."""
    return B * (K * K * elem + K * elem + 4)


# ---- kinetic family ------------------------------------------------------------------------------
# Per row: the [N, V] fields dominate; per-row values ([N] or [N, 3]) and the quadrature (v, w of
# length V) are counted too. kn / eps given as one number (stride 0) are read once.

def _param(N: int, per_row: bool) -> int:
    return N if per_row else 1


def bgk_forward_bytes(N: int, V: int, elem: int, kn_per_row: bool = True) -> int:
    """bgk_residuals: F, Ft, Fx and rho, u, T, rho_t, u_t, T_t, kn, v, w read; kinetic [N, V],
    conservation and consistency [N, 3] written."""
    reads = 3 * N * V + 6 * N + _param(N, kn_per_row) + 2 * V
    writes = N * V + 6 * N
    return elem * (reads + writes)


def bgk_backward_bytes(N: int, V: int, elem: int, kn_per_row: bool = True) -> int:
    """bgk_residuals_backward: grad kinetic [N, V], grad conservation / consistency [N, 3], Ft, Fx
    and the per-row inputs read; dF, dFt, dFx [N, V] and the seven per-row gradients written."""
    reads = 3 * N * V + 6 * N + 6 * N + _param(N, kn_per_row) + 2 * V
    writes = 3 * N * V + 7 * N
    return elem * (reads + writes)


def transport_forward_bytes(N: int, V: int, elem: int, eps_per_row: bool = True) -> int:
    """transport_mm_residuals: G, Gt, Gx, rho_t, rho_x, eps, v, w read; g, micro [N, V] and macro [N]
    written."""
    reads = 3 * N * V + 2 * N + _param(N, eps_per_row) + 2 * V
    writes = 2 * N * V + N
    return elem * (reads + writes)


def transport_backward_bytes(N: int, V: int, elem: int, eps_per_row: bool = True) -> int:
    """transport_mm_residuals_backward: grad g, grad micro, Gt, Gx [N, V], grad macro, eps, v, w
    read; dG, dGt, dGx [N, V], drho_x, deps written."""
    reads = 4 * N * V + N + _param(N, eps_per_row) + 2 * V
    writes = 3 * N * V + 2 * N
    return elem * (reads + writes)


def bgk_sq_forward_bytes(N: int, V: int, elem: int, kn_per_row: bool = True) -> int:
    """bgk_residuals_sq: the inputs of bgk_residuals read; kinetic_sq [N], conservation and
    consistency [N, 3] written (no [N, V] output)."""
    reads = 3 * N * V + 6 * N + _param(N, kn_per_row) + 2 * V
    return elem * (reads + 7 * N)


def bgk_sq_backward_bytes(N: int, V: int, elem: int, kn_per_row: bool = True) -> int:
    """bgk_residuals_sq_backward: F, Ft, Fx [N, V], grad kinetic_sq [N], grad conservation and
    grad consistency [N, 3], the per-row inputs read; dF, dFt, dFx and seven [N] gradients
    written."""
    reads = 3 * N * V + N + 6 * N + 6 * N + _param(N, kn_per_row) + 2 * V
    return elem * (reads + 3 * N * V + 7 * N)


def transport_sq_forward_bytes(N: int, V: int, elem: int, eps_per_row: bool = True) -> int:
    """transport_mm_residuals_sq: the inputs of transport_mm_residuals read; micro_sq, macro [N]
    written."""
    reads = 3 * N * V + 2 * N + _param(N, eps_per_row) + 2 * V
    return elem * (reads + 2 * N)


def transport_sq_backward_bytes(N: int, V: int, elem: int, eps_per_row: bool = True) -> int:
    """transport_mm_residuals_sq_backward: G, Gt, Gx [N, V], grad micro_sq, grad macro, rho_x, eps,
    v, w read; dG, dGt, dGx [N, V], drho_x, deps written."""
    reads = 3 * N * V + 3 * N + _param(N, eps_per_row) + 2 * V
    return elem * (reads + 3 * N * V + 2 * N)


def maxwellian_forward_bytes(N: int, V: int, elem: int) -> int:
    """maxwellian: rho, u, T, v read; M [N, V] written."""
    return elem * (3 * N + V + N * V)


def maxwellian_backward_bytes(N: int, V: int, elem: int) -> int:
    """maxwellian_backward: grad [N, V], rho, u, T, v read; three [N] gradients written."""
    return elem * (N * V + 3 * N + V + 3 * N)


def velocity_moments_forward_bytes(N: int, V: int, elem: int, order: int = 2) -> int:
    """velocity_moments: F [N, V], v, w read; [N, order + 1] written."""
    return elem * (N * V + 2 * V + N * (order + 1))


def velocity_moments_backward_bytes(N: int, V: int, elem: int, order: int = 2) -> int:
    """velocity_moments_backward: grad [N, order + 1], v, w read; dF [N, V] written."""
    return elem * (N * (order + 1) + 2 * V + N * V)


# The residual outputs the benchmark's loss (sum of mean squares) uses, as numbers of [N, V]
# fields and of [N, c] columns: its floor is one read of each and one write of its gradient.
_LOSS_FIELDS = {
    "bgk_residuals": (1, 6),           # kinetic; conservation + consistency
    "transport_mm_residuals": (1, 1),  # micro; macro
    "maxwellian": (1, 0),
    "velocity_moments": (0, 3),
    "bgk_residuals_sq": (0, 7),            # kinetic_sq; conservation + consistency
    "transport_mm_residuals_sq": (0, 2),   # micro_sq; macro
}

KINETIC_OPS = {
    "bgk_residuals": (bgk_forward_bytes, bgk_backward_bytes),
    "transport_mm_residuals": (transport_forward_bytes, transport_backward_bytes),
    "maxwellian": (maxwellian_forward_bytes, maxwellian_backward_bytes),
    "velocity_moments": (velocity_moments_forward_bytes, velocity_moments_backward_bytes),
    "bgk_residuals_sq": (bgk_sq_forward_bytes, bgk_sq_backward_bytes),
    "transport_mm_residuals_sq": (transport_sq_forward_bytes, transport_sq_backward_bytes),
}


def kinetic_bytes(op: str, N: int, V: int, elem: int) -> dict[str, int]:
    """Bytes of the fused forward op, the fused backward op, and one forward + backward of the
    benchmark's loss (both ops plus one read of the used residuals and one write of their
    gradients): ``{"forward_op", "backward_op", "step"}``."""
    fwd, bwd = KINETIC_OPS[op]
    fields, cols = _LOSS_FIELDS[op]
    loss = 2 * elem * (fields * N * V + cols * N)
    f, b = fwd(N, V, elem), bwd(N, V, elem)
    return {"forward_op": f, "backward_op": b, "step": f + b + loss}
