#!/usr/bin/env bash
# The emulation tests against an AddressSanitizer build of the emulated CUDA kernels:
# out-of-bounds accesses in global memory (tensors), shared memory (each __shared__ array and
# the dynamic shared memory are allocations of exactly their size) and local arrays.
#   tests/cuda_emu/run_asan.sh [PYTEST ARGS...]      # from anywhere; the venv active
# The Python process needs the sanitizer's runtime loaded first (LD_PRELOAD); the build goes to
# build/cuda-emu-asan. The first error stops the run with the access and its line in the .cu file.
set -euo pipefail
cd "$(dirname "$0")/../.."
cxx=${CXX:-c++}
libasan=$("$cxx" -print-file-name=libasan.so)
[ -f "$libasan" ] || { echo "run_asan: no AddressSanitizer runtime (libasan.so) for $cxx" >&2; exit 1; }
# libstdc++ too: the sanitizer intercepts __cxa_throw, which must resolve to the system one
export LD_PRELOAD="$libasan $("$cxx" -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:halt_on_error=1:detect_stack_use_after_return=0}
export HRGRAD_CUDA_EMU_ASAN=1
exec python3 -m pytest -q -p no:cacheprovider tests/test_cuda_emulation.py -m "cuda_emu or not cuda" "$@"
