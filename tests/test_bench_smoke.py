"""The benchmark scripts run end to end on tiny sizes and their tables render (no timings checked)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script, *args):
    subprocess.run([sys.executable, str(BENCH / script), *args], check=True, cwd=BENCH, capture_output=True)


def test_gram_and_kinetic_benchmarks_write_json_and_tables(tmp_path):
    gram, kin = tmp_path / "gram.json", tmp_path / "kinetic.json"
    _run("bench_gram.py", "--device", "cpu", "--K", "3", "--n", "1000", "--rounds", "1", "--warmup", "1",
         "--threads", "1", "--out", str(gram))
    _run("bench_kinetic.py", "--device", "cpu", "--sizes", "7", "--velocities", "5", "--rounds", "1", "--warmup", "1",
         "--no-compile", "--threads", "1", "--out", str(kin))
    g, k = json.loads(gram.read_text()), json.loads(kin.read_text())
    assert g["threads"] == 1 and g["machine"]["cpu_model"]
    assert {"gram_vs_mm", "combine_vs_wJ", "hrgrad_vs_gram_f64_plus_combine"} <= set(g["records"][0]["ratios"])
    assert {c["op"] for c in k["cases"]} == {"bgk_residuals", "transport_mm_residuals", "maxwellian", "velocity_moments"}
    out = subprocess.run([sys.executable, str(BENCH / "summary.py"), str(gram), str(kin)], check=True,
                         capture_output=True, text=True).stdout
    assert "gram vs `J @ J.T`" in out and "ext / compiled" in out


def test_macro_jets_benchmark_checks_both_ways_and_writes_json(tmp_path):
    # the benchmark first checks that Taylor mode and torch.func give the same numbers
    out = tmp_path / "jets.json"
    _run("bench_macro_jets.py", "--points", "4", "--macro-width", "8", "--rounds", "1", "--warmup", "1",
         "--threads", "1", "--out", str(out))
    r = json.loads(out.read_text())
    assert r["threads"] == 1 and {c["case"] for c in r["records"]} == {"macro", "macro_ce"}
    assert all(c["torch_func_over_jets"] > 0 for c in r["records"])
