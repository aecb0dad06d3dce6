#!/usr/bin/env bash
# Runs the prebuilt FreeKV GPU tests and the decode bench on the device machine (one H200, CUDA 13
# driver, no Rust, no network) and writes the results to $OUT. Build the binaries here first with
# kernels/build-device.sh (they land in .device/bin), then from a GPU session:
#
#   run(command="bash kernels/device-run.sh", carry=[".device"], timeout_s=540)
#
# Budget: 8 minutes in all (each step's timeout is cut to what is left of it): tests ~1-2 min,
# engine e2e ~2 min, bench ~3-4 min (FREEKV_BENCH_* env vars shrink it). Not yet run on a GPU:
# the first run may need fixes.
set -uo pipefail
DEADLINE=$((SECONDS + ${DEVICE_RUN_BUDGET_S:-480}))
# cap N: N seconds, or what is left of the budget if less (at least 5).
cap() { local left=$((DEADLINE - SECONDS)); [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$ROOT/.device/bin
OUT=${OUT:-$ROOT/.device/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device-run.log") 2>&1
echo "== $(date -u +%FT%TZ) $(hostname)"
# build-device.sh ships the binaries xz-compressed (the engine is ~144 MB unpacked).
for z in "$BIN"/*.xz; do
  [ -e "$z" ] || continue
  if command -v xz >/dev/null; then xz -d -f "$z"; else
    python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[1][:-3], "wb"))' "$z" && rm -f "$z"
  fi
  chmod +x "${z%.xz}"
done
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
timeout "$(cap 300)" "$BIN/cuda_kernels" --test-threads=1
echo "tests exit code: $?"

echo "== GPU test (a whole FreeKV instance on CUDA vs the CPU backend)"
timeout "$(cap 240)" "$BIN/cuda_freekv" --test-threads=1 --nocapture
echo "freekv test exit code: $?"

echo "== engine end to end on tiny models (bf16 on the GPU)"
# FreeKV's dense mode must give the greedy tokens of the engine's own paged attention (the same
# binary with --no-freekv, same block size); each sparse mode must decode sparsely (FreeKV's
# counters in /metrics) without NaN.
# E2E_FLAGS="--cpu --dtype f32" STOCK_FLAGS="--paged-attn off" dry-runs this section on a
# machine without a GPU (the engine has no paged attention on the CPU).
E2E_FLAGS=${E2E_FLAGS:---dtype bf16}
STOCK_FLAGS=${STOCK_FLAGS:---pa-context-len 2048 --pa-block-size 32}
MODELS=$(mktemp -d)
"$BIN/freekv-tiny-models" "$MODELS" >/dev/null
e2e_fail=0
for arch in llama qwen2; do
  m=$MODELS/$arch
  prompt=$(cat "$m/prompt.txt")
  # run TAG "GLOBAL FLAGS (the --freekv-* knobs)" "RUN FLAGS"
  # The engine's log lines (ANSI-coloured, on stdout) go to .log, the generated text to .txt.
  run() { RUST_LOG=info timeout "$(cap 120)" "$BIN/mistralrs" --token-source none $2 run -m "$m" \
            $E2E_FLAGS $3 -i "$prompt" >"$OUT/e2e-$arch-$1.out" 2>&1
          echo "exit $?" >>"$OUT/e2e-$arch-$1.out"
          grep -a $'^\e\[' "$OUT/e2e-$arch-$1.out" >"$OUT/e2e-$arch-$1.log"
          grep -av $'^\e\[' "$OUT/e2e-$arch-$1.out" >"$OUT/e2e-$arch-$1.txt"
          sed '/^Stats:/,$d' "$OUT/e2e-$arch-$1.txt" >"$OUT/e2e-$arch-$1.tokens"; }
  run stock "--no-freekv" "$STOCK_FLAGS"
  run dense "--freekv-mode dense" "--pa-context-len 2048 --pa-block-size 32"
  if cmp -s "$OUT/e2e-$arch-stock.tokens" "$OUT/e2e-$arch-dense.tokens" \
     && [ -s "$OUT/e2e-$arch-stock.tokens" ] && grep -q '^exit 0$' "$OUT/e2e-$arch-dense.txt"; then
    echo "$arch: FreeKV dense mode == stock"
  else
    echo "$arch: FAIL dense mode differs from stock (see e2e-$arch-*.txt)"; e2e_fail=1
  fi
  # Sparse: through the server, whose /metrics has FreeKV's counters once the request is done.
  for mode in freekv speculative sync; do
    port=$((20000 + RANDOM % 20000))
    timeout "$(cap 150)" "$BIN/mistralrs" --token-source none --freekv-mode $mode --freekv-budget 128 --freekv-sink 32 --freekv-window 32 \
      --freekv-page-size 16 serve -m "$m" $E2E_FLAGS --pa-context-len 2048 --pa-block-size 16 \
      --host 127.0.0.1 -p $port >"$OUT/e2e-$arch-$mode.log" 2>&1 &
    server=$!
    python3 - "$port" "$m/prompt.txt" >"$OUT/e2e-$arch-$mode.txt" 2>&1 <<'PY'
import json, sys, time, urllib.request
port, prompt = sys.argv[1], open(sys.argv[2]).read()
base = f"http://127.0.0.1:{port}"
for _ in range(240):
    try:
        urllib.request.urlopen(base + "/health", timeout=2)
        break
    except Exception:
        time.sleep(0.5)
body = json.dumps({"model": "default", "messages": [{"role": "user", "content": prompt}],
                   "max_tokens": 256, "temperature": 0}).encode()
req = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
r = json.load(urllib.request.urlopen(req, timeout=120))
print(r["choices"][0]["message"]["content"])
metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
print("\n".join(l for l in metrics.splitlines() if l.startswith("freekv_")))
print("exit 0")
PY
    kill $server 2>/dev/null; wait $server 2>/dev/null
    sparse=$(grep -a '^freekv_sparse_steps_total' "$OUT/e2e-$arch-$mode.txt" | awk '{print int($NF)}' | sort -n | tail -n1)
    if [ "${sparse:-0}" -gt 0 ] && grep -q '^exit 0$' "$OUT/e2e-$arch-$mode.txt" \
       && ! grep -qiw nan "$OUT/e2e-$arch-$mode.txt"; then
      echo "$arch $mode: sparse run ok (sparse_steps=$sparse)"
    else
      echo "$arch $mode: FAIL sparse run (sparse_steps=${sparse:-none}; see e2e-$arch-$mode.*)"; e2e_fail=1
    fi
  done
done
echo "e2e exit code: $e2e_fail"

echo "== decode bench (the backend the engine runs)"
FREEKV_BENCH_OUT=$OUT/bench.jsonl FREEKV_BENCH_STEPS=${FREEKV_BENCH_STEPS:-16} \
  timeout "$(cap 300)" "$BIN/cuda_decode" --bench
echo "bench exit code: $?"
