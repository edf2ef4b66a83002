"""The gram / hrgrad_weights / combine ops against float64 PyTorch references.

Tolerances: float64 kernels agree with the references to 1e-12 relative; float32 inputs
to 1e-5 (gram with a float32 result: float32 lanes summing 32 products, then float64, on CPU;
float32 + float64 partials on CUDA; with a float64 result: float64 accumulation on CPU).
The CPU kernels are compiled for AVX-512, AVX2 and SSE2; ``HRGRAD_EXT_CPU_ISA`` selects one,
and the tests marked with the ``isa`` fixture run each.
"""

import pytest
import torch
from reference_impls import combine_ref, gram_ref, hrgrad_pinv_ref

import hrgrad_ext
from hrgrad_ext import ops
from hrgrad_ext.ops import LENGTH_MODELS, Status

OPS = torch.ops.hrgrad_ext
U32 = 2.0**-24


@pytest.fixture(params=["avx512", "avx2", "sse2"])
def isa(request, monkeypatch):
    # A cap: on a CPU without AVX-512 "avx512" runs the best path it has.
    monkeypatch.setenv("HRGRAD_EXT_CPU_ISA", request.param)
    return request.param


# ---------------------------------------------------------------- gram
@pytest.mark.parametrize("K,n", [(1, 1), (2, 7), (3, 1000), (8, 1531), (17, 300), (40, 513), (64, 2048), (70, 50)])
def test_gram_matches_reference(K, n):
    J = torch.randn(K, n, dtype=torch.float64)
    torch.testing.assert_close(ops.gram(J), gram_ref(J), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K,n", [(1, 5), (5, 1531), (13, 4099), (70, 600)])
def test_gram_every_isa_and_tile_shape(isa, K, n):
    # K not a multiple of the register tile (4 or 3) and n not a multiple of the chunk: the
    # edge tiles and the zero-padded last chunk of every instruction set.
    J = torch.randn(2, K, n, dtype=torch.float64)
    torch.testing.assert_close(ops.gram(J), gram_ref(J), rtol=1e-12, atol=1e-12)
    J32 = J.float()
    exact = gram_ref(J32)
    torch.testing.assert_close(ops.gram(J32, dtype=torch.float64), exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops.gram(J32).double(), exact, rtol=4 * U32, atol=4 * U32 * exact.abs().max().item())


def test_gram_float32_accuracy_does_not_grow_with_n(isa):
    # 2^20 positive columns: float32 accumulation along n (what J @ J.T does) is off by
    # hundreds of u32; float32 lanes of 32 products summed in float64 stay at the rounding of
    # the result (< 1 u32 relative to sum |J_i J_k|; the guaranteed bound is 33 u32).
    gen = torch.Generator().manual_seed(3)
    J = torch.rand(3, 1 << 20, generator=gen)
    exact = gram_ref(J)
    scale = J.double().abs() @ J.double().abs().T
    err = (ops.gram(J).double() - exact).abs() / scale
    assert err.max() < 2 * U32
    naive = ((J @ J.T).double() - exact).abs() / scale  # the yardstick: this test can fail
    assert naive.max() > 20 * U32
    err64 = (ops.gram(J, dtype=torch.float64) - exact).abs() / scale
    assert err64.max() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gram_low_precision_accumulates_in_float(dtype):
    J = torch.randn(4, 5000).to(dtype)
    G = ops.gram(J)
    assert G.dtype == torch.float32
    torch.testing.assert_close(G, gram_ref(J).float(), rtol=1e-5, atol=1e-3)
    assert ops.gram(J, dtype=torch.float64).dtype == torch.float64


def test_gram_batched_and_noncontiguous():
    J = torch.randn(3, 5, 200, dtype=torch.float64)
    torch.testing.assert_close(ops.gram(J), gram_ref(J), rtol=1e-12, atol=1e-12)
    Jt = torch.randn(200, 5, dtype=torch.float64).T  # non-contiguous view
    assert not Jt.is_contiguous()
    torch.testing.assert_close(ops.gram(Jt), gram_ref(Jt), rtol=1e-12, atol=1e-12)


def test_gram_gradcheck():
    J = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.gram(x), (J,))
    Jb = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.gram(x), (Jb,))


# ---------------------------------------------------------------- combine
def test_combine_matches_reference_and_gradcheck():
    J = torch.randn(2, 5, 333, dtype=torch.float64)
    w = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(ops.combine(J, w), combine_ref(J, w), rtol=1e-12, atol=1e-12)
    Jg = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    wg = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.combine, (Jg, wg))


