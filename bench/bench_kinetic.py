"""Benchmark of the fused kinetic residual ops against the same formulas in PyTorch.

For each op (bgk_residuals, transport_mm_residuals), N in {512, 8192, 65536} and V in {30, 64},
times one forward + backward of the APNN loss "sum of the mean squared residuals" with respect
to every network-output input (kn / eps are constants, as in training):

    eager     the formulas of issue 3 written in plain PyTorch
    compiled  the same function under torch.compile (compile time excluded)
    ext       hrgrad_ext.ops (fused forward and backward kernels), loss in eager PyTorch
    ext_compiled  the ext function under torch.compile (fuses the loss around the ops)

CUDA timings use CUDA events around each repeat after a warm-up; CPU timings use
time.perf_counter. The median over repeats is reported, in milliseconds.

    python bench/bench_kinetic.py --device cuda --out bench_kinetic_cuda.json
    python bench/bench_kinetic.py --device cpu --quick          # small sizes, few repeats
"""

from __future__ import annotations

import argparse
import json
import math
import platform

import torch
from timing import median_ms

import hrgrad_ext
from hrgrad_ext.ops import kinetic as K


# --- the formulas in plain PyTorch (what an APNN code base has today) ----------------------------


def bgk_eager(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn):
    rho2, u2, T2 = rho[:, None], u[:, None], T[:, None]
    M = rho2 / torch.sqrt(2 * math.pi * T2) * torch.exp(-((v - u2) ** 2) / (2 * T2))
    kinetic = kn[:, None] * (Ft + v * Fx) - (M - F)
    E = 0.5 * rho * (u**2 + T)
    E_t = 0.5 * rho_t * (u**2 + T) + 0.5 * rho * (2 * u * u_t + T_t)
    conservation = torch.stack(
        [
            rho_t + (w * v * Fx).sum(-1),
            rho_t * u + rho * u_t + (w * v**2 * Fx).sum(-1),
            E_t + 0.5 * (w * v**3 * Fx).sum(-1),
        ],
        -1,
    )
    consistency = torch.stack(
        [rho - (w * F).sum(-1), rho * u - (w * v * F).sum(-1), E - 0.5 * (w * v**2 * F).sum(-1)], -1
    )
    return kinetic, conservation, consistency


def transport_eager(G, Gt, Gx, rho_t, rho_x, v, w, eps):
    W = w.sum()

    def avg(phi):
        return (w * phi).sum(-1, keepdim=True) / W

    g, gt, gx = G - avg(G), Gt - avg(Gt), Gx - avg(Gx)
    e = eps[:, None]
    vgx = avg(v * gx)
    micro = e**2 * gt + e * (v * gx - vgx) + v * rho_x[:, None] + g
    macro = rho_t + vgx[:, 0]
    return g, micro, macro


def bgk_loss(impl):
    def loss(*args):
        kin, cons, consis = impl(*args)
        return kin.pow(2).mean() + cons.pow(2).mean() + consis.pow(2).mean()

    return loss


def transport_loss(impl):
    def loss(*args):
        _, micro, macro = impl(*args)
        return micro.pow(2).mean() + macro.pow(2).mean()

    return loss


# --- inputs --------------------------------------------------------------------------------------


def make_bgk(N, V, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*s, lo=-1.0, hi=1.0):
        return (lo + (hi - lo) * torch.rand(*s, generator=g)).to(dtype=dtype, device=device)

    v, w = K.gauss_legendre(V, -10.0, 10.0, dtype=dtype, device=device)
    args = [r(N, V, lo=0.0), r(N, V), r(N, V), r(N, lo=0.5, hi=1.5), r(N, lo=-0.5, hi=0.5), r(N, lo=0.5, hi=1.5),
            r(N), r(N), r(N), v, w, torch.full((N,), 1e-2, dtype=dtype, device=device)]
    for i in range(9):
        args[i].requires_grad_(True)
    return args, args[:9]


def make_transport(N, V, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(1)

    def r(*s):
        return (2 * torch.rand(*s, generator=g) - 1).to(dtype=dtype, device=device)

    v, w = K.gauss_legendre(V, dtype=dtype, device=device)
    args = [r(N, V), r(N, V), r(N, V), r(N), r(N), v, w, torch.full((N,), 1e-2, dtype=dtype, device=device)]
    for i in range(5):
        args[i].requires_grad_(True)
    return args, args[:5]


# --- timing --------------------------------------------------------------------------------------


def time_step(loss_fn, args, leaves, device, warmup, repeats):
    return median_ms(lambda: torch.autograd.grad(loss_fn(*args), leaves), device, warmup, repeats)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--sizes", default="512,8192,65536", help="comma-separated N values")
    p.add_argument("--velocities", default="30,64", help="comma-separated V values")
    p.add_argument("--repeats", type=int, default=None, help="default: 50 on CUDA, 7 on CPU")
    p.add_argument("--warmup", type=int, default=None, help="default: 10 on CUDA, 2 on CPU")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--quick", action="store_true", help="N in {512, 8192}, 3 repeats")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", default=None, help="write the JSON results to this file")
    a = p.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    sizes = [int(s) for s in a.sizes.split(",")]
    vels = [int(s) for s in a.velocities.split(",")]
    cuda = device.type == "cuda"
    repeats = a.repeats or (50 if cuda else 7)
    warmup = a.warmup or (10 if cuda else 2)
    if a.quick:
        sizes = [s for s in sizes if s <= 8192] or sizes[:1]
        repeats = min(repeats, 3)
        warmup = min(warmup, 1)

    variants = {
        "bgk_residuals": (make_bgk, bgk_loss(bgk_eager), bgk_loss(K.bgk_residuals)),
        "transport_mm_residuals": (make_transport, transport_loss(transport_eager),
                                   transport_loss(K.transport_mm_residuals)),
    }
    # One graph per (function, shape); the loss closures share a code object, so the default
    # recompile limit (8) would be hit.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    results = []
    for op, (make, eager_fn, ext_fn) in variants.items():
        fns = {"eager": eager_fn, "ext": ext_fn}
        if not a.no_compile:
            # dynamic=False: one graph per shape, the best case for the compiled baseline.
            fns["compiled"] = torch.compile(eager_fn, fullgraph=True, dynamic=False)
            fns["ext_compiled"] = torch.compile(ext_fn, fullgraph=True, dynamic=False)
        for V in vels:
            for N in sizes:
                args, leaves = make(N, V, dtype, device)
                case = {"op": op, "N": N, "V": V, "ms": {}}
                for name, fn in fns.items():
                    case["ms"][name] = time_step(fn, args, leaves, device, warmup, repeats)
                ms = case["ms"]
                case["speedup_vs_eager"] = ms["eager"] / ms["ext"]
                if "compiled" in ms:
                    case["speedup_vs_compiled"] = ms["compiled"] / ms["ext"]
                    case["speedup_ext_compiled_vs_compiled"] = ms["compiled"] / ms["ext_compiled"]
                results.append(case)
                line = "  ".join(f"{k} {v:8.3f}" for k, v in ms.items())
                print(f"{op:24s} N={N:6d} V={V:3d}  {line}  (ms; ext {case['speedup_vs_eager']:.2f}x eager)",
                      flush=True)

    report = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "torch_version": torch.__version__,
        "hrgrad_ext_build": hrgrad_ext.build_info(),
        "dtype": a.dtype,
        "repeats": repeats,
        "warmup": warmup,
        "metric": "median ms of one forward + backward of the sum of mean squared residuals",
        "cases": results,
    }
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
