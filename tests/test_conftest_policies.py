"""The test-suite policies of ``tests/conftest.py``, checked on small inner test sessions:

* CUDA tests are selected by the ``cuda`` marker (skipped without a device), not by name; a
  test with a CUDA device parameter but without the marker is refused at collection;
* a cross-check against a required third-party package (conflictfree) that cannot be imported
  fails instead of skipping, unless ``HRGRAD_EXT_ALLOW_MISSING`` names the package.
"""

import sys
from pathlib import Path

import pytest

import hrgrad_ext

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


@pytest.fixture
def inner(pytester):
    pytester.makeconftest(CONFTEST)
    return pytester


INNER_TESTS = """
import pytest
import hrgrad_ext

@pytest.mark.cuda
def test_marked():
    assert hrgrad_ext.cuda_available()

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_device(device):
    assert device == "cpu" or hrgrad_ext.cuda_available()

def test_plain():
    pass

def test_cross_check():
    pytest.importorskip("conflictfree")
"""


def test_device_marker_and_required_packages(inner, monkeypatch):
    inner.makepyfile(test_inner=INNER_TESTS,
                     test_inner_module='import pytest\nconflictfree = pytest.importorskip("conflictfree")\n\n'
                                       'def test_module_cross_check():\n    pass\n')
    monkeypatch.setitem(sys.modules, "conflictfree", None)  # import conflictfree -> ImportError
    monkeypatch.delenv("HRGRAD_EXT_ALLOW_MISSING", raising=False)
    args = ("-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "--continue-on-collection-errors")
    gpu = hrgrad_ext.cuda_available()
    # CUDA tests go by their marker: skipped without a device, run with one; the cross-check
    # fails (in a test or at module level) while its package is missing
    result = inner.runpytest(*args)
    result.assert_outcomes(passed=4 if gpu else 2, skipped=0 if gpu else 2, failed=1, errors=1)
    result.stdout.fnmatch_lines(["*conflictfree is not installed*HRGRAD_EXT_ALLOW_MISSING=conflictfree*"])
    # ... and skips when the environment allows it
    monkeypatch.setenv("HRGRAD_EXT_ALLOW_MISSING", "hypothesis, conflictfree")
    result = inner.runpytest(*args)
    result.assert_outcomes(passed=4 if gpu else 2, skipped=2 if gpu else 4)


def test_an_unmarked_cuda_device_parameter_is_refused(inner):
    inner.makepyfile(test_inner="""
        import pytest
        import torch

        def test_about_cuda_sources():  # a CPU test may mention cuda in its name
            pass

        @pytest.mark.parametrize("device", ["cpu", "cuda"])
        def test_device(device):
            pass

        @pytest.mark.parametrize("device", [torch.device("cuda:1")])
        def test_second_device(device):
            pass
    """)
    result = inner.runpytest("-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*not marked @pytest.mark.cuda*test_device?cuda?*test_second_device*"])
    assert "test_about_cuda_sources" not in result.stderr.str()
