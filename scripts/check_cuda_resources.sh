#!/usr/bin/env bash
# Registers, spills and shared memory of every shipped CUDA kernel instantiation, as ptxas
# reports them at compile time (no GPU needed). Fails on any spill, on a kernel whose
# registers exceed what its launch bounds allow, and on static shared memory above 48 KB
# (more than that must go through the opt-in attribute, cudaFuncSetAttribute; the emulation
# tests check dynamic shared memory at every launch).
#
#   scripts/check_cuda_resources.sh [ARCH ...]      # default: 80 90 (the shipped architectures)
#
# Prints one line per kernel instance and architecture: registers, spill stores/loads (bytes),
# stack frame (bytes), static shared memory (bytes), name. Without nvcc it says so and exits 0
# (CI runs it wherever nvcc exists). Needs torch importable (for its include paths).
# Environment: NVCC (default: $CUDACXX, $CUDA_HOME/bin/nvcc, nvcc on PATH, /usr/local/cuda/bin/nvcc),
# JOBS (parallel ptxas runs, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc=${NVCC:-${CUDACXX:-}}
for cand in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc; do
  [ -n "$nvcc" ] && break
  [ -n "$cand" ] && [ -x "$cand" ] && nvcc=$cand
done
if [ -z "$nvcc" ]; then
  echo "check_cuda_resources: no nvcc found, nothing checked"
  exit 0
fi
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(80 90)

mapfile -t sources < <(find csrc -name '*_cuda.cu' | sort)
[ ${#sources[@]} -gt 0 ] || { echo "check_cuda_resources: no csrc/**/*_cuda.cu" >&2; exit 1; }
torch_includes=$(python3 -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))' 2>/dev/null) \
  || { echo "check_cuda_resources: cannot import torch (activate the project's environment)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Device code only (-cubin): the host compiler never runs, so this is about half the time of a
# full build. The flags are the device-relevant ones of CMakeLists.txt.
compile() {  # compile SOURCE ARCH: ptxas's report in $work
  local src=$1 arch=$2 log
  log="$work/$(echo "$src" | tr / _).sm_$arch.log"
  # shellcheck disable=SC2086
  if ! "$nvcc" -cubin -o /dev/null -std=c++20 -O3 --expt-relaxed-constexpr -arch="sm_$arch" \
      --resource-usage -Icsrc $torch_includes -DUSE_CUDA \
      "-DTORCH_TARGET_VERSION=(((0ULL + 2) << 56) | ((0ULL + 10) << 48))" \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      "$src" >"$log" 2>&1; then
    cat "$log" >&2
    echo "check_cuda_resources: nvcc failed on $src for sm_$arch" >&2
    return 1
  fi
}
export -f compile
export nvcc torch_includes work
for src in "${sources[@]}"; do for arch in "${archs[@]}"; do echo "$src $arch"; done; done |
  xargs -P "${JOBS:-2}" -n 2 bash -c 'compile "$0" "$1"'

# ptxas prints, per entry function: "Compiling entry function 'MANGLED' for 'sm_XX'", then
# "N bytes stack frame, N bytes spill stores, N bytes spill loads" and "Used N registers, ...,
# N bytes smem".
cat "$work"/*.log | c++filt | python3 -c "$(cat <<'PY'
import re
import sys

rows, cur = [], None
for line in sys.stdin:
    if m := re.search(r"Compiling entry function '(.*)' for 'sm_(\d+)'", line):
        cur = dict(name=m.group(1), arch=m.group(2), regs=0, stack=0, st=0, ld=0, smem=0)
        rows.append(cur)
    elif cur and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
        cur.update(stack=int(m.group(1)), st=int(m.group(2)), ld=int(m.group(3)))
    elif cur and (m := re.search(r"Used (\d+) registers", line)):
        cur["regs"] = int(m.group(1))
        if s := re.search(r"(\d+) bytes smem", line):
            cur["smem"] = int(s.group(1))
if not rows:
    sys.exit("check_cuda_resources: ptxas reported no kernels")


def short(name):  # "gram_tiles_kernel<float, 32>"
    name = re.sub(r"hrgrad_ext::|\(anonymous namespace\)::|_GLOBAL__N_\w*::", "", name)
    return re.sub(r"\(.*\)$", "", name)


problems = []
print(f"{'arch':>4} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6}  kernel")
for r in sorted(rows, key=lambda r: (short(r["name"]), r["arch"])):
    name = short(r["name"])
    print(f"{r['arch']:>4} {r['regs']:>4} {r['st']:>5}/{r['ld']:<5} {r['stack']:>5} {r['smem']:>6}  {name}")
    if r["st"] or r["ld"]:
        problems.append(f"{name} sm_{r['arch']}: spills ({r['st']} bytes stored, {r['ld']} bytes loaded)")
    if r["smem"] > 48 * 1024:
        problems.append(f"{name} sm_{r['arch']}: {r['smem']} bytes of static shared memory > 48 KB")
print(f"check_cuda_resources: {len(rows)} kernel instances, {len(problems)} problems")
for p in problems:
    print("FAIL", p)
sys.exit(1 if problems else 0)
PY
)"
