"""Tests of the ``hrgrad-ext`` command line."""

import json
from pathlib import Path

import pytest

from hrgrad_ext.cli import build_parser, main

TINY = ["--set", "model.rho={width = 8, depth = 1}", "--set", "model.g={width = 8, depth = 1}",
        "--set", "points={interior = 6, boundary = 4, initial = 4}", "--set", "nv=8",
        "--eps", "1e-8,1e-7", "--no-progress", "--no-plots"]


def test_demo_prints_every_aggregator(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for m in ("hrgrad", "sum", "pcgrad", "config", "mgda", "upgrad", "mean"):
        assert f"\n{m} " in out
    hr = next(line for line in out.splitlines() if line.startswith("hrgrad"))
    # the published ConFIG value on this J, and equal cosines to both tasks
    assert "0.1588" in hr and hr.count("2.0706") == 2 and hr.count("0.2818") == 2
    sm = next(line for line in out.splitlines() if line.startswith("sum "))
    assert "-0.2722" in sm  # the plain sum conflicts with the first task


def test_demo_custom_and_bad_matrix(capsys):
    assert main(["demo", "--J", "[[1, 0], [0, 1], [1, 1]]"]) == 0
    assert main(["demo", "--J", "not json"]) == 2
    assert "expected a JSON matrix" in capsys.readouterr().err


def test_train_then_resume_with_more_iterations(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--problem", "transport", "--method", "sum", "--iters", "2", "--out", str(out), *TINY]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["iters"] == 2 and s["method"] == "sum" and s["eps"] == [1e-8, 1e-7]
    printed = capsys.readouterr().out
    # the evaluation at the last step and the summary, with the numbers of summary.json
    rho = s["rel_l2"]["1e-08"]["rho"]
    assert f"step 2: rel L2 eps=1e-08: rho {rho:.2e}" in printed
    assert "transport / sum: 2 steps on cpu" in printed and f"rho {rho:.3e}" in printed
    assert f"outputs in {out}" in printed
    assert main(["train", "--resume", str(out), "--iters", "4", "--no-progress"]) == 0
    assert f"resuming {out} at step 2 of 4" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["iters"] == 4
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4


@pytest.mark.parametrize("args,msg", [
    (["--method", "nash"], "unknown method"),
    (["--eps", ""], "task set is empty"),
    (["--eps", "1,0"], "> 0"),
    (["--iters", "0"], "iters"),
    (["--set", "optim.lr"], "key=value"),
])
def test_train_bad_arguments_exit_2_with_message(tmp_path, capsys, args, msg):
    assert main(["train", "--out", str(tmp_path / "x"), *args]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


def test_resume_missing_checkpoint(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_compare_writes_markdown_table(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--problem", "transport", "--methods", "hrgrad,sum", "--iters", "2", "--out", str(out), *TINY]) == 0
    md = (out / "compare.md").read_text()
    assert "| method | eps=1e-08 | eps=1e-07 |" in md
    assert "\n| hrgrad |" in md and "\n| sum |" in md
    for m in ("hrgrad", "sum"):  # one directory per seed, also for a single seed
        assert (out / m / "seed0" / "summary.json").is_file()
    assert "first evaluation (only at the last step)" in md  # 2 steps: one evaluation
    assert main(["compare", "--methods", "hrgrad,bogus", "--out", str(out)]) == 2


def test_compare_over_seeds_reports_median_and_range(tmp_path):
    from hrgrad_ext.train.compare import markdown_table

    out = tmp_path / "cmp"
    assert main(["compare", "--problem", "transport", "--methods", "sum", "--seeds", "3,4", "--iters", "2",
                 "--out", str(out), *TINY]) == 0
    runs = json.loads((out / "compare.json").read_text())["sum"]
    assert [r["seed"] for r in runs] == [3, 4] and (out / "sum" / "seed4" / "summary.json").is_file()
    # two seeds train differently, and the cell is their median with the range
    a, b = (r["rel_l2"]["1e-08"]["rho"] for r in runs)
    assert a != b
    md = (out / "compare.md").read_text()
    assert "seeds 3, 4" in md and f"{(a + b) / 2:.2e} [{min(a, b):.1e}, {max(a, b):.1e}]" in md
    # by hand: three seeds -> the median is the middle value
    fake = [{**runs[0], "seed": s, "rel_l2": {"1e-08": {"rho": v}, "1e-07": {"rho": v}}} for s, v in ((0, 0.3), (1, 0.1), (2, 0.2))]
    assert "| sum | 2.00e-01 [1.0e-01, 3.0e-01] |" in markdown_table({"sum": fake})
    assert main(["compare", "--methods", "sum", "--seeds", "1,x", "--out", str(out)]) == 2
    assert main(["compare", "--methods", "sum", "--seeds", "1,1", "--out", str(out)]) == 2


def test_reference_subcommand_registered_when_available():
    try:
        from hrgrad_ext.reference import cli as ref_cli  # noqa: F401
    except ImportError:
        pytest.skip("hrgrad_ext.reference.cli not available in this build")
    if not hasattr(ref_cli, "add_parser"):
        pytest.skip("hrgrad_ext.reference.cli has no add_parser")
    assert "reference" in build_parser()._subparsers._group_actions[0].choices
