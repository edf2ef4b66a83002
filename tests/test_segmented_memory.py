"""keep_freed_memory: the segmented CPU path's fix for page-faulting K-fold activations."""

import ctypes
import ctypes.util
import sys

import pytest
import torch

from hrgrad_ext.train import segmented


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mmapped_bytes() -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _Mallinfo2
    return libc.mallinfo2().hblkhd


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_keep_freed_memory_serves_large_tensors_from_the_heap():
    if not segmented.keep_freed_memory():
        pytest.skip("not glibc")
    assert segmented.keep_freed_memory()  # idempotent
    try:
        base = _mmapped_bytes()
    except AttributeError:
        pytest.skip("glibc without mallinfo2")
    # 64 MB: above glibc's largest mmap threshold (32 MB), so by default a fresh mapping that
    # is unmapped on free and page-faulted (16k pages) again on the next step
    big = torch.ones(16 * 2**20)
    assert big.sum() == big.numel()
    assert _mmapped_bytes() - base < 2**20


def test_keep_freed_memory_opt_out(monkeypatch):
    monkeypatch.setattr(segmented, "_KEPT", None)
    monkeypatch.setenv("HRGRAD_EXT_KEEP_FREED_MEMORY", "0")
    assert segmented.keep_freed_memory() is False
