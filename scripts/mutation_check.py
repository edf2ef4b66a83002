#!/usr/bin/env python3
"""Mutation check: do the tests notice deliberate one-line bugs?

Each mutation in ``scripts/mutations.toml`` names a file, an exact snippet of it, a replacement
(a small deliberate bug) and the tests that must catch it. The tool copies the working tree
(tracked and untracked-but-not-ignored files) to a temporary directory, builds the compiled core
of the copy CPU-only, and then, one mutation at a time: applies it, rebuilds the copy if the
mutation is in C++, runs the mutation's tests there, and restores the file. A mutation is

* ``caught``    when its tests fail (or fail to import / collect),
* ``survived``  when they pass: the suite cannot tell the bug from the real code,
* ``stale``     when its snippet no longer occurs exactly once in its file (the list needs
                updating after a change of that code; an error, never skipped silently),
* ``error``     when its build fails or its test selection is broken (no tests, usage error).

Run on demand (not part of CI; a full run takes minutes, most of it the C++ rebuilds)::

    python scripts/mutation_check.py                    # every mutation
    python scripts/mutation_check.py --only trainer-    # ids starting with any of the prefixes
    python scripts/mutation_check.py --check            # only: does every snippet still match?
    python scripts/mutation_check.py --list

Needs what the README's build needs (cmake >= 3.26, ninja, pybind11, a C++20 compiler, torch) and
the test requirements. The build of the copy is done here, with the commands in
:func:`build_copy` (a CPU-only CMake build, ``-DHRGRAD_EXT_CUDA=0``); with ``--prebuilt`` and no
C++ mutation selected, the in-place build ``python/hrgrad_ext/_C*.so`` of this tree is reused
when it is newer than every file under ``csrc/``.

Exit status: 0 every selected mutation caught; 1 some survived; 2 stale or error (or the
unmutated tests fail, which makes every result meaningless).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LIST = ROOT / "scripts" / "mutations.toml"
COMPILED = (".cpp", ".cu", ".h", ".cuh", ".inc")
BUILD_DIR = "build/mutation-check"


@dataclasses.dataclass
class Mutation:
    id: str
    file: str
    original: str
    replacement: str
    tests: list[str]
    why: str = ""

    @property
    def compiled(self) -> bool:
        return self.file.endswith(COMPILED)


@dataclasses.dataclass
class Result:
    id: str
    file: str
    status: str
    seconds: float = 0.0
    detail: str = ""


def load_mutations(path: Path) -> list[Mutation]:
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    out, seen = [], set()
    for i, entry in enumerate(data.get("mutation", [])):
        missing = {"id", "file", "original", "replacement", "tests"} - set(entry)
        if missing:
            raise SystemExit(f"{path}: mutation #{i + 1} lacks {sorted(missing)}")
        m = Mutation(**entry)
        if m.id in seen:
            raise SystemExit(f"{path}: duplicate mutation id {m.id!r}")
        if m.original == m.replacement or not m.tests:
            raise SystemExit(f"{path}: mutation {m.id!r} changes nothing or has no tests")
        seen.add(m.id)
        out.append(m)
    return out


def match_count(tree: Path, m: Mutation) -> int:
    path = tree / m.file
    return path.read_text().count(m.original) if path.is_file() else 0


def copy_tree(dest: Path) -> None:
    """The files git would commit (tracked, and untracked ones it does not ignore)."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listing):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _run(cmd: list[str], cwd: Path, log: Path, timeout: float | None = None) -> bool:
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            return subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:
            fh.write(f"timed out after {timeout} s\n")
            return False


AUTOGRAD_LIBRARY = "libhrgrad_autograd.so"


def _cmake() -> str:
    """The cmake the README's build uses: the pip `cmake` package's (requirements-build.txt pins
    it to >= 3.26) when installed, else the first on PATH. A system cmake first on PATH can be
    older than CMakeLists.txt requires (Debian 12 ships 3.25), and scikit-build-core skips it."""
    try:
        import cmake

        candidate = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if candidate.is_file():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    return "cmake"


