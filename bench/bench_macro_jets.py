"""The BGK macro networks' input derivatives: Taylor mode (``hrgrad_ext.nn.jets``) against
torch.func forward mode, as the segmented training step takes them.

Times forward + backward (the parameter gradients of the sum of every output) of, per task, K
per-task parameter copies vmapped as in :mod:`hrgrad_ext.train.segmented`:

* ``macro``: ``(rho, u, T)`` and their t and x derivatives at ``--points`` points per task:
  ``torch.func`` = ``value_and_derivatives(macro, "jvp")`` (one jvp vmapped over the two
  directions, what the fast path used before), ``jets`` = ``BGKAPNN.macro_derivatives``;
* ``macro_ce``: the same and the Chapman-Enskog term ``[n, V]`` with its t and x derivatives
  (which hold (log T)_xt and (log T)_xx): ``torch.func`` = the macro jvp above plus the term
  by forward mode over the two directions of a term that takes (log T)_x by an inner jvp (the
  fast path before), ``jets`` = ``BGKAPNN.macro_and_chapman_enskog_derivatives`` (one pass).

The model is the long BGK preset's (``--macro-width`` 64: the Chapman-Enskog runs of
docs/RESULTS.md). Every function is checked against the other before timing (float64 run,
1e-10). ``--threads 1 2`` runs each count in a fresh process.

    python bench/bench_macro_jets.py --threads 1 2 --out docs/bench/macro_jets_cpu.json
"""

from __future__ import annotations

import argparse
import sys

import torch
from timing import compare, environment, per_thread_count, write_json

from hrgrad_ext.train.config import apply_overrides, default_config
from hrgrad_ext.train.losses import value_and_derivatives
from hrgrad_ext.train.trainer import Trainer


def build(args, dtype):
    cfg = apply_overrides(default_config("bgk", "long"),
                          [f"model.macro.width={args.macro_width}", "model.chapman_enskog=0.03", f"dtype={dtype}",
                           f"threads={torch.get_num_threads()}",  # the Trainer sets the thread count
                           "log.progress=false", "log.plots=false", "out=/tmp/hrgrad_bench_unused"])
    tr = Trainer(cfg)
    model, K, n = tr.model, len(cfg.eps), args.points
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    t = (0.1 * torch.rand(K, n, generator=gen, dtype=torch.float64)).to(dt)
    x = (torch.rand(K, n, generator=gen, dtype=torch.float64) - 0.5).to(dt)
    eps = torch.tensor(cfg.eps, dtype=dt)
    v = tr.form.v.to(dt)
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach().unsqueeze(0).expand(K, *p.shape).clone().requires_grad_(True) for _, p in model.named_parameters()]
    return model, names, params, t, x, eps, v


def per_task(model, names, params, fn, *inputs):
    """``fn(call, *inputs)`` for every task, the task's parameter copy in ``call``."""
    def one(p, *inp):
        call = lambda method, *a: torch.func.functional_call(model, dict(zip(names, p)), (method, *a))
        return fn(call, *inp)
    return torch.func.vmap(one)(params, *inputs)


def macro_by_torch_func(call, t, x, eps):
    return value_and_derivatives(lambda t, x: call("macro", t, x, eps), (t, x), (0, 1), "jvp")


def macro_by_jets(call, t, x, eps):
    (rho, u, T), (dt, dx) = call("macro_derivatives", t, x, eps)
    return (rho, u, T), [dt, dx]


def macro_ce_by_torch_func(model, v):
    def term(call, t, x, eps):
        # the term with (log T)_x by an inner jvp through the macro networks
        x = x.clone()
        (_, u, T), (_, _, T_x) = torch.func.jvp(lambda xx: call("macro", t, xx, eps), (x,), (torch.ones_like(x),))
        return model._chapman_enskog_parts(u[:, None], torch.log(T)[:, None], (T_x / T)[:, None], v, eps)[0]

    def fn(call, t, x, eps):
        macro = macro_by_torch_func(call, t, x, eps)
        C, (Ct, Cx) = value_and_derivatives(lambda t, x: term(call, t, x, eps), (t, x), (0, 1), "jvp")
        return macro, (C, (Ct, Cx))
    return fn


def macro_ce_by_jets(v):
    def fn(call, t, x, eps):
        (m, (dt, dx)), ce = call("macro_and_chapman_enskog_derivatives", t, x, v, eps)
        return (m, [dt, dx]), ce
    return fn


def forward_backward(model, names, params, fn, *inputs):
    def run():
        out = per_task(model, names, params, fn, *inputs)
        total = sum(a.sum() for a in torch.utils._pytree.tree_leaves(out))
        return torch.autograd.grad(total, params, allow_unused=True)
    return run


def cases(model, v):
    return {
        "macro": {"torch.func": macro_by_torch_func, "jets": macro_by_jets},
        "macro_ce": {"torch.func": macro_ce_by_torch_func(model, v), "jets": macro_ce_by_jets(v)},
    }


def check(args):
    """The two ways give the same numbers (float64) before anything is timed."""
    model, names, params, t, x, eps, v = build(args, "float64")
    for case, fns in cases(model, v).items():
        a, b = (torch.utils._pytree.tree_leaves(per_task(model, names, params, fn, t, x, eps)) for fn in fns.values())
        assert len(a) == len(b), case
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=64, help="points per task (the long preset's interior: 64)")
    ap.add_argument("--macro-width", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="*", default=[])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads and per_thread_count(__file__, argv, args.threads, args.out):
        return
    if args.threads:
        torch.set_num_threads(args.threads[0])
    check(args)
    model, names, params, t, x, eps, v = build(args, "float32")
    device = torch.device("cpu")
    records = []
    for case, fns in cases(model, v).items():
        timed = compare({k: forward_backward(model, names, params, fn, t, x, eps) for k, fn in fns.items()},
                        device, args.warmup, args.rounds)
        ratio = timed["torch.func"]["median_ms"] / timed["jets"]["median_ms"]
        records.append({"case": case, "tasks": len(eps), "points": args.points, "times": timed,
                        "torch_func_over_jets": ratio})
        print(f"{case:10s} torch.func {timed['torch.func']['median_ms']:8.2f} ms   jets "
              f"{timed['jets']['median_ms']:8.2f} ms   ratio {ratio:5.2f}", file=sys.stderr)
    write_json({**environment(device), "threads": torch.get_num_threads(), "dtype": "float32",
                "macro_width": args.macro_width, "records": records}, args.out)


if __name__ == "__main__":
    main()
