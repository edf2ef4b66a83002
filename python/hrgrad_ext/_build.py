"""Loading the compiled core and reporting what it contains.

Two native libraries make up the compiled core:

* ``_C``: op schemas and the CPU/CUDA kernels, built on the LibTorch stable ABI. It runs on
  every torch from ``torch_min_version`` (2.10) on, whatever torch it was built with.
* ``libhrgrad_autograd.so``: the C++ autograd of the ops (forward mode, differentiable double
  backward, torch.func transforms). The stable ABI has no autograd, so this library is
  compiled against the full C++ API of one torch release and loads only under that release.
  Under any other torch the ops get the Python autograd of :mod:`hrgrad_ext.ops._autograd`
  (first-order reverse mode; a clear error for double backward and forward mode).

``HRGRAD_EXT_AUTOGRAD=python`` forces the Python autograd (tests of that path);
``HRGRAD_EXT_AUTOGRAD=cpp`` demands the C++ one (import fails when it cannot load).
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import torch

MIN_TORCH = (2, 10)
AUTOGRAD_ENV = "HRGRAD_EXT_AUTOGRAD"


def _release(version: str) -> tuple[int, ...]:
    """(2, 14, 1) for "2.14.1+cu130" or "2.15.0a0+git123"."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        return (0, 0, 0)
    return tuple(int(x or 0) for x in match.groups())


def _check_torch_range() -> None:
    if _release(torch.__version__)[:2] < MIN_TORCH:
        raise ImportError(
            f"hrgrad_ext needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (its compiled core uses the LibTorch "
            f"stable ABI of torch {MIN_TORCH[0]}.{MIN_TORCH[1]}); found torch {torch.__version__}. "
            f"Upgrade torch: pip install 'torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}'"
        )


_check_torch_range()


def _expose_torch_symbols() -> None:
    """Makes the libraries torch has loaded globally visible, so that the compiled core resolves
    its torch symbols against the running torch (it does not link torch: a wheel must not
    carry a path to, or a copy of, any particular torch). RTLD_NOLOAD: nothing new is loaded."""
    lib = Path(torch.__file__).resolve().parent / "lib"
    for name in ("libc10.so", "libtorch_cpu.so", "libtorch.so", "libc10_cuda.so", "libtorch_cuda.so"):
        if (lib / name).exists():
            try:
                ctypes.CDLL(str(lib / name), mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
            except OSError:  # not loaded by this torch (e.g. no CUDA libraries in use)
                pass


_expose_torch_symbols()

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only on broken installs
    raise ImportError(
        "hrgrad_ext: the compiled core (hrgrad_ext._C) failed to load under torch "
        f"{torch.__version__} (supported: torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}). Reinstall the wheel for "
        "your platform, or build from source with `pip install --no-build-isolation .`. "
        "Original error: " + str(exc)
    ) from exc

_AUTOGRAD_LIBRARY = Path(__file__).with_name("libhrgrad_autograd.so")


def _load_autograd() -> tuple[str, str]:
    """Loads the C++ autograd when it matches the running torch; returns (kind, why)."""
    mode = os.environ.get(AUTOGRAD_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "cpp", "python"):
        raise ImportError(f"hrgrad_ext: {AUTOGRAD_ENV} must be auto, cpp or python, got {mode!r}")
    if mode == "python":
        return "python", f"{AUTOGRAD_ENV}=python"
    built = _C.build_info()["torch_version"]
    if not _AUTOGRAD_LIBRARY.exists():
        why = f"{_AUTOGRAD_LIBRARY.name} is not installed next to the compiled core"
    elif _release(built) != _release(torch.__version__):
        why = f"the C++ autograd was built for torch {built}, this is torch {torch.__version__}"
    else:
        torch.ops.load_library(str(_AUTOGRAD_LIBRARY))
        return "cpp", f"built for torch {built}"
    if mode == "cpp":
        raise ImportError(f"hrgrad_ext: {AUTOGRAD_ENV}=cpp but the C++ autograd cannot be used: {why}")
    return "python", why


AUTOGRAD, AUTOGRAD_WHY = _load_autograd()


def build_info() -> dict:
    """What this build of the extension contains.

    Returns a dict with ``cuda`` (bool: CUDA kernels compiled in), ``cuda_archs`` (the
    architectures, e.g. ``"80-real,90"``), ``nvcc_version``, ``torch_version`` (the torch it
    was built against), ``torch_min_version`` (the oldest torch the kernels run on: they use
    the LibTorch stable ABI), ``stable_abi``, ``torch_cuda_version`` (CUDA version of the
    running torch), ``autograd`` (``"cpp"``: the C++ autograd built for this torch is loaded;
    ``"python"``: the Python autograd is used) with ``autograd_reason``, ``compiler`` and
    ``cxx11_abi``.
    """
    info = dict(_C.build_info())
    info["torch_cuda_version"] = torch.version.cuda
    info["autograd"] = AUTOGRAD
    info["autograd_reason"] = AUTOGRAD_WHY
    return info


def cuda_available() -> bool:
    """True when the CUDA kernels are compiled in and a CUDA device is visible."""
    return bool(_C.build_info()["cuda"]) and torch.cuda.is_available()
