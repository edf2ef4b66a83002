"""The compiled core is built on the LibTorch stable ABI and loads on every torch >= 2.10; the
C++ autograd is used only under the torch it was built for, the Python autograd elsewhere, with
the same results (test_transforms.py and the op tests run on both paths here)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hrgrad_ext
from hrgrad_ext import _build

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def undefined_symbols(path: Path) -> list[str]:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    out = subprocess.run([nm, "-D", "--undefined-only", str(path)], capture_output=True, text=True, check=True)
    return [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]


def test_kernel_library_uses_only_the_stable_c_abi_of_torch():
    """No C++ symbol of torch (c10::, at::, torch:: mangled names) and no libtorch dependency:
    only the C shims of the stable ABI, resolved against whatever torch is imported."""
    symbols = undefined_symbols(Path(hrgrad_ext._C.__file__))
    cxx_torch = [s for s in symbols if s.startswith(("_ZN3c10", "_ZN2at", "_ZN5torch", "_ZNK3c10", "_ZNK2at"))]
    assert not cxx_torch, f"the kernel library uses torch's C++ ABI: {cxx_torch[:10]}"
    assert any(s.startswith("aoti_torch_") for s in symbols)  # it does use the stable shims
    # every shim it needs at load time is in libtorch_cpu, which every torch build has: the CUDA
    # shims (libtorch_cuda) are looked up when used, so a CUDA wheel imports under a CPU torch
    torch_cpu = Path(torch.__file__).resolve().parent / "lib" / "libtorch_cpu.so"
    defined = set(subprocess.run([shutil.which("nm"), "-D", "--defined-only", str(torch_cpu)], capture_output=True,
                                 text=True, check=True).stdout.split())
    elsewhere = [s for s in symbols if s.startswith(("aoti_torch_", "torch_")) and s not in defined]
    assert not elsewhere, f"shims not in libtorch_cpu (absent from a CPU torch): {elsewhere}"
    readelf = shutil.which("readelf")
    if readelf:
        dyn = subprocess.run([readelf, "-d", hrgrad_ext._C.__file__], capture_output=True, text=True).stdout
        assert "libtorch" not in dyn and "libc10" not in dyn, dyn


def test_build_info_reports_the_torch_range_and_the_autograd_in_use():
    info = hrgrad_ext.build_info()
    assert info["stable_abi"] is True
    assert info["torch_min_version"] == "2.10"
    assert info["autograd"] in ("cpp", "python") and info["autograd_reason"]
    same = _build._release(torch.__version__) == _build._release(info["torch_version"])
    # the C++ autograd is built against every supported torch (>= 2.10) and loads under the
    # torch it was built with
    built = same and _build._release(info["torch_version"]) >= (2, 10)
    if os.environ.get(_build.AUTOGRAD_ENV, "auto") == "auto":
        assert info["autograd"] == ("cpp" if built else "python")


def test_sources_build_against_the_oldest_supported_torch_headers():
    """What a build against torch 2.11's headers needed (found on a lent H200 whose image has
    torch 2.11, 2026-12-04; this machine's torch is newer, so the build here cannot show it):
    the shim-error macro STABLE_TORCH_ERROR_CODE_CHECK is newer than those headers (the kernels
    call HRGRAD_SHIM_CHECK, which falls back to TORCH_ERROR_CODE_CHECK); torch's include
    folder bundles a pybind11 that refuses TORCH_TARGET_VERSION (pybind11's own headers must
    come first); the C++ autograd's graph nodes are held by shared_ptr before torch 2.13 and by
    intrusive_ptr from it on (csrc/autograd/autograd_common.h picks by TORCH_VERSION_MINOR;
    checked by compiling csrc/autograd against the headers of torch 2.10, 2.11, 2.12, 2.13 and
    2.14, and by the op suites under torch 2.11, 2026-12-04)."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
                 if p.suffix in (".h", ".cpp", ".cu", ".inc")
                 and "STABLE_TORCH_ERROR_CODE_CHECK(" in p.read_text().replace("#define HRGRAD_SHIM_CHECK(call) STABLE_TORCH_ERROR_CODE_CHECK(call)", "")]
    assert not offenders, f"call HRGRAD_SHIM_CHECK (csrc/common/tensor.h), not STABLE_TORCH_ERROR_CODE_CHECK: {offenders}"
    cmake = (ROOT / "CMakeLists.txt").read_text()
    pybind, torch_inc = (cmake.index("target_include_directories(_C SYSTEM PRIVATE ${pybind11_INCLUDE_DIRS})"),
                         cmake.index('target_include_directories(_C SYSTEM PRIVATE "${TORCH_ROOT}/include")'))
    assert pybind < torch_inc, "pybind11's include folder must precede torch's for the _C target"
    gate = cmake.index('if(_torch_major_minor VERSION_LESS "2.10")')
    assert gate < cmake.index("add_library(_autograd"), "the C++ autograd is built against torch >= 2.10"
    common = (ROOT / "csrc" / "autograd" / "autograd_common.h").read_text()
    assert "TORCH_VERSION_MINOR >= 13" in common and "torch::autograd::deleteNode" in common
    offenders = [p.name for p in (ROOT / "csrc" / "autograd").glob("*.cpp")
                 if "intrusive_ptr<" in p.read_text() or "make_intrusive<" in p.read_text()]
    assert not offenders, f"hold graph nodes by NodePtr / make_node (autograd_common.h), not intrusive_ptr: {offenders}"