def build_copy(tree: Path, jobs: int, log: Path) -> bool:
    """CPU-only build of the copy's compiled core, installed in place (python/hrgrad_ext/_C*.so).
    Incremental after the first call (only changed sources are recompiled)."""
    bdir = tree / BUILD_DIR
    if not (bdir / "CMakeCache.txt").is_file():
        import pybind11

        cmd = [_cmake(), "-S", str(tree), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release", "-DHRGRAD_EXT_CUDA=0",
               f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
        if shutil.which("ninja"):
            cmd += ["-G", "Ninja"]
        if not _run(cmd, tree, log):
            return False
    if not _run([_cmake(), "--build", str(bdir), "-j", str(jobs)], tree, log):
        return False
    built = list(bdir.glob("_C*.so")) + list(bdir.glob("_C*.pyd"))
    if len(built) != 1:
        return False
    for old in (tree / "python" / "hrgrad_ext").glob("_C*.so"):
        old.unlink()
    shutil.copy2(built[0], tree / "python" / "hrgrad_ext" / built[0].name)
    # the C++ autograd (a library of its own; without it the tests would run the Python autograd)
    if (bdir / AUTOGRAD_LIBRARY).is_file():
        shutil.copy2(bdir / AUTOGRAD_LIBRARY, tree / "python" / "hrgrad_ext" / AUTOGRAD_LIBRARY)
    return True


def prebuilt_core() -> Path | None:
    """This tree's in-place build, if it is newer than every compiled source."""
    found = sorted((ROOT / "python" / "hrgrad_ext").glob("_C*.so"))
    if len(found) != 1:
        return None
    newest_source = max(p.stat().st_mtime for p in [*(ROOT / "csrc").rglob("*"), ROOT / "CMakeLists.txt"] if p.is_file())
    return found[0] if found[0].stat().st_mtime > newest_source else None


def run_tests(tree: Path, args: list[str], timeout: float) -> tuple[int | None, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "python"), *filter(None, [env.get("PYTHONPATH")])])
    # the hypothesis plugin only adds a (slow) summary; @given tests run without it
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", *args]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    return proc.returncode, proc.stdout + proc.stderr


def baseline_runs(selections: list[list[str]]) -> list[list[str]]:
    """The selections merged into few pytest runs (each run costs a Python start-up): the
    plain ones (paths, node ids) into one, those of the form ``PATHS... -k EXPR`` with the same
    paths into one ``-k "(EXPR1) or (EXPR2) ..."``; anything else runs as it is."""
    plain, by_paths, other = [], {}, []
    for sel in selections:
        if "-k" not in sel and all(not a.startswith("-") for a in sel):
            plain += [a for a in sel if a not in plain]
        elif sel.count("-k") == 1 and sel.index("-k") == len(sel) - 2 and not any(a.startswith("-") for a in sel[:-2]):
            exprs = by_paths.setdefault(tuple(sel[:-2]), [])
            if sel[-1] not in exprs:
                exprs.append(sel[-1])
        elif sel not in other:
            other.append(sel)
    runs = [plain] if plain else []
    runs += [[*paths, "-k", " or ".join(f"({e})" for e in exprs)] for paths, exprs in by_paths.items()]
    return runs + other


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line
    return output.strip().splitlines()[-1] if output.strip() else ""


def syntax_error(path: Path) -> str:
    """'' if the file compiles, else the error: a mutation must stay a valid program (a syntax
    error fails any suite and says nothing about the tests)."""
    try:
        compile(path.read_text(), str(path), "exec")
    except SyntaxError as exc:
        return str(exc)
    return ""


