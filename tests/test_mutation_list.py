"""The mutation list stays usable: every snippet of scripts/mutations.toml still occurs exactly
once in its file and every test file it names exists (the mutation check itself runs on demand:
``python scripts/mutation_check.py``). After changing code that a mutation quotes, update the
mutation (``python scripts/mutation_check.py --check`` lists the stale ones)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_every_snippet_matches_once_and_every_test_file_exists(tool):
    mutations = tool.load_mutations(tool.DEFAULT_LIST)
    assert len(mutations) >= 13
    stale = [m.id for m in mutations if tool.match_count(ROOT, m) != 1]
    assert not stale, f"stale mutations (update scripts/mutations.toml): {stale}"
    for m in mutations:
        paths = [a.split("::")[0] for i, a in enumerate(m.tests) if not a.startswith("-") and m.tests[i - 1] != "-k"]
        assert paths and all((ROOT / p).is_file() for p in paths), f"{m.id}: test files {paths}"


def test_stale_snippets_and_outcomes_are_classified(tool, tmp_path):
    (tmp_path / "a.py").write_text("x = 1\ny = 1\n")
    m = tool.Mutation("m", "a.py", "x = 1", "x = 2", ["tests"])
    assert tool.match_count(tmp_path, m) == 1
    assert tool.match_count(tmp_path, tool.Mutation("m", "a.py", "= 1", "= 2", ["tests"])) == 2  # ambiguous
    assert tool.match_count(tmp_path, tool.Mutation("m", "a.py", "z = 1", "z = 2", ["tests"])) == 0  # stale
    assert tool.match_count(tmp_path, tool.Mutation("m", "b.py", "x", "y", ["tests"])) == 0
    (tmp_path / "bad.py").write_text("norm = pass\n")
    assert tool.syntax_error(tmp_path / "a.py") == "" and "invalid syntax" in tool.syntax_error(tmp_path / "bad.py")
    assert tool.classify(0, "")[0] == "survived"
    assert tool.classify(1, "FAILED tests/t.py::test_a - boom\n") == ("caught", "FAILED tests/t.py::test_a - boom")
    assert tool.classify(2, "ERROR tests/t.py\n")[0] == "caught"  # an import error at collection
    assert tool.classify(5, "no tests ran")[0] == "error"  # a selection that selects nothing
    assert tool.classify(None, "timed out")[0] == "caught"
    runs = tool.baseline_runs([["t/a.py::x"], ["t/b.py", "-k", "u"], ["t/b.py", "-k", "v"], ["t/a.py::x"],
                               ["t/c.py", "-x"]])
    assert runs == [["t/a.py::x"], ["t/b.py", "-k", "(u) or (v)"], ["t/c.py", "-x"]]
