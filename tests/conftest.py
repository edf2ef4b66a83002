import os
import shutil

import pytest
import torch

import hrgrad_ext

# Third-party packages that the `test` extra installs (so CI has them) and whose cross-checks
# must not disappear silently: a test that skips because one of them cannot be imported
# (pytest.importorskip) fails instead, unless HRGRAD_EXT_ALLOW_MISSING names it (a comma-separated
# list, or "all"), e.g. HRGRAD_EXT_ALLOW_MISSING=conflictfree on a machine without it.
REQUIRED_TEST_PACKAGES = ("conflictfree",)
ALLOW_MISSING_ENV = "HRGRAD_EXT_ALLOW_MISSING"


def _cuda_parameter(item) -> bool:
    """A parameter of the test is a CUDA device ("cuda", "cuda:1", torch.device("cuda"))."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(str(v) == "cuda" or str(v).startswith("cuda:") for v in params.values()
               if isinstance(v, (str, torch.device)))


def pytest_collection_modifyitems(config, items):
    # CUDA tests are the ones marked `cuda` (by their marker, not by their name: a CPU test may
    # well be about CUDA, e.g. the emulator's); they run only where the kernels are compiled in
    # and a device is visible. A test parametrized over devices whose "cuda" case lacks the
    # marker would run (and fail) on every machine without a GPU: refused at collection.
    unmarked = [item.nodeid for item in items if _cuda_parameter(item) and item.get_closest_marker("cuda") is None]
    if unmarked:
        raise pytest.UsageError("tests with a CUDA device parameter that are not marked @pytest.mark.cuda "
                                "(e.g. pytest.param(\"cuda\", marks=pytest.mark.cuda)): " + ", ".join(unmarked))
    # torch.compile's default backend (inductor) generates and compiles C++ on the CPU: without
    # a C++ compiler (an installed wheel on a user's machine, scripts/install_test.sh) it cannot
    # run at all, whatever the extension does.
    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if cxx):
        no_compiler = pytest.mark.skip(reason="torch.compile's inductor needs a C++ compiler; none is on PATH")
        for item in items:
            if item.get_closest_marker("inductor") is not None:
                item.add_marker(no_compiler)
    if hrgrad_ext.cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and a CUDA build of hrgrad_ext")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def _missing_required_package(report) -> str | None:
    """The required package whose failed import made this report a skip, if any."""
    if not report.skipped:
        return None
    reason = str(report.longrepr)
    allowed = {p.strip() for p in os.environ.get(ALLOW_MISSING_ENV, "").split(",")}
    for name in REQUIRED_TEST_PACKAGES:
        if f"could not import '{name}'" in reason and not ({name, "all"} & allowed):
            return name
    return None


def _fail_missing(report, name: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"{name} is not installed, so this cross-check would be skipped; it is part of the test "
                       f"extra (pip install '.[test]'). Set {ALLOW_MISSING_ENV}={name} to allow skipping it.")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    name = _missing_required_package(report)
    if name:
        _fail_missing(report, name)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # an importorskip at module level skips the whole module during collection
    report = (yield).get_result()
    name = _missing_required_package(report)
    if name:
        _fail_missing(report, name)


@pytest.fixture(scope="session", autouse=True)
def _session_reference_cache(tmp_path_factory):
    # References are computed afresh for the test session (what CI pays), and the user's own
    # cache (~/.cache/hrgrad_ext) is neither read nor written by the tests.
    mp = pytest.MonkeyPatch()
    mp.setenv("HRGRAD_EXT_CACHE", str(tmp_path_factory.mktemp("reference-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
