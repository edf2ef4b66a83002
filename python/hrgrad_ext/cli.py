"""The ``hrgrad-ext`` command: ``train``, ``compare``, ``demo`` and ``reference``.

    hrgrad-ext train --problem transport --method hrgrad --iters 3000 --out runs/t
    hrgrad-ext train --config my.toml --set optim.lr=5e-4 --set model.g.width=64
    hrgrad-ext train --resume runs/t                 # continue an interrupted run
    hrgrad-ext train --nproc 4 --out runs/t4         # 4 processes (torchrun's launcher), see below
    torchrun --nproc-per-node 4 -m hrgrad_ext.cli train --out runs/t4   # the same under torchrun
    hrgrad-ext compare --problem transport --methods hrgrad,sum,pcgrad,config --out runs/cmp
    hrgrad-ext compare --problem bgk --methods all --seeds 0,1,2 --jobs 2 --threads 1 --out runs/study
    hrgrad-ext demo                                  # aggregators on conflicting gradients
    hrgrad-ext reference ...                         # reference solutions (hrgrad_ext.reference.cli)

Exit codes of ``train`` and ``compare``: 0 finished; 2 bad input (arguments, config, a run
directory in use by another process, no usable or an unsafe checkpoint); 3 training diverged
(a non-finite loss or gradient that ``divergence.on_nonfinite`` did not recover from); 4 an
output could not be written (disk full, permissions); 5 (distributed runs) this rank stopped
because another rank failed (``--nproc`` returns the exit code of the rank that failed first);
130 interrupted by Ctrl-C and 143 stopped by SIGTERM (preemption), in both cases after writing a
checkpoint that ``--resume`` continues from (``compare``: rerunning the command continues the
study); 1 (``compare``) some run failed for a reason other than a divergence (its ``train.log``
says why; a diverged run is a result, reported in the table).

Distributed runs (``--nproc N``, or started by ``torchrun``): every rank trains on its own share
of the points and all ranks take the same step, the one a single process would take on all
their points together (``[distributed]`` in the config, :mod:`hrgrad_ext.train.distributed`);
rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["EXIT_DIVERGED", "EXIT_RUN_FAILED", "EXIT_INTERRUPTED", "EXIT_OUTPUT_ERROR", "EXIT_PEER_FAILED", "EXIT_PREEMPTED", "EXIT_USAGE",
           "build_parser", "main"]

EXIT_RUN_FAILED = 1  # compare: some run failed for another reason than a divergence
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_OUTPUT_ERROR = 4
EXIT_PEER_FAILED = 5  # a distributed run's rank stopped because another one failed
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process killed by Ctrl-C
EXIT_PREEMPTED = 143  # 128 + SIGTERM

DEMO_J = [[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]


def _eps_list(text: str) -> list[float]:
    items = [s for s in text.replace(" ", "").split(",") if s]
    try:
        return [float(s) for s in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--eps: expected comma-separated numbers, got {text!r}") from None


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (default: the problem's defaults, hrgrad_ext/configs/<problem>.toml)")
    p.add_argument("--problem", choices=("transport", "bgk"), help="kinetic problem (default transport)")
    p.add_argument("--preset", default="default",
                   help="packaged config of the problem: 'default' (laptop CPU, minutes) or 'long' (the accuracy "
                        "runs, up to an hour on 2 CPU cores); ignored with --config")
    p.add_argument("--eps", type=_eps_list, help="task set, comma-separated (eps, or Kn for BGK)")
    p.add_argument("--iters", type=int, help="optimizer steps")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--dtype", choices=("float32", "float64"))
    p.add_argument("--seed", type=int)
    p.add_argument("--tasks", choices=("eps", "eps_group"), help="one task per eps, or per (eps, point group)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. optim.lr=5e-4 or model.g.width=64 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def build_parser() -> argparse.ArgumentParser:
    from .aggregators import METHODS

    parser = argparse.ArgumentParser(prog="hrgrad-ext", description="HRGrad multi-task APNN training for kinetic equations")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train one multi-eps APNN")
    _add_run_options(tr)
    tr.add_argument("--method", help=f"one of {', '.join(METHODS)} (default hrgrad; sum is plain APNN training)")
    tr.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    tr.add_argument("--overwrite", action="store_true",
                    help="start afresh in --out even where it holds an earlier run's checkpoint (deleted); without "
                         "it such a directory is refused")
    tr.add_argument("--nproc", type=int, metavar="N",
                    help="train in N processes on this machine (torchrun's launcher; each rank draws its own points, "
                         "every step is the single-process step on all of them; gloo on the CPU, NCCL on CUDA, one GPU "
                         "per process); see [distributed] in the config")

    cp = sub.add_parser("compare", help="train several methods with the same seeds and budget: a table, steps to "
                                        "accuracy and a figure (resumable: rerun the command to continue)")
    _add_run_options(cp)
    cp.add_argument("--methods", default="hrgrad,sum,pcgrad,config",
                    help=f"comma-separated, some of {','.join(METHODS)}, or 'all'")
    cp.add_argument("--seeds", help="comma-separated seeds (default: --seed); the table then shows the "
                                    "median and range over them")
    cp.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="train N runs at once, each in its own process (give --threads, e.g. 1)")

    dm = sub.add_parser("demo", help="aggregate two conflicting gradients with every method and print the result")
    dm.add_argument("--J", default=json.dumps(DEMO_J), help="Jacobian rows as JSON (default %(default)s)")

    try:
        from .reference import cli as ref_cli
    except ImportError:
        ref_cli = None
    if ref_cli is not None and hasattr(ref_cli, "add_parser"):
        ref_cli.add_parser(sub)
    return parser


def _resolve_config(args):
    from .train.config import apply_overrides, default_config, load_config

    if args.config:
        cfg = load_config(args.config)
    else:
        cfg = default_config(args.problem or "transport", args.preset)
    over = list(args.set)
    for key in ("problem", "iters", "device", "dtype", "seed", "tasks", "threads", "out"):
        val = getattr(args, key, None)
        if val is not None:
            over.append(f"{key}={json.dumps(val)}")
    if getattr(args, "method", None) is not None:
        over.append(f"method={json.dumps(args.method)}")
    if args.eps is not None:
        over.append(f"eps={json.dumps(args.eps)}")
    if args.no_progress:
        over.append("log.progress=false")
    if args.no_plots:
        over.append("log.plots=false")
    # overrides replace list values wholesale; a config for one problem has the other's
    # model keys wrong, so switching problem without a config starts from its defaults
    cfg = apply_overrides(cfg, over)
    return cfg.validate()


def _print_summary(s: dict) -> None:
    print(f"\n{s['problem']} / {s['method']}: {s['iters']} steps on {s['device']}, wall time {s['wall_time_s']:.1f} s "
          f"({s['step_time_ms']:.1f} ms/step)")
    for eps, errs in s["rel_l2"].items():
        print(f"  eps={eps:>8}: " + "  ".join(f"{q} {v:.3e}" for q, v in errs.items()))


def _train(args) -> int:
    from .train.distributed import init_from_env
    from .train.trainer import Trainer

    cfg = None if args.resume else _resolve_config(args)
    # under torchrun: join the process group (the options a resumed run's rank 0 alone could
    # read from its config.toml come from --set, or their defaults)
    opts = (cfg if cfg is not None else _overridden_defaults(args.set)).distributed
    # whether this call creates the process group (the command under torchrun), or joins one
    # its caller made (main() called from the caller's own distributed job): only a group it
    # created is torn down here, and only then may a failure end the process
    import torch.distributed as dist

    owned = not (dist.is_available() and dist.is_initialized())
    distributed = init_from_env(opts.backend, opts.timeout_s)
    owned = owned and distributed
    try:
        return _train_process(args, cfg, Trainer)
    except Exception as exc:
        from .distributed import PeerFailureError
        from .train.rundir import RunDirectoryInUse
        from .train.trainer import NonFiniteError, Preempted

        # the errors main() answers with an exit code of their own go on there
        answered = (ValueError, OSError, RunDirectoryInUse, NonFiniteError, PeerFailureError, Preempted)
        if owned and not isinstance(exc, answered):
            _exit_failed_rank()
        raise
    finally:
        if owned:
            dist.destroy_process_group()


def _exit_failed_rank() -> None:
    """Ends a distributed rank that failed with an unexpected error: the traceback, then exit
    code 1 without tearing down. Its peers are blocked in a collective at that point; tearing
    the process group down (or its destructor at interpreter exit) races with the launcher
    stopping them, and gloo can then abort this process (seen once under load: the rank was
    reported killed by SIGABRT instead of exiting with its error). Checkpoints are already
    durable (written, fsynced and renamed at their step)."""
    import logging
    import os
    import traceback

    traceback.print_exc()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _overridden_defaults(assignments: list[str]):
    from .train.config import TrainConfig, apply_overrides

    return apply_overrides(TrainConfig(), [a for a in assignments if a.strip().startswith("distributed.")])


def _train_process(args, cfg, Trainer) -> int:
    if args.resume:
        over = list(args.set)
        for key in ("iters", "threads"):
            val = getattr(args, key)
            if val is not None:
                over.append(f"{key}={val}")
        if args.no_progress:
            over.append("log.progress=false")
        if args.no_plots:
            over.append("log.plots=false")
        trainer = Trainer.resume(args.resume, over)
        if trainer.is_writer:
            print(f"resuming {args.resume} at step {trainer.step} of {trainer.cfg.total_steps}", flush=True)
    else:
        from .train.rundir import CHECKPOINT, RunLock

        # a fresh run clears its directory: never a long run's checkpoint by a forgotten --resume
        if (Path(cfg.out) / CHECKPOINT).is_file() and not args.overwrite:
            probe = RunLock(cfg.out)  # a directory in use by a live run says so first
            probe.acquire()
            probe.release()
            raise ValueError(f"{cfg.out} holds the checkpoint of an earlier run: continue it with `hrgrad-ext train "
                             f"--resume {cfg.out}`, or start afresh there with --overwrite (deletes that checkpoint)")
        trainer = Trainer(cfg)
    summary = trainer.run()
    if trainer.is_writer:
        _print_summary(summary)
        print(f"outputs in {trainer.out}")
    return 0


def _compare(args) -> int:
    from .train.compare import run_compare

    cfg = _resolve_config(args)
    methods = args.methods
    seeds = None
    if args.seeds:
        try:
            seeds = [int(v) for v in args.seeds.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    table = run_compare(cfg, methods, cfg.out, seeds, jobs=args.jobs, say=lambda m: print(m, flush=True))
    print(table)
    print(f"written to {cfg.out}/compare.md" + ("" if args.no_plots else f" and {cfg.out}/compare.png"))
    data = json.loads((Path(cfg.out) / "compare.json").read_text())
    failed = [r for v in data.values() for r in (v if isinstance(v, list) else [v]) if r.get("status") == "failed"]
    if failed:
        print(f"hrgrad-ext compare: {len(failed)} run(s) failed (see their train.log); rerun the command to retry them",
              file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0


def _demo(args) -> int:
    import torch

    from .backward import task_diagnostics
    from .train.config import METHODS
    from .train.trainer import make_aggregator

    try:
        J = torch.tensor(json.loads(args.J), dtype=torch.float64)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--J: expected a JSON matrix, got {args.J!r} ({exc})") from None
    if J.dim() != 2:
        raise ValueError(f"--J: expected a matrix (list of rows), got shape {tuple(J.shape)}")
    print(f"task gradients (rows of J):\n{J.numpy()}")
    G = J @ J.T
    print(f"cosine(g_1, g_2) = {float(G[0, 1] / (G[0, 0] * G[1, 1]).sqrt()):.4f}" if J.shape[0] == 2 else "")
    print(f"{'method':<9} {'update':<34} {'weights':<24} cos(update, g_i)")
    for m in METHODS:
        agg = make_aggregator(m)
        # the loss-weighting methods at their first step (equal losses: there is no history yet)
        agg.observe_losses(torch.ones(J.shape[0], dtype=torch.float64))
        w = agg.weights(J).to(torch.float64)
        upd = J.T @ w
        d = task_diagnostics(G, w)
        fmt = lambda t: "[" + ", ".join(f"{v:8.4f}" for v in t.tolist()) + "]"
        print(f"{m:<9} {fmt(upd):<34} {fmt(w):<24} {fmt(d.update_cosines)}")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    from .distributed import PeerFailureError
    from .train.distributed import launch, started_by_torchrun
    from .train.rundir import RunDirectoryInUse
    from .train.trainer import NonFiniteError, Preempted

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)

    def error(exc) -> None:
        import torch.distributed as dist

        rank = f" (rank {dist.get_rank()})" if dist.is_available() and dist.is_initialized() else ""
        print(f"hrgrad-ext {args.command}{rank}: error: {exc}", file=sys.stderr)

    try:
        if args.command == "train" and args.nproc is not None and not started_by_torchrun():
            if args.nproc < 1:
                raise ValueError(f"--nproc: must be >= 1, got {args.nproc}")
            if args.nproc > 1:
                return launch(args.nproc, _without_nproc(argv))
        if args.command == "train":
            return _train(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "demo":
            return _demo(args)
        if hasattr(args, "func"):
            return int(args.func(args) or 0)
        parser.error(f"no handler for {args.command!r}")
    except (ValueError, FileNotFoundError, RunDirectoryInUse) as exc:
        error(exc)
        return EXIT_USAGE
    except NonFiniteError as exc:
        error(exc)
        return EXIT_DIVERGED
    except PeerFailureError as exc:
        error(exc)
        return EXIT_PEER_FAILED
    except OSError as exc:
        error(exc)
        return EXIT_OUTPUT_ERROR
    except KeyboardInterrupt:  # the trainer has saved a checkpoint and said so
        return EXIT_INTERRUPTED
    except Preempted:
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