def classify(rc: int | None, output: str) -> tuple[str, str]:
    if rc is None:
        return "caught", output + " (a hang counts as caught: the suite would not finish)"
    if rc == 0:
        return "survived", "its tests pass"
    if rc in (1, 2):  # test failures; interrupted (e.g. an import error during collection)
        return "caught", first_failure(output)
    return "error", f"pytest exit status {rc} (no tests collected or bad selection): {first_failure(output)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mutations", type=Path, default=DEFAULT_LIST, help="the mutation list (TOML)")
    p.add_argument("--only", nargs="+", metavar="PREFIX", help="run the mutations whose id starts with a prefix")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--check", action="store_true", help="only check that every snippet matches exactly once")
    p.add_argument("--no-baseline", action="store_true", help="skip running the selected tests on the unmutated copy")
    p.add_argument("--prebuilt", action="store_true", help="reuse this tree's in-place build when no C++ mutation runs")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per test run (default 900)")
    p.add_argument("--keep", action="store_true", help="keep the mutated copy's directory")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    args = p.parse_args(argv)
    # a SIGTERM unwinds like Ctrl-C: the running child is killed and the copy removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    mutations = load_mutations(args.mutations)
    if args.only:
        mutations = [m for m in mutations if m.id.startswith(tuple(args.only))]
        if not mutations:
            print(f"no mutation id starts with {args.only}", file=sys.stderr)
            return 2
    if args.list:
        for m in mutations:
            print(f"{m.id:32} {m.file}\n{'':32} {m.why}")
        return 0

    results: list[Result] = []
    runnable = []
    for m in mutations:
        n = match_count(ROOT, m)
        if n == 1:
            runnable.append(m)
        else:
            what = "no longer occurs" if n == 0 else f"occurs {n} times (make it unique)"
            results.append(Result(m.id, m.file, "stale", detail=f"the original snippet {what} in {m.file}"))
    if args.check:
        print(f"{len(runnable)} of {len(mutations)} snippets occur exactly once")
        return report(results, mutations, args.json) if results else 0

    work = Path(tempfile.mkdtemp(prefix="hrgrad-mutation-"))
    tree, log = work / "tree", work / "build.log"
    print(f"mutation check: {len(runnable)} mutations, copy in {work}", flush=True)
    try:
        copy_tree(tree)
        core = prebuilt_core() if args.prebuilt and not any(m.compiled for m in runnable) else None
        t0 = time.perf_counter()
        if core is not None:
            shutil.copy2(core, tree / "python" / "hrgrad_ext" / core.name)
            if (core.parent / AUTOGRAD_LIBRARY).is_file():
                shutil.copy2(core.parent / AUTOGRAD_LIBRARY, tree / "python" / "hrgrad_ext" / AUTOGRAD_LIBRARY)
        elif not build_copy(tree, args.jobs, log):
            print(f"mutation check: the unmutated copy does not build; see {log}", file=sys.stderr)
            args.keep = True
            return 2
        print(f"  built the copy in {time.perf_counter() - t0:.0f} s", flush=True)
        baseline_core = {p.name: p.read_bytes() for p in (tree / "python" / "hrgrad_ext").glob("_C*.so")}

        if not args.no_baseline:
            for sel in baseline_runs([m.tests for m in runnable]):
                t0 = time.perf_counter()
                rc, out = run_tests(tree, list(sel), args.timeout)
                print(f"  baseline {' '.join(sel)}: {'ok' if rc == 0 else 'FAILS'} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
                if rc != 0:
                    print(f"mutation check: the unmutated tests fail, fix them first:\n{first_failure(out or '')}",
                          file=sys.stderr)
                    return 2

        for m in runnable:
            path = tree / m.file
            source = path.read_text()
            t0 = time.perf_counter()
            path.write_text(source.replace(m.original, m.replacement, 1))
            try:
                if m.file.endswith(".py") and (bad := syntax_error(path)):
                    res = Result(m.id, m.file, "error", detail=f"the mutated file is not valid Python: {bad}")
                elif m.compiled and not build_copy(tree, args.jobs, log):
                    res = Result(m.id, m.file, "error", detail=f"the mutated copy does not build (see {log})")
                else:
                    status, detail = classify(*run_tests(tree, m.tests, args.timeout))
                    res = Result(m.id, m.file, status, detail=detail)
            finally:
                path.write_text(source)
                if m.compiled:  # back to the unmutated core (the build dir recompiles on the next change)
                    for name, blob in baseline_core.items():
                        (tree / "python" / "hrgrad_ext" / name).write_bytes(blob)
            res.seconds = time.perf_counter() - t0
            results.append(res)
            print(f"  {res.status:8} {m.id:34} {res.seconds:5.0f} s  {res.detail[:110]}", flush=True)
        return report(results, mutations, args.json)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(results: list[Result], mutations: list[Mutation], json_path: Path | None) -> int:
    order = {m.id: i for i, m in enumerate(mutations)}
    results.sort(key=lambda r: order[r.id])
    counts = {s: sum(r.status == s for r in results) for s in ("caught", "survived", "stale", "error")}
    print("\n| mutation | file | result | s | detail |\n| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r.id} | {r.file} | {r.status} | {r.seconds:.0f} | {r.detail.replace('|', '/')[:160]} |")
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if json_path:
        json_path.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2) + "\n")
    if counts["stale"] or counts["error"]:
        return 2
    return 1 if counts["survived"] else 0


if __name__ == "__main__":
    sys.exit(main())
