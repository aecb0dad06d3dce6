#!/usr/bin/env bash
# Builds the GPU test and bench binaries here (no GPU needed) and copies them into
# .device/bin, the folder a GPU session carries to the device machine (git-ignored through
# .git/info/exclude; see kernels/README.md). The device machine has the CUDA 13 driver and
# libraries but no Rust toolchain and no network.
#
# - links against CUDA 13.0 sonames (libcuda.so.1, libnvrtc.so.13, libcudart.so.13,
#   libcublas(Lt).so.13, libcurand.so.10) using the link stubs of `kernels/toolchain.sh --stubs`;
# - candle-kernels' PTX is built for CUDA_COMPUTE_CAP=90 by nvcc 13.0 (loadable by driver 580);
# - RUSTFLAGS=-C target-cpu=x86-64-v2 replaces the repo's target-cpu=native: the device machine's
#   CPU is not this one.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
eval "$(kernels/toolchain.sh --stubs)"
export CUDA_COMPUTE_CAP=90
export CARGO_TARGET_DIR=${FREEKV_DEVICE_TARGET_DIR:-/work/tgt/cuda-device}
export RUSTFLAGS="-C target-cpu=x86-64-v2"
out=$ROOT/.device/bin
mkdir -p "$out"
exclude=$(git rev-parse --git-path info/exclude)   # also right in a linked worktree
mkdir -p "$(dirname "$exclude")"
grep -qx '/.device/' "$exclude" 2>/dev/null || echo '/.device/' >>"$exclude"
msg=$(mktemp)
cargo test --release --no-run -p freekv-plugin --features cuda --test cuda_kernels --test cuda_freekv --message-format=json >"$msg"
cargo bench --no-run -p freekv-plugin --features cuda --bench cuda_decode --message-format=json >>"$msg"
# The engine itself with FreeKV on CUDA (sm_90 only, symbols stripped), and the generator of the
# tiny models its end-to-end check runs (the device has no Rust to make them).
t0=$SECONDS
RUSTFLAGS="$RUSTFLAGS -C strip=symbols" \
  cargo build --release -p mistralrs-cli --features cuda,freekv --message-format=json >>"$msg"
echo "engine build: $((SECONDS - t0)) s"
cargo build --release -p freekv-integration-tests --bin freekv-tiny-models --message-format=json >>"$msg"
python3 - "$msg" "$out" <<'PY'
import json, shutil, sys, os
msgs, out = sys.argv[1], sys.argv[2]
for line in open(msgs):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("cuda_kernels", "cuda_freekv", "cuda_decode", "mistralrs", "freekv-tiny-models"):
        dst = os.path.join(out, m["target"]["name"])
        shutil.copy2(m["executable"], dst)
        print("built", dst)
PY
rm -f "$msg"
cp kernels/device-run.sh "$out/../device-run.sh"
# The stripped CUDA engine alone is ~144 MB (candle's and mistralrs-quant's kernels): the
# binaries travel xz-compressed (~22 MB for the engine; device-run.sh unpacks them, with xz or
# Python's lzma), so that a run carries well under 64 MiB.
for f in "$out"/*; do
  case "$f" in *.xz) continue ;; esac
  xz -T2 -6 -f "$f"
done
ls -l "$out"
du -sh "$out"   # everything a run carries: at most 64 MiB
