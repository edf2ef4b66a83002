"""Loading the compiled core and reporting what it contains."""

from __future__ import annotations

import torch

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only on broken installs
    raise ImportError(
        "hrgrad_ext: the compiled core (hrgrad_ext._C) failed to load. It must be built against "
        f"the torch that is installed (found torch {torch.__version__}); reinstall with "
        "`pip install --no-build-isolation .`. Original error: " + str(exc)
    ) from exc


def _check_torch_version() -> None:
    built = _C.build_info()["torch_version"]
    # A C++ extension is tied to the torch release it was compiled against (ABI of c10/ATen).
    if built.split("+")[0] != torch.__version__.split("+")[0]:
        raise ImportError(
            f"hrgrad_ext was compiled against torch {built} but torch {torch.__version__} is "
            "installed; rebuild it with `pip install --no-build-isolation --force-reinstall .`"
        )


_check_torch_version()


def build_info() -> dict:
    """What this build of the extension contains.

    Returns a dict with ``cuda`` (bool: CUDA kernels compiled in), ``cuda_archs`` (the
    architectures, e.g. ``"80-real,90"``), ``nvcc_version``, ``torch_version`` (the torch it
    was built against), ``torch_cuda_version`` (CUDA version of the running torch),
    ``compiler`` and ``cxx11_abi``.
    """
    info = dict(_C.build_info())
    info["torch_cuda_version"] = torch.version.cuda
    return info


def cuda_available() -> bool:
    """True when the CUDA kernels are compiled in and a CUDA device is visible."""
    return bool(_C.build_info()["cuda"]) and torch.cuda.is_available()
