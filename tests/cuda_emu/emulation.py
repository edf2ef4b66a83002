"""Builds and loads the CPU emulation of the project's CUDA kernels.

    from cuda_emu import emulation
    ops = emulation.load()        # torch.ops.hrgrad_ext_emu: every CUDA op, taking CPU tensors

Every ``csrc/**/*_cuda.cu`` is compiled as C++ against ``cuda_emulator.h`` (through
``csrc/common/cuda_kernel.h``), together with the emulator and the self-test kernels, into one
library built with ``torch.utils.cpp_extension`` under ``build/cuda-emu`` (incremental: a
second build recompiles only what changed). The CUDA ops register as ``hrgrad_ext_emu::<op>``
for CPU tensors, with the schemas of ``hrgrad_ext::<op>`` copied at load time, so a new op
needs nothing here. ``load(asan=True)`` builds with AddressSanitizer instead; the process must
then have been started with the sanitizer's runtime preloaded (``tests/cuda_emu/run_asan.sh``).
"""

from __future__ import annotations

import logging
import os
import platform
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
NAMESPACE = "hrgrad_ext_emu"

# What a .cu file must not contain for the emulation build to compile it (cuda_kernel.h says
# what to write instead), checked before compiling so that the error says so.
CONVENTIONS = (
    (r"<<<", "launch with cuda::launch<kernel>({grid, block, dynamic_smem}, args...) instead of <<<...>>>"),
    (r"\b__shared__\b", "declare shared memory with HRGRAD_SHARED(type, name, [dims]) or HRGRAD_DYNAMIC_SHARED"),
    (r"\bTORCH_LIBRARY_IMPL\b", "register the kernels with HRGRAD_EXT_CUDA_KERNELS(m)"),
    (r"#\s*include\s*[<\"](cuda_runtime|cuda\.h|c10/cuda/|ATen/cuda/)",
     "include \"common/cuda_kernel.h\" instead of CUDA or c10/cuda headers"),
)


def cuda_sources() -> list[Path]:
    return sorted((ROOT / "csrc").rglob("*_cuda.cu"))


def _without_comments(text: str) -> str:
    """Comments and string literals blanked, newlines kept (so line numbers stay)."""
    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    return re.sub(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"', blank, text, flags=re.S)


def convention_problems(path: Path) -> list[str]:
    text = path.read_text()
    code = _without_comments(text)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    problems = []
    for number, line in enumerate(code.splitlines(), 1):
        for pattern, fix in CONVENTIONS:
            if re.search(pattern, line):
                problems.append(f"{shown}:{number}: {fix}")
    if '#include "common/cuda_kernel.h"' not in text:
        problems.append(f"{shown}: include \"common/cuda_kernel.h\"")
    return problems


class ConventionError(RuntimeError):
    pass


def _has_fma() -> bool:
    if platform.machine() != "x86_64":
        return False
    try:
        return " fma " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


def build(asan: bool = False, verbose: bool = False) -> str:
    """Compiles the emulation library; returns its path."""
    sources = cuda_sources() + [HERE / "selftest_cuda.cu"]
    problems = [p for cu in sources for p in convention_problems(cu)]
    if problems:
        raise ConventionError("the CUDA sources break the emulation conventions:\n" + "\n".join(problems))
    build_dir = ROOT / "build" / ("cuda-emu-asan" if asan else "cuda-emu")
    build_dir.mkdir(parents=True, exist_ok=True)
    # Each .cu is compiled as C++ through a one-line wrapper (torch.utils.cpp_extension would
    # hand a .cu file to nvcc); errors and __FILE__ still name the .cu file.
    units = [str(HERE / "cuda_emulator.cpp")]
    for cu in sources:
        wrapper = build_dir / (str(cu.relative_to(ROOT)).replace(os.sep, "__") + ".cpp")
        text = f'#include "{cu}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        units.append(str(wrapper))
    cflags = ["-std=c++20", "-DHRGRAD_EXT_CUDA_EMULATION", "-Wno-unknown-pragmas", "-Wno-unused-function",
              # nvcc contracts a * b + c into one rounding; so does the emulation, where the CPU can
              "-ffp-contract=fast", *(["-mfma"] if _has_fma() else []),
              # uninitialised locals hold a pattern, not whatever the stack had
              "-ftrivial-auto-var-init=pattern"]
    ldflags = []
    if asan:
        cflags += ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    else:
        cflags += ["-O2"]
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
    import torch.utils.cpp_extension as cpp_extension

    env_preload = os.environ.pop("LD_PRELOAD", None)  # the compilers must not run under ASan
    try:
        os.environ.setdefault("MAX_JOBS", "2")
        path = cpp_extension.load(
            name="hrgrad_ext_cuda_emu" + ("_asan" if asan else ""),
            sources=units,
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            extra_include_paths=[str(ROOT / "csrc"), str(HERE)],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=verbose,
        )
    finally:
        if env_preload is not None:
            os.environ["LD_PRELOAD"] = env_preload
    return str(path)


_libraries: dict[str, torch.library.Library] = {}


def load(asan: bool = False):
    """Builds (if needed) and loads the emulation; returns ``torch.ops.hrgrad_ext_emu``."""
    import hrgrad_ext  # noqa: F401  (the CPU kernels and the schemas of torch.ops.hrgrad_ext)

    if NAMESPACE not in _libraries:
        build(asan=asan)  # cpp_extension.load has loaded it into the process
        # The emulated kernels register as hrgrad_ext_emu::<op> (CPU); the schemas are those of
        # hrgrad_ext::<op>, whatever ops the project has.
        library = torch.library.Library(NAMESPACE, "DEF")
        for schema in torch._C._jit_get_all_schemas():
            if schema.name.startswith("hrgrad_ext::"):
                library.define(str(schema).split("::", 1)[1])
        _libraries[NAMESPACE] = library
    return getattr(torch.ops, NAMESPACE)


def control():
    """``torch.ops.hrgrad_cuda_emu``: configure(multiprocessors, thread_order), launched_kernels(),
    plant(fault, file, line, first_lane), clear_plants()."""
    load()
    return torch.ops.hrgrad_cuda_emu
