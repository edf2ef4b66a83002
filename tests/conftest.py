import pytest
import torch

import hrgrad_ext


def pytest_collection_modifyitems(config, items):
    # CUDA tests run only where the kernels are compiled in and a device is visible.
    if hrgrad_ext.cuda_available():
        return
    reason = "needs a CUDA device and a CUDA build of hrgrad_ext"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


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
