#!/usr/bin/env bash
# CI check of the FreeKV CUDA path on a machine without a GPU (see kernels/README.md).
#   1. installs the CUDA 13.0 compiler toolchain from PyPI wheels (cached in .cache/, ~6 s cold)
#   2. compiles every kernel file for sm_80 and sm_90, for every configuration of the CI matrix,
#      through the NVRTC path the backend uses at run time (tests/nvrtc_compile.rs, feature nvrtc)
#   3. assembles every PTX with ptxas for its architecture: fails on errors, reports registers and
#      spills, and fails if a kernel spills (FREEKV_ALLOW_SPILLS=1 to only warn)
#   4. type-checks the CUDA backend, its tests and its bench (feature cuda; candle's CUDA backend
#      runs nvcc in its build script) in its own target dir
#   5. type-checks the engine glue with the CUDA backend on (features cuda + engine: the patched
#      mistralrs-core against candle's CUDA backend; checked, never built)
# Never builds the engine (step 5 only type-checks it). Prints the time of each step.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
T0=$SECONDS
step() { echo "== cuda-check: $* ($((SECONDS - T0)) s)"; }

step "toolchain"
eval "$(kernels/toolchain.sh)"
export CARGO_TARGET_DIR=${FREEKV_CUDA_TARGET_DIR:-$ROOT/target/cuda-check}
PTX_DIR=$CARGO_TARGET_DIR/freekv-ptx
rm -rf "$PTX_DIR"

step "NVRTC: every kernel x configuration for sm_80 and sm_90"
FREEKV_REQUIRE_NVRTC=1 FREEKV_PTX_OUT=$PTX_DIR \
  cargo test --locked -p freekv-plugin --features nvrtc --test nvrtc_compile -- --nocapture

step "ptxas: assemble the PTX for its architecture"
report=$CARGO_TARGET_DIR/freekv-ptxas.txt
: >"$report"
n=0
for ptx in "$PTX_DIR"/*.ptx; do
  arch=${ptx##*-}
  arch=${arch%.ptx}
  if ! out=$(ptxas -arch="$arch" -v "$ptx" -o /dev/null 2>&1); then
    echo "$out"
    echo "ptxas failed on $ptx" >&2
    exit 1
  fi
  # One line per kernel: file, kernel, registers, spills.
  echo "$out" | awk -v f="$(basename "$ptx" .ptx)" '
    /Compiling entry function/ { match($0, /\047[a-z_]+\047/); k = substr($0, RSTART + 1, RLENGTH - 2) }
    /spill stores/ { st = $5; ld = $9 }
    /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); r = substr($0, RSTART + 5, RLENGTH - 15);
                              printf "%-40s %-24s regs %3d spill-st %s spill-ld %s\n", f, k, r, st, ld }' >>"$report"
  n=$((n + 1))
done
echo "assembled $n PTX files; per-kernel maxima of registers:"
sort -k2,2 -k4,4n "$report" | awk '{ max[$2] = $4 } END { for (k in max) printf "  %-24s %3d\n", k, max[k] }' | sort
spills=$(awk '$6 != "0" || $8 != "0"' "$report")
if [ -n "$spills" ]; then
  echo "kernels that spill:"
  echo "$spills"
  [ "${FREEKV_ALLOW_SPILLS:-0}" = "1" ] || { echo "spills are not allowed (FREEKV_ALLOW_SPILLS=1 to warn only)" >&2; exit 1; }
fi

step "cargo check --features cuda (lib, tests, bench)"
cargo check --locked -p freekv-plugin --features cuda --lib --tests --benches

step "cargo check --features cuda,engine (the engine glue against candle's CUDA backend)"
cargo check --locked -p freekv-plugin --features cuda,engine --lib --tests

step "done"
