"""``hrgrad-ext reference bgk|transport ...``: compute, save (npz) and plot a reference solution.

The lead's console script wires it in with::

    sub = parser.add_subparsers(dest="command")
    reference_cli.add_parser(sub)          # adds "reference" with func=reference_cli.main
    args = parser.parse_args(); args.func(args)

It also runs standalone: ``python -m hrgrad_ext.reference.cli bgk --case IV ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["add_parser", "build_parser", "main"]

_DESCRIPTION = ("Compute a reference solution (BGK case or linear transport), save it as .npz "
                "and optionally plot it.  Results are cached on disk ($HRGRAD_EXT_CACHE or "
                "~/.cache/hrgrad_ext).")


def _float_list(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or comma-separated numbers, got {text!r}") from None


def _configure(ref: argparse.ArgumentParser) -> None:
    kinds = ref.add_subparsers(dest="kind", metavar="{bgk,transport}")
    kinds.required = True

    bgk = kinds.add_parser("bgk", help="BGK equation, spec cases I-V")
    bgk.add_argument("--case", default="IV", help="I, II, III, IV or V (default IV)")
    bgk.add_argument("--kn", type=float, default=None, help="Knudsen number (default: the case's)")
    bgk.add_argument("--t-final", type=_float_list, default=None,
                     help="final time or comma-separated times (default: the case's)")
    bgk.add_argument("--nx", type=int, default=None, help="cells in x (default 1500)")
    bgk.add_argument("--nv", type=int, default=None,
                     help="Gauss-Legendre velocities (default 80, 120 for case V)")
    bgk.add_argument("--dt", type=float, default=None, help="time step (default CFL 0.5)")
    bgk.add_argument("--bc", default="neumann", choices=("neumann", "dirichlet", "periodic"))

    tr = kinds.add_parser("transport", help="linear transport in diffusive scaling")
    tr.add_argument("--eps", type=float, required=True, help="Knudsen number eps (>= 1e-6)")
    tr.add_argument("--t-final", type=_float_list, default=[0.1],
                    help="final time or comma-separated times (default 0.1)")
    tr.add_argument("--nx", type=int, default=None, help="cells in x (default 300)")
    tr.add_argument("--nv", type=int, default=None, help="ordinates, even (default 32)")
    tr.add_argument("--dt", type=float, default=None, help="uniform time step (default graded)")

    for p in (bgk, tr):
        p.add_argument("--out", required=True, help="output .npz file")
        p.add_argument("--plot", default=None, help="also write a plot (e.g. FILE.png)")
        p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    ref.set_defaults(func=main)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``reference`` subcommand to an ``argparse`` subparsers object; returns it."""
    ref = subparsers.add_parser("reference", help="compute, save and plot a reference solution",
                                description=_DESCRIPTION)
    _configure(ref)
    return ref


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser equivalent to ``hrgrad-ext reference``."""
    ref = argparse.ArgumentParser(prog="hrgrad-ext reference",
                                  description=_DESCRIPTION)
    _configure(ref)
    return ref


def _times(values):
    if values is None:
        return None
    return values[0] if len(values) == 1 else values


def _solve(args):
    from . import bgk, transport
    opts = {k: getattr(args, k) for k in ("nx", "nv", "dt") if getattr(args, k) is not None}
    if args.kind == "bgk":
        return bgk.solve_bgk(args.case, args.kn, _times(args.t_final), bc=args.bc,
                             cache=not args.no_cache, **opts)
    return transport.solve_transport(args.eps, _times(args.t_final), cache=not args.no_cache,
                                     **opts)


def _plot(result, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")          # headless: never needs a display
    import matplotlib.pyplot as plt
    import numpy as np

    times = np.atleast_1d(result.t)
    if hasattr(result, "density"):
        fields = [("density", result.density), ("velocity u", result.velocity),
                  ("temperature T", result.temperature)]
        title = f"BGK case {result.case}, Kn = {result.kn:g} ({result.nx} cells, {result.nv} v)"
    else:
        fields = [("rho", result.rho)]
        title = f"linear transport, eps = {result.eps:g} ({result.nx} cells, {result.method})"
    fig, axes = plt.subplots(1, len(fields), figsize=(4.2 * len(fields), 3.4), squeeze=False)
    for ax, (name, val) in zip(axes[0], fields):
        val = np.atleast_2d(val)
        for t, row in zip(times, val):
            ax.plot(result.x, row, label=f"t = {t:g}")
        ax.set_xlabel("x")
        ax.set_title(name)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: Optional[argparse.Namespace | Sequence[str]] = None) -> int:
    """Run the subcommand: ``args`` is a parsed namespace, or an argv list (default sys.argv)."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(sys.argv[1:] if args is None else list(args))
    try:
        result = _solve(args)
    except ValueError as exc:
        print(f"hrgrad-ext reference: error: {exc}", file=sys.stderr)
        return 2
    out = result.save(args.out)
    print(f"wrote {out}")
    if args.plot:
        _plot(result, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
