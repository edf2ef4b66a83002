#!/usr/bin/env bash
# The install test: a wheel built here runs under another torch, installed as a user installs it.
#   1. build the CPU wheel here (scripts/build_wheels.sh cpu), against the torch of this
#      environment, unless --wheel gives one;
#   2. create a fresh venv with a *different* torch minor ($TORCH_SPEC, default torch==2.13.0)
#      and pip install the wheel with its test extra; no compiler or build tool is on PATH
#      from here on (PATH holds the venv's bin and a directory of a few plain tools);
#   3. import it, check build_info() (stable ABI, built for this torch, Python autograd under
#      the other torch), and run the test suite against the installed wheel: the tests run
#      from a clean export of the repository (git archive; no compiled file in python/), and the
#      script checks that hrgrad_ext is imported from the venv, not from the tree.
# Tests marked cuda_emu are left out (they compile the CUDA sources with a C++ compiler, which the
# user's machine need not have); cuda tests skip without a GPU.
#
# usage: scripts/install_test.sh [--wheel PATH] [--venv DIR] [-- PYTEST_ARGS...]
#   PYTEST_ARGS default to the whole suite (-q -m "not cuda_emu"); CI passes a bounded subset.
#   TORCH_SPEC (default torch==2.13.0), PYTHON (default python3: the interpreter of the new venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
wheel="" venv="" pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheel) wheel=$(realpath "$2"); shift 2 ;;
    --venv) venv=$2; shift 2 ;;
    --) shift; pytest_args=("$@"); break ;;
    *) echo "install_test: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ ${#pytest_args[@]} -gt 0 ] || pytest_args=(-q -m "not cuda_emu")
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
venv=${venv:-$work/venv}

if [ -z "$wheel" ]; then
  echo "install_test: building the CPU wheel against $(python -c 'import torch; print("torch", torch.__version__)')"
  OUT_DIR="$work/dist" bash scripts/build_wheels.sh cpu
  wheel=$(ls "$work"/dist/hrgrad_ext-*+cpu-*.whl)
fi
built_torch=$(python -c 'import torch; print(torch.__version__)')
echo "install_test: wheel $(basename "$wheel")"

echo "install_test: fresh venv $venv with $TORCH_SPEC"
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/pip" install -q "$TORCH_SPEC"
"$venv/bin/pip" install -q "$wheel[test]"

# The tests and their data, from a clean export of the committed tree (no compiled file).
tree="$work/tree"
mkdir -p "$tree"
git -C "$ROOT" archive HEAD | tar -x -C "$tree"

# No compiler or build tool from here on: PATH is the venv and a few plain tools.
tools="$work/tools"
mkdir -p "$tools"
for t in sh bash env cat ls rm mkdir mktemp grep sed awk sort head tail tr cut date sleep kill ps nproc uname; do
  if command -v "$t" >/dev/null; then ln -s "$(command -v "$t")" "$tools/$t"; fi
done
export PATH="$venv/bin:$tools"
unset PYTHONPATH CC CXX CUDACXX CUDA_HOME
for t in cc gcc g++ c++ clang nvcc cmake ninja make ld; do
  if command -v "$t" >/dev/null; then echo "install_test: $t is on PATH ($(command -v "$t"))" >&2; exit 1; fi
done
cd "$tree"


python - "$built_torch" <<'PY'
import json, sys
import torch, hrgrad_ext
built = sys.argv[1]
info = hrgrad_ext.build_info()
print("install_test: torch", torch.__version__, "| hrgrad_ext from", hrgrad_ext.__file__)
print("install_test: build_info", json.dumps(info))
assert "site-packages" in hrgrad_ext.__file__, "hrgrad_ext was not imported from the venv"
assert info["stable_abi"] and info["torch_min_version"] == "2.10", info
assert info["torch_version"] == built, (info["torch_version"], built)
same = torch.__version__.split("+")[0] == built.split("+")[0]
assert info["autograd"] == ("cpp" if same else "python"), info
assert not same, f"the venv's torch {torch.__version__} is the build's torch: not an install test"
PY

echo "install_test: python -m pytest ${pytest_args[*]}"
start=$(date +%s)
python -m pytest -p no:cacheprovider "${pytest_args[@]}"
echo "install_test: tests took $(( $(date +%s) - start )) s"
