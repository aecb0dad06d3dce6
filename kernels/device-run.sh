#!/usr/bin/env bash
# Runs the prebuilt FreeKV GPU tests and the decode bench on the device machine (one H200, CUDA 13
# driver, no Rust, no network) and writes the results to $OUT. Build the binaries here first with
# kernels/build-device.sh (they land in .device/bin), then from a GPU session:
#
#   run(command="bash kernels/device-run.sh", carry=[".device"], timeout_s=540)
#
# Budget: tests ~1-2 min, bench ~3-4 min (FREEKV_BENCH_* env vars shrink it).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$ROOT/.device/bin
OUT=${OUT:-$ROOT/.device/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device-run.log") 2>&1
echo "== $(date -u +%FT%TZ) $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true

# The binaries need libcuda.so.1 (driver) and the CUDA 13 libraries: the toolkit's lib64 and the
# pip wheels that PyTorch (cu130) brought.
dirs=""
for lib in libnvrtc.so.13 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
  d=$( (ls -d /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib 2>/dev/null;
        python3 -c 'import site,glob; [print(p) for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/**/lib", recursive=True)]' 2>/dev/null) |
      while read -r c; do [ -e "$c/$lib" ] && { echo "$c"; break; }; done)
  [ -z "$d" ] && d=$(find / -xdev -name "$lib" -printf '%h\n' 2>/dev/null | head -n1)
  echo "$lib -> ${d:-NOT FOUND}"
  [ -n "$d" ] && dirs="$dirs:$d"
done
export LD_LIBRARY_PATH="${dirs#:}:${LD_LIBRARY_PATH:-}"
ldd "$BIN/cuda_kernels" | grep -E 'cuda|nvrtc|cublas|curand|not found'

echo "== GPU tests (each kernel vs the CPU reference)"
timeout 300 "$BIN/cuda_kernels" --test-threads=1
echo "tests exit code: $?"

echo "== GPU test (a whole FreeKV instance on CUDA vs the CPU backend)"
timeout 240 "$BIN/cuda_freekv" --test-threads=1 --nocapture
echo "freekv test exit code: $?"

echo "== decode bench"
FREEKV_BENCH_OUT=$OUT/bench.jsonl timeout 360 "$BIN/cuda_decode" --bench
echo "bench exit code: $?"
