"""scikit-build-core metadata provider: the package version with the build variant as the
local version label, e.g. ``0.1.0+cu130`` or ``0.1.0+cpu``.

The release number is ``__version__`` of python/hrgrad_ext/__init__.py; the label is
``HRGRAD_EXT_LOCAL_VERSION`` (set by scripts/build_wheels.sh: ``cpu``, ``cu130``, ...).
Without it (a plain ``pip install .``) the version has no label.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def dynamic_metadata(field, settings=None):
    if field != "version":
        raise RuntimeError(f"hrgrad_ext_version provides the version only, not {field!r}")
    text = (ROOT / "python" / "hrgrad_ext" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if match is None:
        raise RuntimeError("python/hrgrad_ext/__init__.py has no __version__")
    label = os.environ.get("HRGRAD_EXT_LOCAL_VERSION", "").strip()
    if label and not re.fullmatch(r"[a-z0-9]+(?:\.[a-z0-9]+)*", label):
        raise RuntimeError(f"HRGRAD_EXT_LOCAL_VERSION must be a local version label like cu130 or cpu, got {label!r}")
    return f"{match.group(1)}+{label}" if label else match.group(1)