@pytest.mark.parametrize("K,n", [(1, 3), (7, 5000), (9, 8200), (20, 33)])
def test_combine_every_isa(isa, K, n):
    # K not a multiple of the row group (8), n not a multiple of the vector or the chunk
    J = torch.randn(3, K, n, dtype=torch.float64)
    w = torch.randn(3, K, dtype=torch.float64)
    torch.testing.assert_close(ops.combine(J, w), combine_ref(J, w), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops.combine(J.float(), w).double(), combine_ref(J.float(), w), rtol=1e-5, atol=1e-5)
    out = torch.randn(n, dtype=torch.float64)
    expected = out + combine_ref(J[0], w[0])
    OPS.combine_accumulate_(out, J[0], w[0])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B,n", [(1, (17 << 20) // 4 + 3), (3, 1_400_003)])
def test_combine_large_result(isa, B, n):
    # Results above 16 MiB (float32 input, float64 reference); odd n: a partial last vector and,
    # for B = 3, batch rows that start unaligned.
    gen = torch.Generator().manual_seed(B)
    J = torch.randn(B, 3, n, generator=gen)
    w = torch.randn(B, 3, generator=gen)
    want = (w.double().unsqueeze(-1) * J.double()).sum(-2)
    torch.testing.assert_close(ops.combine(J, w).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_combine_low_precision(dtype):
    J = torch.randn(6, 1000).to(dtype)
    w = torch.randn(6)
    out = ops.combine(J, w)
    assert out.dtype == dtype
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(out.double(), combine_ref(J, w), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(device, dtype):
    # The tolerances above (bf16: rtol 2e-2, atol 0.2) would also pass an accumulation in the
    # input dtype. Here it would be off by far more. Every term is exact in both dtypes:
    # combine: 2048 * 1 + 1 * 1 - 2048 * 1 = 1 (float32: exact; in fp16 / bf16 2048 + 1 rounds
    # back to 2048, and the sum is 0); gram: 4096 ones per row, G = 4096 (a half-precision
    # running sum stops growing at 2048 (fp16) or 256 (bf16), where adding 1 rounds away).
    J = torch.ones(3, 1000, dtype=dtype, device=device)
    w = torch.tensor([2048.0, 1.0, -2048.0], device=device)
    assert torch.equal(ops.combine(J, w), torch.ones(1000, dtype=dtype, device=device))
    out = torch.zeros(1000, dtype=dtype, device=device)
    OPS.combine_accumulate_(out, J, w)
    assert torch.equal(out, torch.ones(1000, dtype=dtype, device=device))
    G = ops.gram(torch.ones(2, 4096, dtype=dtype, device=device))
    assert torch.equal(G, torch.full((2, 2), 4096.0, device=device))


def test_combine_into_grads_and_gram_of_list_equal_concatenated_path():
    params = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True), torch.randn(2, 2, 2, requires_grad=True)]
    jac = [torch.randn(4, *p.shape) for p in params]
    J = torch.cat([j.reshape(4, -1) for j in jac], 1)
    torch.testing.assert_close(ops.gram_of_list(jac), gram_ref(J), rtol=1e-12, atol=1e-10)
    w = torch.randn(4, dtype=torch.float64)
    params[0].grad = torch.ones_like(params[0])  # accumulates like .backward()
    ops.combine_into_grads(jac, w, params)
    expected = combine_ref(J, w).float()
    got = torch.cat([p.grad.reshape(-1) for p in params])
    expected[:12] += 1.0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- hrgrad weights / update
