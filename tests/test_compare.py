"""The study machinery of ``hrgrad-ext compare``: method lists, the report (median and range over
seeds, times, runs that diverged, NaN), steps to accuracy, the figure, and a study that is
interrupted, resumed, rerun and run in two processes. Tiny transport configs (a few steps)."""

import json
import math
from pathlib import Path

import pytest
from test_cli import TINY

from hrgrad_ext.aggregators import METHODS
from hrgrad_ext.cli import main
from hrgrad_ext.train.compare import (RunResult, markdown_table, resolve_methods, run_compare,
                                      steps_to_accuracy)
from hrgrad_ext.train.config import apply_overrides, default_config
from hrgrad_ext.train.faults import NONFINITE_ENV
from hrgrad_ext.train.trainer import Trainer


def test_methods_all_is_every_registered_method():
    assert resolve_methods("all") == list(METHODS)
    assert resolve_methods("sum,all") == ["sum", *[m for m in METHODS if m != "sum"]]
    assert resolve_methods(["hrgrad", "hrgrad", "lra"]) == ["hrgrad", "lra"]
    for bad, match in [("", "no methods"), ("sum,nash", "unknown method")]:
        with pytest.raises(ValueError, match=match):
            resolve_methods(bad)


def _summary(seed, errs, wall=10.0, ms=5.0):
    return {"problem": "transport", "case": None, "iters": 4, "device": "cpu (1 threads)", "dtype": "float32",
            "tasks": ["a", "b"], "parameters": 9, "seed": seed, "wall_time_s": wall, "step_time_ms": ms,
            "rel_l2": {"1": {"rho": errs[0]}, "0.1": {"rho": errs[1]}}}


def _evals(*rows):
    return [{"step": s, "rel_l2": {"1": {"rho": a}, "0.1": {"rho": b}}} for s, a, b in rows]


def test_steps_to_accuracy_is_the_first_evaluation_below_the_threshold_at_every_eps():
    ev = _evals((2, 0.1, 0.01), (4, 0.04, 0.03), (6, 0.01, 0.06), (8, 0.01, 0.015))
    assert steps_to_accuracy(ev, "rho", 5e-2) == 4
    assert steps_to_accuracy(ev, "rho", 2e-2) == 8
    assert steps_to_accuracy(ev, "rho", 1e-3) is None
    assert steps_to_accuracy(_evals((2, float("nan"), 0.0)), "rho", 1.0) is None


def test_report_keeps_diverged_and_nan_runs():
    ok = [RunResult("hrgrad", s, Path("."), "done", _summary(s, e, wall=w, ms=m), None, _evals((2, *e)))
          for s, e, w, m in [(0, (0.03, 0.01), 10, 4), (1, (0.01, 0.04), 30, 6), (2, (0.02, 0.02), 20, 5)]]
    sick = [RunResult("sum", 0, Path("."), "done", _summary(0, (float("nan"), 0.5)), None, []),
            RunResult("sum", 1, Path("."), "diverged", None, "non-finite loss or gradient at step 3", []),
            RunResult("sum", 2, Path("."), "done", _summary(2, (0.2, 0.3)), None, [])]
    gone = [RunResult("lra", s, Path("."), "diverged", None, "non-finite at step 1", []) for s in (0, 1, 2)]
    md = markdown_table({"hrgrad": ok, "sum": sick, "lra": gone})
    assert "| method | eps=1 | eps=0.1 | max | wall time (s) | ms/step | runs |" in md
    assert "| hrgrad | 2.00e-02 [1.0e-02, 3.0e-02] | 2.00e-02 [1.0e-02, 4.0e-02] | 2.00e-02 | 20 | 5 | 3/3 |" in md
    # NaN is counted, not dropped; the diverged seed is named in the runs column and below
    assert "| sum | 2.00e-01 (1 NaN) | 4.00e-01 [3.0e-01, 5.0e-01] | 4.00e-01 | 10 | 5 | 1/3 (seed 0 ended in NaN; " \
           "seed 1 diverged) |" in md
    assert "| lra | - | - | - | - | - | 0/3 (seed 0 diverged; seed 1 diverged; seed 2 diverged) |" in md
    assert "* sum seed 1: diverged: non-finite loss or gradient at step 3" in md
    # steps to accuracy per seed
    assert "| hrgrad | 2 / 2 / 2 | - / - / - |" in md  # 0.02 is not below 0.02


