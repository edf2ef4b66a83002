"""Benchmark of the fused kinetic ops against the same formulas in PyTorch.

For each op (bgk_residuals, transport_mm_residuals; also maxwellian and velocity_moments with
order 2), N in {8192, 65536} and V in {30, 64}, times
one forward + backward of the APNN loss "sum of the mean squared residuals" with respect to
every network-output input (kn / eps are constants, as in training), side by side in
interleaved rounds:

    eager          the formulas of issue 3 written in plain PyTorch
    compiled       the same function under torch.compile (compile time excluded)
    ext            hrgrad_ext.ops as the library's training losses call them: for bgk_residuals
                   and transport_mm_residuals their loss forms (bgk_residuals_sq,
                   transport_mm_residuals_sq: the [N, V] residual reduced to row sums of squares
                   inside the fused kernels, recomputed by the fused backward), else the op
    ext_residuals  (ops with a loss form) the residual op, loss in eager PyTorch around it
    ext_compiled   the ext function under torch.compile (the loss around the op compiled too)

The targets are ``ext / compiled <= 1.0`` (stretch 0.5) on the CPU (issue 10) and ``<= 0.5`` at
N = 65536, V = 64 on the GPU (issue 11). Also timed: the fused
forward and backward ops ``ext`` calls, alone, and the eager loss alone over the outputs of
the residual op (what ``ext_residuals`` adds around it; for the other ops, what ``ext`` adds).
Beside the fused ops' times and the ext step: bytes moved, the read-once floor at the device's
bandwidth, achieved GB/s and % of the floor (``floor``, bench/memory_model.py). CUDA timings use
CUDA events; CPU timings time.perf_counter. Medians (and minima) over the
rounds, in milliseconds. One command does a whole CPU run, every thread count in its own
process (torch.compile bakes the thread count into its kernels)::

    python bench/bench_kinetic.py --device cpu --threads 1 2 --out docs/bench/kinetic_cpu.json
    python bench/bench_kinetic.py --device cuda --out bench_kinetic.json
    python bench/bench_kinetic.py --device cpu --quick           # N = 512 and 8192, 3 rounds
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from memory_model import bandwidth, floor_figures, kinetic_bytes
from timing import compare, machine, per_thread_count

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


def maxwellian_eager(rho, u, T, v):
    rho2, u2, T2 = rho[:, None], u[:, None], T[:, None]
    return rho2 / torch.sqrt(2 * math.pi * T2) * torch.exp(-((v - u2) ** 2) / (2 * T2))


def moments_eager(F, v, w):
    return torch.stack([(w * F).sum(-1), (w * v * F).sum(-1), (w * v**2 * F).sum(-1)], -1)


def moments_ext(F, v, w):
    return K.velocity_moments(F, v, w, 2)


def bgk_sq_loss(impl):
    def loss(*args):
        kin_sq, cons, consis = impl(*args)
        return kin_sq.mean() / args[0].shape[1] + cons.pow(2).mean() + consis.pow(2).mean()

    return loss


def transport_sq_loss(impl):
    def loss(*args):
        micro_sq, macro = impl(*args)
        return micro_sq.mean() / args[0].shape[1] + macro.pow(2).mean()

    return loss


def single_loss(impl):
    def loss(*args):
        return impl(*args).pow(2).mean()

    return loss


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


def make_maxwellian(N, V, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(2)

    def r(*s, lo, hi):
        return (lo + (hi - lo) * torch.rand(*s, generator=g)).to(dtype=dtype, device=device)

    v, _ = K.gauss_legendre(V, -10.0, 10.0, dtype=dtype, device=device)
    args = [r(N, lo=0.5, hi=1.5), r(N, lo=-0.5, hi=0.5), r(N, lo=0.5, hi=1.5), v]
    for i in range(3):
        args[i].requires_grad_(True)
    return args, args[:3]


def make_moments(N, V, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(3)
    v, w = K.gauss_legendre(V, -10.0, 10.0, dtype=dtype, device=device)
    F = torch.rand(N, V, generator=g).to(dtype=dtype, device=device).requires_grad_(True)
    return [F, v, w], [F]


# The pieces of each op: inputs, eager formulas, the public op, its loss, and the fused forward
# and backward ops called directly (plain: the detached inputs; up: upstream gradients). sq: the
# loss form (its public op, loss, fused ops and name in bench/memory_model.py), which the ext
# step then uses.
OPS = {
    "bgk_residuals": dict(
        make=make_bgk, loss=bgk_loss, eager=bgk_eager, ext=K.bgk_residuals,
        fwd=lambda p: torch.ops.hrgrad_ext.bgk_residuals(*p),
        bwd=lambda up, p: torch.ops.hrgrad_ext.bgk_residuals_backward(*up, *p[1:]), used=(0, 1, 2),
        sq=dict(ext=K.bgk_residuals_sq, loss=bgk_sq_loss, model="bgk_residuals_sq",
                fwd=lambda p: torch.ops.hrgrad_ext.bgk_residuals_sq(*p),
                bwd=lambda up, p: torch.ops.hrgrad_ext.bgk_residuals_sq_backward(*up, *p))),
    "transport_mm_residuals": dict(
        make=make_transport, loss=transport_loss, eager=transport_eager, ext=K.transport_mm_residuals,
        fwd=lambda p: torch.ops.hrgrad_ext.transport_mm_residuals(*p),
        bwd=lambda up, p: torch.ops.hrgrad_ext.transport_mm_residuals_backward(*up, p[1], p[2], p[5], p[6], p[7]),
        used=(1, 2),
        sq=dict(ext=K.transport_mm_residuals_sq, loss=transport_sq_loss, model="transport_mm_residuals_sq",
                fwd=lambda p: torch.ops.hrgrad_ext.transport_mm_residuals_sq(*p),
                bwd=lambda up, p: torch.ops.hrgrad_ext.transport_mm_residuals_sq_backward(
                    *up, p[0], p[1], p[2], p[4], p[5], p[6], p[7]))),
    "maxwellian": dict(
        make=make_maxwellian, loss=single_loss, eager=maxwellian_eager, ext=K.maxwellian,
        fwd=lambda p: (torch.ops.hrgrad_ext.maxwellian(*p),),
        bwd=lambda up, p: torch.ops.hrgrad_ext.maxwellian_backward(up[0], *p), used=(0,)),
    "velocity_moments": dict(
        make=make_moments, loss=single_loss, eager=moments_eager, ext=moments_ext,
        fwd=lambda p: (torch.ops.hrgrad_ext.velocity_moments(*p, 2),),
        bwd=lambda up, p: torch.ops.hrgrad_ext.velocity_moments_backward(up[0], p[1], p[2]), used=(0,)),
}


# --- timing --------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--sizes", default="8192,65536", help="comma-separated N values")
    p.add_argument("--velocities", default="30,64", help="comma-separated V values")
    p.add_argument("--ops", default="bgk_residuals,transport_mm_residuals,maxwellian,velocity_moments",
                   help="comma-separated; the targets of issue 10 are on the first two")
    p.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=None,
                   help="interleaved rounds (default: 50 on CUDA, 15 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="default: 10 on CUDA, 3 on CPU")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--quick", action="store_true", help="N in {512, 8192}, 3 rounds")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="CPU thread counts; several: one process each, results under 'runs'")
    p.add_argument("--out", default=None, help="write the JSON results to this file")
    a = p.parse_args(argv)
    if a.threads and per_thread_count(__file__, argv, a.threads, a.out):
        return
    if a.threads:
        torch.set_num_threads(a.threads[0])
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    sizes = [int(s) for s in a.sizes.split(",")]
    vels = [int(s) for s in a.velocities.split(",")]
    cuda = device.type == "cuda"
    rounds = a.rounds or (50 if cuda else 15)
    warmup = a.warmup or (10 if cuda else 3)
    if a.quick:
        sizes, rounds, warmup = [512, 8192], min(rounds, 3), min(warmup, 1)

    # One graph per (function, shape); the loss closures share a code object, so the default
    # recompile limit (8) would be hit.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    info = machine(device)
    bw = bandwidth(device)
    results = []
    for op in a.ops.split(","):
        spec = OPS[op]
        make = spec["make"]
        eager_fn, ext_fn = spec["loss"](spec["eager"]), spec["loss"](spec["ext"])
        sq = spec.get("sq")
        fns = {"eager": eager_fn, "ext": ext_fn}
        if sq:
            fns = {"eager": eager_fn, "ext": sq["loss"](sq["ext"]), "ext_residuals": ext_fn}
        fused = sq or spec  # the fused ops the ext step calls
        if not a.no_compile:
            # dynamic=False: one graph per shape, the best case for the compiled baseline.
            fns["compiled"] = torch.compile(eager_fn, fullgraph=True, dynamic=False)
            fns["ext_compiled"] = torch.compile(fns["ext"], fullgraph=True, dynamic=False)
        for V in vels:
            for N in sizes:
                args, leaves = make(N, V, dtype, device)
                steps = {k: (lambda f=f: torch.autograd.grad(f(*args), leaves)) for k, f in fns.items()}
                # the pieces of ext: the fused forward op, the fused backward op, the eager loss
                plain = [x.detach() for x in args]
                outs = spec["fwd"](plain)
                upstream = [torch.randn_like(o) for o in fused["fwd"](plain)]
                residuals = [o.clone().requires_grad_(True) for o in outs]

                def loss_alone(residuals=residuals, used=spec["used"]):
                    L = sum(residuals[i].pow(2).mean() for i in used)
                    return torch.autograd.grad(L, [residuals[i] for i in used])

                steps["ext_forward_op"] = lambda fused=fused, plain=plain: fused["fwd"](plain)
                steps["ext_backward_op"] = lambda fused=fused, up=upstream, plain=plain: fused["bwd"](up, plain)
                steps["eager_loss_alone"] = loss_alone
                # eager PyTorch (dozens of large temporaries) on its own, so that it does not
                # flush the caches between the calls of the others
                eager_step = {"eager": steps.pop("eager")}
                res = compare(steps, device, warmup, rounds)
                res.update(compare(eager_step, device, 1, max(3, rounds // 3)))
                ms = {k: v.get("median_ms") for k, v in res.items()}
                case = {"op": op, "N": N, "V": V, "ms": ms, "min_ms": {k: v.get("min_ms") for k, v in res.items()}}
                ratios = {"ext_vs_eager": ms["ext"] / ms["eager"]}
                if ms.get("ext_residuals"):
                    ratios["ext_vs_ext_residuals"] = ms["ext"] / ms["ext_residuals"]
                if "compiled" in ms and ms["compiled"]:
                    ratios["ext_vs_compiled"] = ms["ext"] / ms["compiled"]
                    ratios["ext_vs_compiled_min"] = case["min_ms"]["ext"] / case["min_ms"]["compiled"]
                    if ms.get("ext_compiled"):
                        ratios["ext_compiled_vs_compiled"] = ms["ext_compiled"] / ms["compiled"]
                case["ratios"] = ratios
                # beside the fused ops' times and the whole ext step: the bytes they must move,
                # the read-once floor at the device's bandwidth, achieved GB/s, % of the floor
                moved = kinetic_bytes(sq["model"] if sq else op, N, V, torch.tensor([], dtype=dtype).element_size())
                case["bytes_fused_ops"] = moved["forward_op"] + moved["backward_op"]
                case["floor"] = {"ext_forward_op": floor_figures(moved["forward_op"], ms.get("ext_forward_op"), bw),
                                 "ext_backward_op": floor_figures(moved["backward_op"], ms.get("ext_backward_op"), bw),
                                 "ext": floor_figures(moved["step"], ms.get("ext"), bw)}
                results.append(case)
                line = "  ".join(f"{k} {v:8.3f}" if v else f"{k} failed" for k, v in ms.items())
                print(f"{op:24s} N={N:6d} V={V:3d}  {line}  (ms; ext/compiled "
                      f"{ratios.get('ext_vs_compiled', float('nan')):.2f}"
                      + "".join(f"; {k} {case['floor'][k].get('pct_of_floor') or 0:.0f}% of floor"
                                for k in ("ext_forward_op", "ext_backward_op") if bw["bytes_per_s"])
                      + ")", file=sys.stderr, flush=True)

    report = {
        "benchmark": "kinetic",
        "machine": info,
        "device": info["device"] if cuda else info["cpu_model"],
        "threads": torch.get_num_threads(),
        "hrgrad_ext_build": hrgrad_ext.build_info(),
        "dtype": a.dtype,
        "rounds": rounds,
        "warmup": warmup,
        "metric": "ms of one forward + backward of the sum of mean squared residuals: median (and min) over "
                  "interleaved rounds; ratios of medians. ext: the loss forms (*_sq ops) where an op has one; "
                  "ext_forward_op / ext_backward_op: the fused ops the ext step calls",
        "bandwidth": bw,
        "cases": results,
    }
    text = json.dumps(report, indent=2)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
        print(f"wrote {a.out}", file=sys.stderr)
    else:
        print(text)


if __name__ == "__main__":
    main()
