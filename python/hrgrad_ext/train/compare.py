"""``hrgrad-ext compare``: the same problem, seed(s) and budget trained with several aggregation
methods, and a markdown table of the relative L2 errors per eps.

With several seeds every cell is the median over the seeds with the range in brackets: single
runs of these collocation trainings differ by 2-5x between seeds on some quantities, so a
comparison of methods on one seed can mislead."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

from .config import METHODS, TrainConfig

__all__ = ["markdown_table", "run_compare"]


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2e}"
    return f"{statistics.median(values):.2e} [{min(values):.1e}, {max(values):.1e}]"


def markdown_table(summaries: dict[str, dict | list[dict]]) -> str:
    """One table per macroscopic quantity: rows = methods, columns = eps, plus the largest error
    and the wall time. ``summaries[method]`` is one run's summary or a list of them (seeds): the
    cells are then ``median [min, max]`` over the seeds (the max column: over eps of the
    per-eps medians; the time: the median)."""
    runs = {m: (s if isinstance(s, list) else [s]) for m, s in summaries.items()}
    first = next(iter(runs.values()))[0]
    eps_keys = list(first["rel_l2"])
    quantities = list(next(iter(first["rel_l2"].values())))
    seeds = sorted({r.get("seed", 0) for rs in runs.values() for r in rs})
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
        lines.append("| method | " + " | ".join(f"eps={e}" for e in eps_keys) + " | max | wall time (s) |")
        lines.append("|---" * (len(eps_keys) + 3) + "|")
        for method, rs in runs.items():
            errs = [[r["rel_l2"][e][q] for r in rs] for e in eps_keys]
            worst = max(statistics.median(v) for v in errs)
            wall = statistics.median(r["wall_time_s"] for r in rs)
            lines.append(f"| {method} | " + " | ".join(_cell(v) for v in errs) + f" | {worst:.2e} | {wall:.0f} |")
        lines.append("")
    return "\n".join(lines)


def run_compare(base: TrainConfig, methods: list[str], out: str | Path, seeds: list[int] | None = None) -> str:
    """Trains ``base`` once per method (and seed) into ``out/<method>`` (``out/<method>/seed<S>``
    with several seeds) and writes ``out/compare.md`` and ``out/compare.json``. Returns the
    markdown."""
    from .trainer import Trainer

    if not methods:
        raise ValueError("compare: no methods given")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"compare: unknown method(s) {unknown}; expected some of {METHODS}")
    seeds = [base.seed] if not seeds else [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"compare: duplicate seeds in {seeds}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, list[dict]] = {}
    for m in methods:
        for seed in seeds:
            cfg = copy.deepcopy(base)
            cfg.method = m
            cfg.seed = seed
            cfg.out = str(out / m) if len(seeds) == 1 else str(out / m / f"seed{seed}")
            summaries.setdefault(m, []).append(Trainer(cfg).run())
    table = markdown_table(summaries)
    (out / "compare.md").write_text(table + "\n")
    data = {m: (rs[0] if len(seeds) == 1 else rs) for m, rs in summaries.items()}
    (out / "compare.json").write_text(json.dumps(data, indent=2) + "\n")
    return table
