"""``hrgrad-ext compare``: the same problem, seed and budget trained with several aggregation
methods, and a markdown table of the relative L2 errors per eps."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .config import METHODS, TrainConfig

__all__ = ["markdown_table", "run_compare"]


def markdown_table(summaries: dict[str, dict]) -> str:
    """One table per macroscopic quantity: rows = methods, columns = eps, plus time."""
    first = next(iter(summaries.values()))
    eps_keys = list(first["rel_l2"])
    quantities = list(next(iter(first["rel_l2"].values())))
    lines = [
        f"Problem `{first['problem']}`" + (f" (case {first['case']})" if first.get("case") else "")
        + f", {first['iters']} iterations, device {first['device']}, dtype {first['dtype']}, "
        f"tasks {len(first['tasks'])}, {first['parameters']} parameters.",
        "",
    ]
    for q in quantities:
        lines.append(f"Relative L2 error of `{q}` at t = final time:")
        lines.append("")
        lines.append("| method | " + " | ".join(f"eps={e}" for e in eps_keys) + " | max | wall time (s) |")
        lines.append("|---" * (len(eps_keys) + 3) + "|")
        for method, s in summaries.items():
            errs = [s["rel_l2"][e][q] for e in eps_keys]
            lines.append(f"| {method} | " + " | ".join(f"{v:.2e}" for v in errs)
                         + f" | {max(errs):.2e} | {s['wall_time_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def run_compare(base: TrainConfig, methods: list[str], out: str | Path) -> str:
    """Trains ``base`` once per method into ``out/<method>`` and writes ``out/compare.md``
    and ``out/compare.json``. Returns the markdown."""
    from .trainer import Trainer

    if not methods:
        raise ValueError("compare: no methods given")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"compare: unknown method(s) {unknown}; expected some of {METHODS}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for m in methods:
        cfg = copy.deepcopy(base)
        cfg.method = m
        cfg.out = str(out / m)
        summaries[m] = Trainer(cfg).run()
    table = markdown_table(summaries)
    (out / "compare.md").write_text(table + "\n")
    (out / "compare.json").write_text(json.dumps(summaries, indent=2) + "\n")
    return table
