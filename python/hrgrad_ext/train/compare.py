"""``hrgrad-ext compare``: the same problem, seeds and budget trained with several aggregation
methods; a markdown report (``compare.md``), the raw results (``compare.json``) and a figure
(``compare.png``).

With several seeds every cell is the median over the seeds with the range in brackets: single
runs of these collocation trainings differ by 2-5x between seeds on some quantities, so a
comparison of methods on one seed can mislead.

A study is resumable: each (method, seed) run has its own run directory, ``out/<method>/seed<S>``
whichever seeds a command names, so a study split over commands (``--seeds 1`` on one machine,
``--seeds 2`` on another, then ``--seeds 0,1,2`` for the report) is one study; a single-seed run of
the older layout (``out/<method>``) is still found. Running the same command again skips the
finished runs (``summary.json``), continues the interrupted ones from their checkpoints (as
``hrgrad-ext train --resume``), and reports the ones that diverged (``diverged.json``: a
non-finite loss or gradient that the run's ``[divergence]`` policy did not recover from)
without running them again; delete a run's directory to redo it. A directory holding a run of a
different configuration is an error, not silently reused. ``jobs > 1`` trains that many runs at
once, each in its own process (``hrgrad-ext train``, output in the run's ``train.log``), with
``threads`` torch threads each (default: the cores divided among the jobs).
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import METHODS, TrainConfig, load_config, to_toml

__all__ = ["RunResult", "THRESHOLDS", "markdown_table", "resolve_methods", "run_compare", "steps_to_accuracy"]

#: Steps-to-accuracy thresholds: the first evaluation at which every eps is below each.
THRESHOLDS = (5e-2, 2e-2)
DIVERGED = "diverged.json"
LOG = "train.log"
# config keys that may differ between a run directory and the study without changing the run
_INCIDENTAL = ("threads", "out")
_INCIDENTAL_LOG = ("progress", "plots")


@dataclass
class RunResult:
    """One (method, seed) run of a study. ``status``: ``"done"``, ``"diverged"`` (a non-finite
    loss or gradient stopped it; ``message`` says where) or ``"failed"`` (any other error;
    ``message`` names the log)."""

    method: str
    seed: int
    run_dir: Path
    status: str
    summary: dict | None = None
    message: str | None = None
    evals: list[dict] = field(default_factory=list)


def resolve_methods(methods: list[str] | str) -> list[str]:
    """The method names of a comparison: ``"all"`` is every registered method."""
    if isinstance(methods, str):
        methods = [m for m in methods.replace(" ", "").split(",") if m]
    out: list[str] = []
    for m in methods:
        for name in (METHODS if m == "all" else (m,)):
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError("compare: no methods given")
    unknown = [m for m in out if m not in METHODS]
    if unknown:
        raise ValueError(f"compare: unknown method(s) {unknown}; expected some of {METHODS} or 'all'")
    return out


# --- the table -----------------------------------------------------------------------------------


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    bad = len(values) - len(_finite(values))
    values = _finite(values)
    if not values:
        return "NaN"
    text = f"{values[0]:.2e}" if len(values) == 1 else \
        f"{statistics.median(values):.2e} [{min(values):.1e}, {max(values):.1e}]"
    return text + (f" ({bad} NaN)" if bad else "")


def _as_results(summaries: dict[str, dict | list[dict]]) -> dict[str, list[RunResult]]:
    """Summaries (one per run, or a list per method) as finished :class:`RunResult` s."""
    out = {}
    for method, s in summaries.items():
        runs = s if isinstance(s, list) else [s]
        out[method] = [r if isinstance(r, RunResult) else RunResult(method, r.get("seed", 0), Path("."), "done", r)
                       for r in runs]
    return out


def _ended_in_nan(r: RunResult) -> bool:
    return r.summary is not None and not all(math.isfinite(v) for d in r.summary["rel_l2"].values() for v in d.values())


def _runs_cell(rs: list[RunResult]) -> str:
    """How many runs finished with finite errors, and what happened to the others."""
    good = sum(r.status == "done" and not _ended_in_nan(r) for r in rs)
    notes = [f"seed {r.seed} {'ended in NaN' if r.status == 'done' else r.status}" for r in rs
             if r.status != "done" or _ended_in_nan(r)]
    return f"{good}/{len(rs)}" + (f" ({'; '.join(notes)})" if notes else "")


def steps_to_accuracy(evals: list[dict], quantity: str, threshold: float) -> int | None:
    """The step of the first evaluation at which ``quantity`` is below ``threshold`` at every
    eps (``None``: never)."""
    for record in evals:
        errs = [d[quantity] for d in record["rel_l2"].values()]
        if errs and all(math.isfinite(e) and e < threshold for e in errs):
            return int(record["step"])
    return None


def markdown_table(summaries: dict[str, dict | list[dict] | list[RunResult]],
                   thresholds: tuple[float, ...] = THRESHOLDS) -> str:
    """The report: one table per macroscopic quantity (rows: methods, columns: eps, then the
    largest error, the wall time and the time per step), then the steps to accuracy.

    ``summaries[method]`` is one run's summary, a list of them (seeds), or a list of
    :class:`RunResult` (which may include diverged or failed runs). With several seeds the cells
    are ``median [min, max]`` over the seeds that finished (the max column: over eps of the
    per-eps medians; the times: medians); the ``runs`` column says how many finished and what
    happened to the others."""
    runs = _as_results(summaries)
    finished = [r for rs in runs.values() for r in rs if r.summary is not None]
    if not finished:
        return "\n".join(["No run of this study finished.", "", *_status_lines(runs)])
    first = finished[0].summary
    eps_keys = list(first["rel_l2"])
    quantities = list(next(iter(first["rel_l2"].values())))
    seeds = sorted({r.seed for rs in runs.values() for r in rs})
    lines = [
        f"Problem `{first['problem']}`" + (f" (case {first['case']})" if first.get("case") else "")
        + f", {first['iters']} iterations, device {first['device']}, dtype {first['dtype']}, "
        f"tasks {len(first['tasks'])}, {first['parameters']} parameters"
        + (f", seeds {', '.join(map(str, seeds))}: median [min, max]." if len(seeds) > 1 else "."),
        "",
    ]
    for q in quantities:
        lines.append(f"Relative L2 error of `{q}` at the end of each task's time window:")
        lines.append("")
        lines.append("| method | " + " | ".join(f"eps={e}" for e in eps_keys)
                     + " | max | wall time (s) | ms/step | runs |")
        lines.append("|---" * (len(eps_keys) + 5) + "|")
        for method, rs in runs.items():
            done = [r.summary for r in rs if r.summary is not None]
            if not done:
                lines.append(f"| {method} | " + " | ".join("-" for _ in eps_keys) + f" | - | - | - | {_runs_cell(rs)} |")
                continue
            errs = [[s["rel_l2"][e][q] for s in done] for e in eps_keys]
            medians = [statistics.median(_finite(v)) if _finite(v) else math.nan for v in errs]
            worst = max(medians) if all(math.isfinite(m) for m in medians) else math.nan
            wall = statistics.median(s["wall_time_s"] for s in done)
            ms = statistics.median(s["step_time_ms"] for s in done)
            lines.append(f"| {method} | " + " | ".join(_cell(v) for v in errs)
                         + f" | {worst:.2e} | {wall:.0f} | {ms:.0f} | {_runs_cell(rs)} |")
        lines.append("")
    if any(r.evals for rs in runs.values() for r in rs):
        lines += _accuracy_table(runs, quantities, thresholds, seeds)
    lines += _status_lines(runs)
    return "\n".join(lines)


def _accuracy_table(runs: dict[str, list[RunResult]], quantities: list[str], thresholds, seeds) -> list[str]:
    every = sorted({r.evals[1]["step"] - r.evals[0]["step"] for rs in runs.values() for r in rs if len(r.evals) > 1})
    cadence = (f"every {every[0]} steps" if len(every) == 1 else "every " + " or ".join(map(str, every)) + " steps"
               if every else "only at the last step")
    lines = [f"Steps to accuracy: the step of the first evaluation ({cadence}) at "
             "which the error is below the threshold at every eps, per seed (" + ", ".join(map(str, seeds))
             + "); - = not reached:", ""]
    cols = [(q, t) for q in quantities for t in thresholds]
    lines.append("| method | " + " | ".join(f"`{q}` < {t:g}" for q, t in cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for method, rs in runs.items():
        cells = []
        for q, t in cols:
            per_seed = [steps_to_accuracy(r.evals, q, t) for r in rs]
            cells.append(" / ".join("-" if s is None else str(s) for s in per_seed))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _status_lines(runs: dict[str, list[RunResult]]) -> list[str]:
    notes = [f"* {r.method} seed {r.seed}: {r.status}: {r.message}" for rs in runs.values() for r in rs
             if r.status != "done"]
    return (["Runs that did not finish:", "", *notes, ""] if notes else [])


# --- running the study ---------------------------------------------------------------------------


def _run_dir(out: Path, method: str, seed: int) -> Path:
    flat = out / method
    # the layout before runs were always per seed put a one-seed study's run here; a second
    # command with another seed must not take that run for its own
    try:
        if load_config(flat / "config.toml").seed == seed:
            return flat
    except OSError:
        pass
    return flat / f"seed{seed}"


def _comparable(cfg_dict: dict) -> dict:
    d = copy.deepcopy(cfg_dict)
    for k in _INCIDENTAL:
        d.pop(k, None)
    for k in _INCIDENTAL_LOG:
        d.get("log", {}).pop(k, None)
    # 0 (one share of the points per process) is fixed to the world size, 1 here, at the start
    if d.get("distributed", {}).get("shards") == 0:
        d["distributed"]["shards"] = 1
    return d


def _check_same_run(run_dir: Path, cfg: TrainConfig) -> None:
    """Raises unless ``run_dir`` is empty or holds a run of ``cfg`` (up to threads / output)."""
    path = run_dir / "config.toml"
    if not path.is_file():
        return
    theirs = _comparable(load_config(path).validate().to_dict())
    mine = _comparable(cfg.to_dict())
    if theirs != mine:
        diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        raise ValueError(f"compare: {run_dir} holds a run of a different configuration (differs in {', '.join(diff)}); "
                         "use another --out or remove that directory")


def _state(run_dir: Path, cfg: TrainConfig) -> str:
    """``"done"``, ``"diverged"``, ``"partial"`` (a checkpoint to resume) or ``"fresh"``."""
    _check_same_run(run_dir, cfg)
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("iters") == cfg.total_steps:
        return "done"
    if (run_dir / DIVERGED).is_file():
        return "diverged"
    if any((run_dir / n).is_file() for n in ("checkpoint.pt", "checkpoint.prev.pt")):
        return "partial"
    return "fresh"


def _result(method: str, seed: int, run_dir: Path) -> RunResult:
    from .rundir import read_metrics

    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    if (run_dir / DIVERGED).is_file():
        info = json.loads((run_dir / DIVERGED).read_text())
        return RunResult(method, seed, run_dir, "diverged", None, info.get("message"), evals)
    summary = run_dir / "summary.json"
    if summary.is_file():
        return RunResult(method, seed, run_dir, "done", json.loads(summary.read_text()), None, evals)
    return RunResult(method, seed, run_dir, "failed", None, f"no summary; see {run_dir / LOG}", evals)


def _mark_diverged(run_dir: Path, message: str) -> None:
    from .rundir import atomic_write

    # the first sentence names the step and the task; the rest is advice
    message = message.split("error: ", 1)[-1].split(". ", 1)[0]
    atomic_write(run_dir / DIVERGED, json.dumps({"message": message}, indent=1) + "\n")


def _train_here(cfg: TrainConfig, state: str) -> None:
    """Trains (or resumes) one run in this process; a divergence is recorded, not raised."""
    from .trainer import NonFiniteError, Trainer

    run_dir = Path(cfg.out)
    try:
        if state == "partial":
            over = [f"threads={cfg.threads}", f"log.progress={str(cfg.log.progress).lower()}",
                    f"log.plots={str(cfg.log.plots).lower()}"]
            trainer = Trainer.resume(run_dir, over)
        else:
            trainer = Trainer(cfg)
        trainer.run()
    except NonFiniteError as exc:
        _mark_diverged(run_dir, str(exc))


def _command(cfg: TrainConfig, state: str) -> list[str]:
    base = [sys.executable, "-m", "hrgrad_ext.cli", "train", "--no-progress"]
    if not cfg.log.plots:
        base.append("--no-plots")
    if state == "partial":
        return base + ["--resume", cfg.out, "--threads", str(cfg.threads)]
    return base + ["--config", str(Path(cfg.out) / "config.toml")]


def _last_error(log: Path) -> str:
    lines = [l for l in log.read_text(errors="replace").splitlines() if "error" in l] if log.is_file() else []
    return lines[-1].strip() if lines else f"see {log}"


def _run_parallel(jobs: list[tuple[TrainConfig, str]], n: int, say) -> None:
    """Runs ``jobs`` (config, state) in up to ``n`` processes of ``hrgrad-ext train``."""
    pending = list(jobs)
    running: dict[subprocess.Popen, tuple[TrainConfig, float, object]] = {}
    previous = None

    def stop(signum, frame):
        from .trainer import Preempted

        raise Preempted("compare: stopped by SIGTERM; the runs wrote checkpoints, run the same command to continue",
                        signum, Path(jobs[0][0].out))

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, stop)
    try:
        while pending or running:
            while pending and len(running) < n:
                cfg, state = pending.pop(0)
                run_dir = Path(cfg.out)
                run_dir.mkdir(parents=True, exist_ok=True)
                if state == "fresh":
                    (run_dir / "config.toml").write_text(to_toml(cfg))
                log = open(run_dir / LOG, "a")
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}: {'resume' if state == 'partial' else 'start'}\n")
                log.flush()
                proc = subprocess.Popen(_command(cfg, state), stdout=log, stderr=subprocess.STDOUT)
                running[proc] = (cfg, time.time(), log)
                say(f"started {cfg.method} seed {cfg.seed} ({state}) in {run_dir}")
            time.sleep(0.5)
            for proc in [p for p in running if p.poll() is not None]:
                cfg, t0, log = running.pop(proc)
                log.close()
                run_dir = Path(cfg.out)
                if proc.returncode == 3:
                    _mark_diverged(run_dir, _last_error(run_dir / LOG))
                elif proc.returncode in (130, 143):
                    raise KeyboardInterrupt
                say(f"finished {cfg.method} seed {cfg.seed}: exit code {proc.returncode} after {time.time() - t0:.0f} s")
    except BaseException:
        # stop the runs still going: each finishes its step, writes a checkpoint and exits
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, (_, _, log) in running.items():
            proc.wait()
            log.close()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_compare(base: TrainConfig, methods: list[str] | str, out: str | Path, seeds: list[int] | None = None,
                jobs: int = 1, say=print) -> str:
    """Trains ``base`` once per method and seed (see the module docstring for the layout,
    resumption and ``jobs``) and writes ``out/compare.md``, ``out/compare.json`` and
    ``out/compare.png``. Returns the markdown."""
    methods = resolve_methods(methods)
    seeds = [base.seed] if not seeds else [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"compare: duplicate seeds in {seeds}")
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"compare: --jobs must be >= 1, got {jobs!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if jobs > 1 and base.threads == 0:
        base = copy.deepcopy(base)
        base.threads = max(1, (os.cpu_count() or 1) // jobs)
    several = len(seeds) > 1
    plan, todo = [], []
    for m in methods:
        for seed in seeds:
            cfg = copy.deepcopy(base)
            cfg.method, cfg.seed = m, seed
            cfg.out = str(_run_dir(out, m, seed))
            cfg.validate()
            state = _state(Path(cfg.out), cfg)
            plan.append((m, seed, Path(cfg.out)))
            if state in ("done", "diverged"):
                say(f"{m} seed {seed}: {state} ({cfg.out}), not run again")
            else:
                todo.append((cfg, state))
    # seed-major: an interrupted study already holds every method on the first seeds
    todo.sort(key=lambda run: seeds.index(run[0].seed))
    if todo:
        say(f"compare: {len(todo)} of {len(plan)} runs to train ({sum(s == 'partial' for _, s in todo)} resumed), "
            f"{jobs} at a time")
    if jobs == 1:
        for cfg, state in todo:
            _train_here(cfg, state)
    else:
        _run_parallel(todo, jobs, say)
    results: dict[str, list[RunResult]] = {}
    for m, seed, run_dir in plan:
        results.setdefault(m, []).append(_result(m, seed, run_dir))
    table = markdown_table(results)
    (out / "compare.md").write_text(table + "\n")
    data = {m: [_json_result(r) for r in rs] if several else _json_result(rs[0]) for m, rs in results.items()}
    (out / "compare.json").write_text(json.dumps(data, indent=2) + "\n")
    if base.log.plots:
        from .plots import plot_compare

        plot_compare(results, out / "compare.png")
    return table


def _json_result(r: RunResult) -> dict:
    """A run for ``compare.json``: its summary (finished runs), else its status and message."""
    if r.summary is not None:
        return {**r.summary, "status": r.status}
    return {"method": r.method, "seed": r.seed, "status": r.status, "message": r.message}
