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


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
