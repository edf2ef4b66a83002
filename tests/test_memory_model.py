"""The byte counts of bench/memory_model.py (the read-once floors the GPU benchmarks print): each
one equals the bytes of the op's actual inputs and outputs, counted from the tensors of a real
call. No timings."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory_model as mm  # noqa: E402

OPS = torch.ops.hrgrad_ext


def tensor_bytes(*xs):
    """Bytes of the distinct tensors among xs (nested tuples flattened); a tensor of stride 0
    (a broadcast scalar) counts one element."""
    seen, total = set(), 0
    for x in xs:
        if isinstance(x, (tuple, list)):
            total += tensor_bytes(*x)
            continue
        if isinstance(x, torch.Tensor) and id(x) not in seen:
            seen.add(id(x))
            total += x.numel() * x.element_size()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_family_counts_every_input_and_output_once(dtype):
    K, n, B = 5, 37, 3
    e = torch.tensor([], dtype=dtype).element_size()
    J = torch.randn(B, K, n, dtype=dtype)
    G = OPS.gram(J, torch.float64)
    assert mm.gram_bytes(K, n, e, out_elem=8, B=B) == tensor_bytes(J, G)
    w = torch.randn(B, K, dtype=dtype)
    out = OPS.combine(J, w)
    assert mm.combine_bytes(K, n, e, B=B) == tensor_bytes(J, w, out)
    assert mm.combine_bytes(K, n, e, B=B, accumulate=True) == tensor_bytes(J, w, out) + out.numel() * e
    Gd = G.to(dtype)
    weights, status = OPS.hrgrad_weights(Gd, "projection")
    assert mm.hrgrad_weights_bytes(K, e, B=B) == tensor_bytes(Gd, weights, status)
    targets = torch.rand(B, 2, K, dtype=dtype)
    assert mm.dual_cone_weights_bytes(K, 2, e, B=B) == tensor_bytes(Gd, targets, OPS.dual_cone_weights(Gd, targets))
    assert mm.mgda_weights_bytes(K, e, B=B) == tensor_bytes(Gd, OPS.mgda_weights(Gd))
    J1 = J[0]
    assert mm.read_bytes(K, n, e) == tensor_bytes(J1, J1.sum(1))
    # hrgrad: gram (float64 G), the solve, combine (weights in float64, as hrgrad passes them)
    G1 = OPS.gram(J1, torch.float64)
    w1, s1 = OPS.hrgrad_weights(G1, "projection")
    upd = OPS.combine(J1, w1.to(dtype))
    assert mm.hrgrad_bytes(K, n, e) == tensor_bytes(J1, G1) + tensor_bytes(G1, w1, s1) + tensor_bytes(J1, w1.to(dtype), upd)
    assert mm.gram_fp64_fma(K, n, B) == B * n * K * (K + 1) // 2


def kinetic_calls(N, V, dtype, per_row):
    """(op, forward inputs, forward outputs, backward inputs, backward outputs) on the CPU."""
    r = lambda *s: torch.rand(*s, dtype=dtype) + 0.5  # noqa: E731
    v, w = torch.linspace(-3, 3, V, dtype=dtype), r(V)
    kn = r(N) if per_row else torch.tensor(0.1, dtype=dtype)
    F, Ft, Fx = r(N, V), r(N, V), r(N, V)
    rows = [r(N) for _ in range(6)]
    bgk = (F, Ft, Fx, *rows, v, w, kn)
    out = OPS.bgk_residuals(*bgk)
    bback = (r(N, V), r(N, 3), r(N, 3), Ft, Fx, *rows, v, w, kn)
    yield "bgk_residuals", bgk, out, bback, OPS.bgk_residuals_backward(*bback)
    tr = (F, Ft, Fx, rows[0], rows[1], v, w, kn)
    out = OPS.transport_mm_residuals(*tr)
    tback = (r(N, V), r(N, V), r(N), Ft, Fx, v, w, kn)
    yield "transport_mm_residuals", tr, out, tback, OPS.transport_mm_residuals_backward(*tback)
    mx = (rows[0], rows[1], rows[2], v)
    mback = (r(N, V), *mx)
    yield "maxwellian", mx, OPS.maxwellian(*mx), mback, OPS.maxwellian_backward(*mback)
    vm = (F, v, w)
    vback = (r(N, 3), v, w)
    yield "velocity_moments", vm, OPS.velocity_moments(*vm, 2), vback, OPS.velocity_moments_backward(*vback)
    sback = (r(N), r(N, 3), r(N, 3), *bgk)
    yield "bgk_residuals_sq", bgk, OPS.bgk_residuals_sq(*bgk), sback, OPS.bgk_residuals_sq_backward(*sback)
    tsback = (r(N), r(N), F, Ft, Fx, rows[1], v, w, kn)
    yield ("transport_mm_residuals_sq", tr, OPS.transport_mm_residuals_sq(*tr), tsback,
           OPS.transport_mm_residuals_sq_backward(*tsback))


@pytest.mark.parametrize("per_row", [True, False], ids=["kn-per-row", "kn-scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kinetic_counts_every_input_and_output_once(dtype, per_row):
    N, V = 11, 7
    e = torch.tensor([], dtype=dtype).element_size()
    names = set()
    for op, fin, fout, bin_, bout in kinetic_calls(N, V, dtype, per_row):
        names.add(op)
        fwd, bwd = mm.KINETIC_OPS[op]
        kw = {} if op in ("maxwellian", "velocity_moments") else {
            "kn_per_row" if op.startswith("bgk") else "eps_per_row": per_row}
        assert fwd(N, V, e, **kw) == tensor_bytes(*fin, fout), op
        assert bwd(N, V, e, **kw) == tensor_bytes(*bin_, bout), op
        step = mm.kinetic_bytes(op, N, V, e)
        assert step["step"] > step["forward_op"] + step["backward_op"]  # plus the loss's reads and writes
    assert names == set(mm.KINETIC_OPS)


def test_bandwidth_table_and_unknown_device():
    h200 = mm.bandwidth(name="NVIDIA H200")
    assert h200["bytes_per_s"] == 4.8e12 and h200["source"] == "table: H200"
    assert mm.bandwidth(name="NVIDIA GH200 480GB")["bytes_per_s"] == 4.0e12  # not H200's
    assert mm.bandwidth(name="NVIDIA H100 PCIe")["bytes_per_s"] == 2.0e12
    assert mm.bandwidth(name="NVIDIA H100 80GB HBM3")["bytes_per_s"] == 3.35e12
    for unknown in (mm.bandwidth(name="Some Future GPU"), mm.bandwidth(torch.device("cpu"))):
        assert unknown["bytes_per_s"] is None and unknown["source"].startswith(mm.UNKNOWN)
        assert mm.floor_figures(10**9, 2.0, unknown) == {"bytes": 10**9, "floor_ms": None, "GBps": 500.0,
                                                          "pct_of_floor": None}
    # 4.8 GB at 4.8 TB/s: 1 ms; measured 2 ms: 2400 GB/s, 50 % of the floor
    fig = mm.floor_figures(4_800_000_000, 2.0, h200)
    assert fig["floor_ms"] == pytest.approx(1.0) and fig["GBps"] == pytest.approx(2400.0)
    assert fig["pct_of_floor"] == pytest.approx(50.0)
    assert mm.floor_figures(100, None, h200)["floor_ms"] == pytest.approx(100 / 4.8e12 * 1e3)


def test_summary_shows_percent_of_floor_for_a_known_device_only():
    import summary

    bw = mm.bandwidth(name="NVIDIA H200")
    K, n = 8, 10**7
    gram_run = {"benchmark": "gram", "bandwidth": bw, "records": [{
        "K": K, "n": n, "ratios": {"hrgrad_vs_sum_rows": 2.5},
        "floor": {"sum_rows": mm.floor_figures(mm.read_bytes(K, n, 4), 0.08, bw),
                  "hrgrad": mm.floor_figures(mm.hrgrad_bytes(K, n, 4), 0.2, bw)}}]}
    table = summary.floor_table(gram_run)
    # 0.0667 / 0.08 ms: 83 %; 0.1417 / 0.2 ms: 71 %; 2.5x J.sum(1) misses the 1.3 target
    assert "| 8 | 1e+07 | 83 % | - | - | - | 71 % | 2.50 |" in table, table
    kin_run = {"benchmark": "kinetic", "bandwidth": bw, "cases": [{
        "op": "bgk_residuals", "N": 65536, "V": 64, "ratios": {"ext_vs_compiled": 0.4},
        "floor": {"ext": mm.floor_figures(mm.kinetic_bytes("bgk_residuals", 65536, 64, 4)["step"], 0.0888, bw)}}]}
    assert "| bgk | 65536 | 64 | - | - | 50 % | 0.40 ok |" in summary.floor_table(kin_run)
    assert summary.floor_table({**gram_run, "bandwidth": mm.bandwidth(name="cpu")}) == ""
