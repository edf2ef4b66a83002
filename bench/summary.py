"""Markdown tables of issue 10's targets from the benchmark JSONs (for README / docs/RESULTS.md).

    python bench/summary.py docs/bench/gram_cpu.json docs/bench/kinetic_cpu.json docs/bench/train_step_cpu.json

Each file may hold one run or ``{"runs": [...]}`` (one per thread count, as written by the
scripts' ``--threads 1 2``). Ratios are same-run ratios of medians; "ok" marks a met target.
"""

from __future__ import annotations

import json
import sys


def _runs(path: str) -> list[dict]:
    with open(path) as fh:
        data = json.load(fh)
    return data["runs"] if isinstance(data, dict) and "runs" in data else [data]


def _ok(ratio: float | None, target: float) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}{' ok' if ratio <= target else ''}"


def _header(run: dict) -> str:
    m = run.get("machine", {})
    return (f"{m.get('cpu_model', run.get('device'))}, {run.get('threads')} thread(s), torch {m.get('torch')}, "
            f"load average {m.get('loadavg_1min_at_start')} at start")


def gram_table(run: dict) -> str:
    lines = [f"gram / combine / hrgrad ({_header(run)}):", "",
             "| K | n | gram vs `J @ J.T` (target) | gram float64 result | combine vs `w @ J` | combine_accumulate_ | "
             "hrgrad vs gram(f64) + combine | hrgrad ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in run["records"]:
        if r.get("dtype") != run.get("dtype"):
            continue
        q = r["ratios"]
        lines.append(f"| {r['K']} | {r['n']:.0e} | {_ok(q.get('gram_vs_mm'), q.get('gram_target', 1.0))} "
                     f"(<= {q.get('gram_target')}) | {q.get('gram_f64_vs_mm', float('nan')):.2f} | "
                     f"{_ok(q.get('combine_vs_wJ'), 1.0)} | {_ok(q.get('combine_accumulate_vs_wJ'), 1.0)} | "
                     f"{_ok(q.get('hrgrad_vs_gram_f64_plus_combine'), 1.1)} | "
                     f"{r['ms'].get('hrgrad', {}).get('median_ms', float('nan')):.3g} |")
    f64 = [r for r in run["records"] if r.get("dtype") == "float64" and run.get("dtype") != "float64"]
    if f64:
        lines += ["", "float64 input:", "", "| K | n | gram vs `J @ J.T` | combine vs `w @ J` |", "|---|---|---|---|"]
        for r in f64:
            lines.append(f"| {r['K']} | {r['n']:.0e} | {r['ratios']['gram_vs_mm']:.2f} | "
                         f"{r['ratios']['combine_vs_wJ']:.2f} |")
    return "\n".join(lines)


def kinetic_table(run: dict) -> str:
    lines = [f"kinetic ops, forward + backward of the loss ({_header(run)}), ms:", "",
             "| op | N | V | ext | compiled | ext / compiled (target 1.0) | residual op + eager loss | "
             "ext_compiled / compiled | fused fwd op | fused bwd op | eager loss over the residual op's outputs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in run["cases"]:
        ms, q = c["ms"], c["ratios"]
        lines.append(f"| {c['op'].replace('_residuals', '')} | {c['N']} | {c['V']} | {ms['ext']:.3g} | "
                     f"{ms.get('compiled', float('nan')):.3g} | {_ok(q.get('ext_vs_compiled'), 1.0)} | "
                     f"{ms.get('ext_residuals', float('nan')):.3g} | "
                     f"{q.get('ext_compiled_vs_compiled', float('nan')):.2f} | {ms['ext_forward_op']:.3g} | "
                     f"{ms['ext_backward_op']:.3g} | {ms['eager_loss_alone']:.3g} |")
    return "\n".join(lines)


def train_table(run: dict) -> str:
    lines = [f"training step, BGK ({_header(run)}; malloc keep: {run.get('malloc_keep_freed_memory')}; "
             f"sizes {run.get('sizes')}), ms:", "",
             "| mode | K | median | min |", "|---|---|---|---|"]
    for r in run["records"]:
        lines.append(f"| {r['mode']} | {r['K']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} |")
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    for k, v in run.get("ratios", {}).items():
        # vs_single: the GPU target of issue 11 (the K-task step against one single-eps step)
        target = 1.0 if k.endswith(("vs_separate", "vs_single")) else 2.0
        lines.append(f"| {k} | {_ok(v, target)} | <= {target} |")
    return "\n".join(lines)


def _pct(fig: dict | None) -> str:
    p = (fig or {}).get("pct_of_floor")
    return "-" if p is None else f"{p:.0f} %"


def floor_table(run: dict) -> str:
    """Where the device has a known bandwidth (GPUs): each kernel's time as % of its read-once
    floor (bench/memory_model.py), and the GPU targets of issue 11."""
    bw = run.get("bandwidth") or {}
    if not bw.get("bytes_per_s"):
        return ""
    head = f"% of the read-once floor at {bw['bytes_per_s'] / 1e12:.2f} TB/s ({bw.get('source')}):"
    if run.get("benchmark") == "gram":
        lines = [head, "", "| K | n | J.sum(1) | gram | gram f64 | combine | hrgrad | hrgrad / J.sum(1) (target 1.3; "
                 "floor (2K+1)/K) |", "|---|---|---|---|---|---|---|---|"]
        for r in run["records"]:
            f = r.get("floor")
            if not f:
                continue
            lines.append(f"| {r['K']} | {r['n']:.0e} | {_pct(f.get('sum_rows'))} | {_pct(f.get('gram'))} | "
                         f"{_pct(f.get('gram_f64'))} | {_pct(f.get('combine'))} | {_pct(f.get('hrgrad'))} | "
                         f"{_ok(r['ratios'].get('hrgrad_vs_sum_rows'), 1.3)} |")
        return "\n".join(lines)
    lines = [head, "", "| op | N | V | fused fwd op | fused bwd op | ext step | ext / compiled (GPU target 0.5) |",
             "|---|---|---|---|---|---|---|"]
    for c in run["cases"]:
        f = c.get("floor", {})
        lines.append(f"| {c['op'].replace('_residuals', '')} | {c['N']} | {c['V']} | {_pct(f.get('ext_forward_op'))} | "
                     f"{_pct(f.get('ext_backward_op'))} | {_pct(f.get('ext'))} | "
                     f"{_ok(c['ratios'].get('ext_vs_compiled'), 0.5)} |")
    return "\n".join(lines)


def main(paths: list[str]) -> int:
    for path in paths:
        for run in _runs(path):
            kind = run.get("benchmark")
            table = {"gram": gram_table, "kinetic": kinetic_table, "train_step": train_table}.get(kind)
            if table is None:
                print(f"{path}: unknown benchmark {kind!r}", file=sys.stderr)
                continue
            print(f"<!-- {path} -->\n{table(run)}\n")
            if kind in ("gram", "kinetic") and (floors := floor_table(run)):
                print(f"{floors}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