def test_published_value():
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    out = hrgrad_ext.hrgrad(J)
    torch.testing.assert_close(out, torch.tensor([0.1588, 2.0706, 2.0706]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("length_model", LENGTH_MODELS)
@pytest.mark.parametrize("K,n", [(2, 10), (5, 50), (8, 1000), (16, 200)])
def test_gram_path_equals_pinv_reference(K, n, length_model):
    J = torch.randn(K, n, dtype=torch.float64) * torch.logspace(0, 2, K, dtype=torch.float64)[:, None]
    got = hrgrad_ext.hrgrad(J, length_model=length_model)
    torch.testing.assert_close(got, hrgrad_pinv_ref(J, length_model), rtol=1e-9, atol=1e-9)


def test_float32_against_float64():
    J = torch.randn(8, 4000, dtype=torch.float64)
    torch.testing.assert_close(hrgrad_ext.hrgrad(J.float()).double(), hrgrad_ext.hrgrad(J), rtol=1e-4, atol=1e-4)


def test_batched_weights_equal_per_entry():
    J = torch.randn(4, 6, 100, dtype=torch.float64)
    out, w, status = hrgrad_ext.hrgrad_ex(J)
    assert w.shape == (4, 6) and status.shape == (4,) and status.dtype == torch.int32
    for b in range(4):
        torch.testing.assert_close(out[b], hrgrad_ext.hrgrad(J[b]), rtol=1e-12, atol=1e-12)


def test_status_flags():
    zero_row = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    _, w, status = hrgrad_ext.hrgrad_ex(zero_row)
    assert int(status) == Status.ZERO_TASKS and w[1] == 0
    # K > n: three directions in the plane, 1 is not in the range of C -> conflict -> fallback
    J = torch.tensor([[1.0, 0.0], [-0.9, 0.2], [0.0, 1.0]], dtype=torch.float64)
    update, _, status = hrgrad_ext.hrgrad_ex(J)
    assert int(status) & Status.RANK_DEFICIENT
    assert (J @ update >= -1e-12).all()
    opposite = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    update, _, status = hrgrad_ext.hrgrad_ex(opposite)
    assert int(status) & Status.ZERO_UPDATE and torch.all(update == 0)
    nan = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    _, w, status = hrgrad_ext.hrgrad_ex(nan)
    assert int(status) & Status.NON_FINITE and torch.isnan(w).all()


def test_rcond_controls_rank_deficiency():
    # two nearly identical tasks: with a generous rcond the pair is treated as one direction
    J = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1e-4, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    _, _, st_default = hrgrad_ext.hrgrad_ex(J)
    _, _, st_loose = hrgrad_ext.hrgrad_ex(J, rcond=1e-6)
    assert not int(st_default) & Status.RANK_DEFICIENT
    assert int(st_loose) & Status.RANK_DEFICIENT


# ---------------------------------------------------------------- opcheck / compile
def _opcheck_cases():
    J = torch.randn(3, 40)
    Jb = torch.randn(2, 3, 40, dtype=torch.float64)
    G = ops.gram(J)
    return [
        (OPS.gram.default, (J,), {}),
        (OPS.gram.default, (Jb,), {"dtype": torch.float32}),
        (OPS.gram.default, (J.clone().requires_grad_(),), {}),
        (OPS.hrgrad_weights.default, (G,), {}),
        (OPS.hrgrad_weights.default, (ops.gram(Jb),), {"length_model": "harmonic", "rcond": 1e-8}),
        (OPS.hrgrad_weights.default, (ops.gram(Jb).requires_grad_(),), {"length_model": "min"}),
        (OPS.combine.default, (J, torch.randn(3)), {}),
        (OPS.combine.default, (Jb.clone().requires_grad_(), torch.randn(2, 3, dtype=torch.float64, requires_grad=True)), {}),
        (OPS.combine_accumulate_.default, (torch.zeros(40), J, torch.randn(3)), {}),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args, kwargs = _opcheck_cases()[case]
    torch.library.opcheck(op, args, kwargs)


def test_compiles_fullgraph():
    def step(J):
        return hrgrad_ext.hrgrad(J, length_model="projection")

    J = torch.randn(4, 300)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(J), step(J))


@pytest.mark.inductor
def test_compiles_fullgraph_with_inductor():
    # the default backend, with surrounding pointwise code that inductor generates itself
    def step(J, lr):
        return -lr * hrgrad_ext.hrgrad(J * 2.0)

    J = torch.randn(3, 257)
    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(J, 0.1), step(J, 0.1))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "J,exc,match",
    [
        (torch.randn(5), ValueError, r"\[K, n\]"),
        (torch.randn(2, 2, 2, 2), ValueError, r"\[K, n\]"),
        (torch.randn(0, 5), ValueError, "K = 0"),
        (torch.randn(3, 0), ValueError, "n = 0"),
        (torch.ones(3, 4, dtype=torch.int64), TypeError, "float"),
        ([[1.0, 2.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_jacobian(J, exc, match):
    with pytest.raises(exc, match=match):
        ops.gram(J)
    with pytest.raises(exc, match=match):
        hrgrad_ext.hrgrad(J)


def test_bad_inputs_direct_op_calls_raise_runtime_errors():
    # users calling torch.ops directly get the C++ checks, not a crash
    with pytest.raises(RuntimeError, match="K = 0"):
        OPS.gram(torch.randn(0, 4))
    with pytest.raises(RuntimeError, match="square"):
        OPS.hrgrad_weights(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="length_model"):
        OPS.hrgrad_weights(torch.eye(3), "bogus")
    with pytest.raises(RuntimeError, match="does not match"):
        OPS.combine(torch.randn(3, 4), torch.randn(2))


def test_bad_weights_and_gram_inputs():
    J = torch.randn(3, 4)
    with pytest.raises(ValueError, match="shape"):
        ops.combine(J, torch.randn(4))
    with pytest.raises(ValueError, match="meta"):
        ops.combine(J, torch.randn(3, device="meta"))
    with pytest.raises(ValueError, match="length_model"):
        ops.hrgrad_weights(torch.eye(3), "bogus")
    with pytest.raises(ValueError, match="rcond"):
        ops.hrgrad_weights(torch.eye(3), rcond=2.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.hrgrad_weights(torch.eye(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="square"):
        ops.hrgrad_weights(torch.randn(3, 4))
    with pytest.raises(ValueError, match="dtype"):
        ops.gram(J, dtype=torch.float16)


def test_nan_raises_in_aggregator():
    J = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    with pytest.raises(ValueError, match="NaN"):
        hrgrad_ext.HRGrad()(J)


# ---------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("K", [1, 2, 3, 4, 7, 8, 9, 16, 17, 32, 33, 64, 65])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_gram_matches_cpu(K, dtype):
    J = torch.randn(K, 12345, dtype=torch.float64).to(dtype)
    G_cpu = ops.gram(J, dtype=torch.float64)
    G_cuda = ops.gram(J.cuda(), dtype=torch.float64).cpu()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(G_cuda, G_cpu, rtol=tol, atol=tol * 12345)


@pytest.mark.cuda
def test_cuda_batched_hrgrad_matches_cpu():
    J = torch.randn(3, 8, 100_003)
    out_cpu, w_cpu, st_cpu = hrgrad_ext.hrgrad_ex(J)
    out_gpu, w_gpu, st_gpu = hrgrad_ext.hrgrad_ex(J.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=1e-6, atol=1e-8)
    assert torch.equal(st_gpu.cpu(), st_cpu)


@pytest.mark.cuda
def test_cuda_weights_flags_match_cpu():
    cases = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
            [[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
            [[2.0, 1.0, 0.5], [1.0, 3.0, -0.2], [0.5, -0.2, 1.0]],
        ],
        dtype=torch.float64,
    )
    for lm in LENGTH_MODELS:
        w_cpu, s_cpu = ops.hrgrad_weights_ex(cases, lm)
        w_gpu, s_gpu = ops.hrgrad_weights_ex(cases.cuda(), lm)
        torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=1e-12, atol=1e-12)
        assert torch.equal(s_gpu.cpu(), s_cpu)


@pytest.mark.cuda
def test_cuda_combine_accumulate_and_opcheck():
    J = torch.randn(5, 77777, device="cuda")
    w = torch.randn(5, device="cuda")
    out = torch.ones(77777, device="cuda")
    OPS.combine_accumulate_(out, J, w)
    torch.testing.assert_close(out.cpu().double(), combine_ref(J.cpu(), w.cpu()) + 1, rtol=1e-5, atol=1e-4)
    for op, args, kwargs in _opcheck_cases():
        moved = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, moved, kwargs)


@pytest.mark.cuda
def test_cuda_large_n_and_device_mismatch():
    J = torch.randn(8, 20_000_000, device="cuda")
    G = ops.gram(J, dtype=torch.float64)
    torch.testing.assert_close(G, gram_ref(J), rtol=1e-5, atol=1e-2)
    with pytest.raises(ValueError, match="cuda"):
        ops.combine(J, torch.randn(8))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_empty_batch(device):
    J = torch.randn(0, 3, 10, device=device)
    assert ops.gram(J).shape == (0, 3, 3)
    w, status = ops.hrgrad_weights_ex(torch.zeros(0, 3, 3, device=device))
    assert w.shape == (0, 3) and status.shape == (0,)
    assert ops.combine(J, torch.zeros(0, 3, device=device)).shape == (0, 10)