@pytest.mark.parametrize("version, release", [("2.14.1+cu130", (2, 14, 1)), ("2.15.0a0+git1234", (2, 15, 0)),
                                              ("2.10", (2, 10, 0)), ("garbage", (0, 0, 0))])
def test_release_parsing(version, release):
    assert _build._release(version) == release


def test_unsupported_torch_raises_a_clear_import_error(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu126")
    with pytest.raises(ImportError, match=r"hrgrad_ext needs torch >= 2\.10 .* found torch 2\.9\.1\+cu126"):
        _build._check_torch_range()


def test_autograd_selection_by_environment():
    code = "import hrgrad_ext; print(hrgrad_ext.build_info()['autograd'])"
    assert run_python(code, HRGRAD_EXT_AUTOGRAD="python").stdout.strip() == "python"
    bad = run_python(code, HRGRAD_EXT_AUTOGRAD="fortran")
    assert bad.returncode != 0 and "HRGRAD_EXT_AUTOGRAD must be auto, cpp or python" in bad.stderr
    demanded = run_python(code, HRGRAD_EXT_AUTOGRAD="cpp")
    built = hrgrad_ext.build_info()["torch_version"]
    if _build._AUTOGRAD_LIBRARY.exists() and _build._release(torch.__version__) == _build._release(built):
        assert demanded.stdout.strip() == "cpp", demanded.stderr
    else:
        assert demanded.returncode != 0
        assert "HRGRAD_EXT_AUTOGRAD=cpp but the C++ autograd cannot be used" in demanded.stderr


OP_TESTS = ["tests/test_transforms.py", "tests/test_gram_ops.py", "tests/test_kinetic_ops.py", "tests/test_cone_ops.py",
            "tests/test_backward.py"]


def test_op_suites_pass_on_the_other_autograd_path():
    """The autograd-mode matrix (test_transforms.py: every op under every autograd mode and
    torch.func transform, the refusals) and the op tests (gradcheck, opcheck, torch.compile)
    on the path this process does not use: the Python autograd when the C++ one is loaded.
    (Under a torch the C++ autograd was not built for, the Python path is the only one and the
    whole suite runs on it.)"""
    if hrgrad_ext.build_info()["autograd"] == "python":
        pytest.skip("this process already runs every test on the Python autograd")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *OP_TESTS],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HRGRAD_EXT_AUTOGRAD": "python"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def test_version_provider_adds_the_variant_label(monkeypatch):
    spec = importlib.util.spec_from_file_location("hrgrad_ext_version",
                                                  ROOT / "scripts" / "build_support" / "hrgrad_ext_version.py")
    provider = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(provider)
    monkeypatch.delenv("HRGRAD_EXT_LOCAL_VERSION", raising=False)
    assert provider.dynamic_metadata("version") == hrgrad_ext.__version__
    monkeypatch.setenv("HRGRAD_EXT_LOCAL_VERSION", "cu130")
    assert provider.dynamic_metadata("version") == hrgrad_ext.__version__ + "+cu130"
    monkeypatch.setenv("HRGRAD_EXT_LOCAL_VERSION", "cu 130!")
    with pytest.raises(RuntimeError, match="local version label"):
        provider.dynamic_metadata("version")