def test_figure_of_a_study(tmp_path):
    from hrgrad_ext.train.plots import plot_compare

    results = {"hrgrad": [RunResult("hrgrad", s, tmp_path, "done", _summary(s, (0.01 * (s + 1), 0.02))) for s in range(3)],
               "sum": [RunResult("sum", 0, tmp_path, "diverged", None, "x")]}
    plot_compare(results, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def _tiny_study(tmp_path, **over):
    args = ["--set", "model.rho={width = 8, depth = 1}", "--set", "model.g={width = 8, depth = 1}",
            "--set", "points={interior = 6, boundary = 4, initial = 4}", "--set", "nv=8"]
    cfg = apply_overrides(default_config("transport"), [a for a in args if a != "--set"] + [
        "eps=[1e-8, 1e-7]", "iters=4", "log.eval_every=2", "log.progress=false", "log.plots=false", "threads=1",
        *[f"{k}={v}" for k, v in over.items()]])
    cfg.out = str(tmp_path / "study")
    return cfg.validate()


def test_study_resumes_an_interrupted_run_and_skips_finished_ones(tmp_path, monkeypatch):
    cfg = _tiny_study(tmp_path)
    # the reference: the same run, uninterrupted, elsewhere
    ref = _tiny_study(tmp_path)
    ref.method, ref.seed, ref.out = "relobralo", 1, str(tmp_path / "ref")
    expected = Trainer(ref).run()["rel_l2"]
    # an interrupted run of the study (the checkpoint of step 2 of 4)
    cut = _tiny_study(tmp_path)
    cut.method, cut.seed, cut.out = "relobralo", 1, str(tmp_path / "study" / "relobralo" / "seed1")
    assert Trainer(cut).run(max_steps=2) is None
    said = []
    run_compare(cfg, "sum,relobralo", cfg.out, [0, 1], say=said.append)
    assert "compare: 4 of 4 runs to train (1 resumed), 1 at a time" in said
    data = json.loads((Path(cfg.out) / "compare.json").read_text())
    assert [r["status"] for r in data["relobralo"]] == ["done", "done"]
    assert data["relobralo"][1]["rel_l2"] == expected  # resumed exactly
    assert "eps=1e-08" in (Path(cfg.out) / "compare.md").read_text()
    # a second time: nothing to train, the same report
    stamp = (Path(cfg.out) / "sum" / "seed0" / "summary.json").stat().st_mtime_ns
    said.clear()
    run_compare(cfg, "sum,relobralo", cfg.out, [0, 1], say=said.append)
    assert said == [f"{m} seed {s}: done ({cfg.out}/{m}/seed{s}), not run again" for m in ("sum", "relobralo")
                    for s in (0, 1)]
    assert (Path(cfg.out) / "sum" / "seed0" / "summary.json").stat().st_mtime_ns == stamp
    # a run directory of another configuration is not silently reused
    with pytest.raises(ValueError, match="holds a run of a different configuration \\(differs in iters\\)"):
        run_compare(_tiny_study(tmp_path, iters=6), "sum", cfg.out, [0, 1])


def test_a_study_split_over_commands_is_one_study(tmp_path):
    # `--seeds 1` here and `--seeds 0,1` later must share seed 1's run: with a single seed the
    # run used to sit in out/<method>, where the next one-seed command took it for its own seed
    cfg = _tiny_study(tmp_path)
    run_compare(cfg, "sum", cfg.out, [1], say=lambda m: None)
    assert (Path(cfg.out) / "sum" / "seed1" / "summary.json").is_file()
    said = []
    run_compare(cfg, "sum", cfg.out, [2], say=said.append)
    assert said[0] == "compare: 1 of 1 runs to train (0 resumed), 1 at a time"
    said.clear()
    run_compare(cfg, "sum", cfg.out, [1, 2], say=said.append)
    assert said == [f"sum seed {s}: done ({cfg.out}/sum/seed{s}), not run again" for s in (1, 2)]
    one, two = (json.loads((Path(cfg.out) / "sum" / f"seed{s}" / "summary.json").read_text()) for s in (1, 2))
    assert (one["seed"], two["seed"]) == (1, 2) and one["rel_l2"] != two["rel_l2"]
    # a one-seed run of the older layout (out/<method>, config of seed 0) is still found
    old = _tiny_study(tmp_path)
    old.method, old.seed, old.out = "sum", 0, str(Path(cfg.out) / "sum")
    Trainer(old).run()
    said.clear()
    run_compare(cfg, "sum", cfg.out, [0, 1], say=said.append)
    assert said == [f"sum seed 0: done ({cfg.out}/sum), not run again",
                    f"sum seed 1: done ({cfg.out}/sum/seed1), not run again"]


def test_a_diverged_run_is_reported_and_not_rerun(tmp_path, monkeypatch):
    cfg = _tiny_study(tmp_path)
    monkeypatch.setenv(NONFINITE_ENV, "3")
    run_compare(cfg, "gradnorm", cfg.out, [0, 1], say=lambda m: None)
    md = (Path(cfg.out) / "compare.md").read_text()
    assert "No run of this study finished." in md
    assert "* gradnorm seed 1: diverged: non-finite loss or gradient at step 3 in task eps=1e-08 (loss nan)" in md
    monkeypatch.delenv(NONFINITE_ENV)
    said = []
    run_compare(cfg, "gradnorm", cfg.out, [0, 1], say=said.append)
    assert said == [f"gradnorm seed {s}: diverged ({cfg.out}/gradnorm/seed{s}), not run again" for s in (0, 1)]


def test_two_jobs_through_the_cli(tmp_path, capsys):
    out = tmp_path / "jobs"
    assert main(["compare", "--problem", "transport", "--methods", "sum,softadapt", "--iters", "2", "--jobs", "2",
                 "--threads", "1", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "started sum seed 0 (fresh)" in printed and "finished softadapt seed 0: exit code 0" in printed
    data = json.loads((out / "compare.json").read_text())
    assert {m: r["status"] for m, r in data.items()} == {"sum": "done", "softadapt": "done"}
    assert "transport / softadapt: 2 steps on cpu (1 threads)" in (out / "softadapt" / "seed0" / "train.log").read_text()
    assert math.isfinite(data["sum"]["rel_l2"]["1e-08"]["rho"])
    assert main(["compare", "--methods", "sum", "--jobs", "0", "--out", str(out)]) == 2
