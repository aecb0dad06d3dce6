#!/usr/bin/env bash
# The GPU run, for its one shot: runs the prebuilt FreeKV GPU tests, the decode bench and the
# engine end to end on the device machine (one H100/H200, CUDA 13 driver, no Rust, no network)
# and leaves at most 4 files in $OUT. Build the binaries here first with kernels/build-device.sh
# (they land in .device/bin), then from a GPU session:
#
#   run(command="bash kernels/device-run.sh", carry=[".device"], timeout_s=420)
#
# - Steps run in order of value (kernel tests, bench at 32K, the instance test, the engine on
#   one tiny model; the rest only while the budget lasts), each under `timeout`, cut to what is
#   left of DEVICE_RUN_BUDGET_S (default 360 s, so that a rerun fits in a session's 15 minutes).
# - FREEKV_REQUIRE_CUDA=1 makes a test or bench that cannot open the GPU fail, not skip.
# - A server step checks that its server is alive while it waits, and bounds every request.
# - $OUT gets: summary.txt (one line per step, then the SUMMARY line), device-run.log (all
#   output), bench.jsonl (the bench's figures) and details.tar.gz (each step's own output).
# - Exit status: 0 when no step failed, 1 otherwise; the last line printed is the SUMMARY.
#
# CPU dry run (CI, `cargo xtask test`): DEVICE_RUN_DRY=1 DEVICE_BIN=target/release runs the
# script on a machine without a GPU: the GPU steps are skipped (said so in the summary), the
# engine steps run on the CPU in f32 (the engine has no paged attention there, so the stock
# reference runs without it).
set -uo pipefail
DEADLINE=$((SECONDS + ${DEVICE_RUN_BUDGET_S:-360}))
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$(cd "${DEVICE_BIN:-$ROOT/.device/bin}" && pwd)
OUT=${OUT:-$ROOT/.device/out}
DRY=${DEVICE_RUN_DRY:-0}
mkdir -p "$OUT"
WORK=$(mktemp -d)
exec > >(tee "$OUT/device-run.log") 2>&1
: >"$OUT/summary.txt"
passed=0 failed=0 skipped=0

# record STATUS NAME DETAIL: one summary line.
record() {
  printf '%-5s %-22s %s\n' "$1" "$2" "$3" | tee -a "$OUT/summary.txt"
  case $1 in PASS) passed=$((passed + 1)) ;; FAIL) failed=$((failed + 1)) ;; *) skipped=$((skipped + 1)) ;; esac
}

# step NAME LIMIT CMD...: runs CMD (a program or an exported function) under `timeout` (LIMIT
# seconds, cut to the budget left) with its output in $WORK/NAME.log (the tail is echoed); PASS
# when it exits 0.
step() {
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS))
  shift 2
  if [ "$left" -lt 15 ]; then record SKIP "$name" "budget spent"; return 1; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s)"
  local t0=$SECONDS rc
  timeout -k 5 "$limit" bash -c '"$@"' "$name" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  tail -n 25 "$WORK/$name.log"
  local took="$((SECONDS - t0)) s"
  case $rc in
    0) record PASS "$name" "$took" ;;
    124 | 137) record FAIL "$name" "timed out after $took" ;;
    *) record FAIL "$name" "exit $rc after $took (details.tar.gz: $name.log)" ;;
  esac
  return "$rc"
}

finish() {
  tar -czf "$OUT/details.tar.gz" -C "$WORK" --exclude=./models . 2>/dev/null
  rm -rf "$WORK"
  local line="SUMMARY device-run: $passed passed, $failed failed, $skipped skipped in $SECONDS s"
  echo "$line" >>"$OUT/summary.txt"
  echo "$line"
  [ "$failed" -eq 0 ]
  exit $?
}

echo "== $(date -u +%FT%TZ) $(hostname) dry=$DRY bin=$BIN"
# build-device.sh ships the binaries xz-compressed (the engine is ~144 MB unpacked).
for z in "$BIN"/*.xz; do
  [ -e "$z" ] || continue
  if command -v xz >/dev/null; then xz -d -f "$z"; else
    python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[1][:-3], "wb"))' "$z" && rm -f "$z"
  fi
  chmod +x "${z%.xz}"
done

if [ "$DRY" != 1 ]; then
  # The binaries need libcuda.so.1 (driver) and the CUDA 13 libraries: the toolkit's lib64 and
  # the pip wheels that PyTorch (cu130) brought.
  dirs=""
  for lib in libnvrtc.so.13 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
    d=$( (ls -d /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib 2>/dev/null
          python3 -c 'import site,glob; [print(p) for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/**/lib", recursive=True)]' 2>/dev/null) |
        while read -r c; do [ -e "$c/$lib" ] && { echo "$c"; break; }; done)
    [ -z "$d" ] && d=$(find / -xdev -name "$lib" -printf '%h\n' 2>/dev/null | head -n1)
    echo "$lib -> ${d:-NOT FOUND}"
    [ -n "$d" ] && dirs="$dirs:$d"
  done
  export LD_LIBRARY_PATH="${dirs#:}:${LD_LIBRARY_PATH:-}"
  # GPU, driver and NVRTC versions first: a PTX newer than the driver fails every module load.
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  python3 - <<'PY' || true
import ctypes
def version(lib, fn, *args):
    try:
        f = getattr(ctypes.CDLL(lib), fn)
        vals = [ctypes.c_int() for _ in args]
        rc = f(*[ctypes.byref(v) for v in vals])
        return rc, [v.value for v in vals]
    except OSError as e:
        return None, str(e)
print("CUDA driver API version (cuDriverGetVersion):", version("libcuda.so.1", "cuDriverGetVersion", 0))
print("NVRTC version (nvrtcVersion):", version("libnvrtc.so.13", "nvrtcVersion", 0, 0))
PY
  ldd "$BIN/cuda_kernels" | grep -E 'cuda|nvrtc|cublas|curand|not found'
  export FREEKV_REQUIRE_CUDA=1
fi

# ---------------------------------------------------------------- 1. kernels, bench, instance
if [ "$DRY" = 1 ]; then
  for s in kernel-tests bench-32k instance-test; do record SKIP "$s" "dry run (no GPU)"; done
else
  step kernel-tests 150 "$BIN/cuda_kernels" --test-threads=1 --nocapture
  FREEKV_BENCH_OUT=$OUT/bench.jsonl FREEKV_BENCH_CONTEXTS=32768 FREEKV_BENCH_STEPS=16 \
    step bench-32k 120 "$BIN/cuda_decode" --bench
  # Recall figures from a host tier the GPU could not page-lock are pageable-copy figures.
  if grep -q '"pinned":false' "$OUT/bench.jsonl" 2>/dev/null; then
    record FAIL bench-pinned "a host tier was not page-locked: the recall figures are not FreeKV's"
  fi
  step instance-test 120 "$BIN/cuda_freekv" --test-threads=1 --nocapture
fi

# ---------------------------------------------------------------- 2. the engine end to end
# On each tiny model: greedy tokens of the engine's own paged attention (the same binary with
# --no-freekv) must equal FreeKV's in dense mode and FreeKV's with a budget above the context
# (every page held on the device, decoded by FreeKV's kernels); a sparse budget must decode
# sparsely (FreeKV's counters in the server's /metrics) and finish without NaN.
if [ "$DRY" = 1 ]; then
  E2E_FLAGS=${E2E_FLAGS:---cpu --dtype f32}
  STOCK_FLAGS=${STOCK_FLAGS:---paged-attn off}
else
  E2E_FLAGS=${E2E_FLAGS:---dtype bf16}
  STOCK_FLAGS=${STOCK_FLAGS:---pa-context-len 2048 --pa-block-size 32}
fi
MODELS=$WORK/models
"$BIN/freekv-tiny-models" "$MODELS" >/dev/null || record FAIL tiny-models "the generator failed"

# generate ARCH TAG "GLOBAL FLAGS" "RUN FLAGS": `mistralrs run` on the model's prompt; the
# tokens (the text before the stats) land in $WORK/ARCH-TAG.tokens.
generate() {
  local m=$MODELS/$1 f=$WORK/$1-$2
  RUST_LOG=info "$BIN/mistralrs" --token-source none $3 run -m "$m" $E2E_FLAGS $4 \
    -i "$(cat "$m/prompt.txt")" >"$f.out" 2>&1 || return 1
  # The engine's log records (ANSI-coloured, timestamped, on stdout like the text) go, with
  # their newline, wherever they start: one may land inside the streamed text (FreeKV's
  # release line is logged while the last tokens are printed), whose two halves then rejoin.
  python3 - "$f.out" >"$f.tokens" <<'PY' || return 1
import re, sys
raw = open(sys.argv[1], encoding="utf-8", errors="replace").read()
raw = re.sub(r"\x1b\[2m\d{4}-\d\d-\d\dT[^ ]*Z\x1b\[0m[^\n]*(\n|$)", "", raw)
lines = []
for line in raw.split("\n"):
    if line.startswith("Stats:"):
        break
    if line and not line.startswith("\x1b["):
        lines.append(line)
print("\n".join(lines))
PY
  [ -s "$f.tokens" ] && [ "$(wc -c <"$f.tokens")" -gt 1 ]
}

# same_tokens ARCH TAG: FreeKV's run TAG gave the stock run's tokens.
same_tokens() {
  cmp "$WORK/$1-stock.tokens" "$WORK/$1-$2.tokens" || { diff "$WORK/$1-stock.tokens" "$WORK/$1-$2.tokens" | head -n 8; return 1; }
}

# matches_stock ARCH TAG "GLOBAL FLAGS" "RUN FLAGS": FreeKV's run gives the stock tokens.
matches_stock() {
  generate "$@" && same_tokens "$1" "$2"
}

# sparse ARCH MODE: a server with a sparse budget answers the prompt, decoding sparsely.
sparse() {
  local m=$MODELS/$1 port=$((20000 + RANDOM % 20000))
  "$BIN/mistralrs" --token-source none --freekv-mode "$2" --freekv-budget 128 --freekv-sink 32 \
    --freekv-window 32 --freekv-page-size 16 serve -m "$m" $E2E_FLAGS --pa-context-len 2048 \
    --pa-block-size 16 --host 127.0.0.1 -p "$port" >"$WORK/$1-$2-server.log" 2>&1 &
  local server=$!
  python3 - "$port" "$m/prompt.txt" "$server" <<'PY'
import json, os, sys, time, urllib.request
port, prompt, pid = sys.argv[1], open(sys.argv[2]).read(), int(sys.argv[3])
base = f"http://127.0.0.1:{port}"
deadline = time.time() + 90
while True:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the server exited before it answered /health")
    try:
        urllib.request.urlopen(base + "/health", timeout=2)
        break
    except Exception:
        if time.time() > deadline:
            sys.exit("no /health answer within 90 s")
        time.sleep(0.5)
body = json.dumps({"model": "default", "messages": [{"role": "user", "content": prompt}],
                   "max_tokens": 128, "temperature": 0}).encode()
req = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
text = json.load(urllib.request.urlopen(req, timeout=90))["choices"][0]["message"]["content"]
metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
sparse = max([float(l.split()[-1]) for l in metrics.splitlines()
              if l.startswith("freekv_sparse_steps_total")] or [0])
print(f"text: {text[:200]!r}")
print(f"freekv_sparse_steps_total: {sparse:.0f}")
if not text or "nan" in text.lower().split():
    sys.exit("an empty or NaN answer")
if sparse <= 0:
    sys.exit("no sparse step counted")
PY
  local rc=$?
  kill "$server" 2>/dev/null
  wait "$server" 2>/dev/null
  return $rc
}

export -f generate same_tokens matches_stock sparse
export MODELS WORK BIN E2E_FLAGS
PAGED="--pa-context-len 2048 --pa-block-size 32"
for arch in llama qwen2; do
  step "$arch-stock" 90 generate "$arch" stock "--no-freekv" "$STOCK_FLAGS" || continue
  step "$arch-dense" 90 matches_stock "$arch" dense "--freekv-mode dense" "$PAGED"
  step "$arch-hold-every-page" 90 matches_stock "$arch" whole "--freekv-budget 4096" "$PAGED"
  step "$arch-sparse-freekv" 120 sparse "$arch" freekv
  # The rest of the modes and models only while the budget lasts.
  [ $((DEADLINE - SECONDS)) -gt 150 ] || break
  for mode in speculative sync; do
    step "$arch-sparse-$mode" 120 sparse "$arch" "$mode"
  done
done

# ---------------------------------------------------------------- 3. longer contexts, if time
# With a layer's weight work to hide behind (FREEKV_BENCH_WEIGHTS), then a longer context.
if [ "$DRY" != 1 ] && [ $((DEADLINE - SECONDS)) -gt 150 ]; then
  FREEKV_BENCH_OUT=$WORK/bench-weights.jsonl FREEKV_BENCH_CONTEXTS=32768 FREEKV_BENCH_STEPS=16 \
    FREEKV_BENCH_WEIGHTS=1 step bench-32k-weights 120 "$BIN/cuda_decode" --bench
  cat "$WORK/bench-weights.jsonl" >>"$OUT/bench.jsonl" 2>/dev/null
fi
if [ "$DRY" != 1 ] && [ $((DEADLINE - SECONDS)) -gt 150 ]; then
  FREEKV_BENCH_OUT=$WORK/bench-long.jsonl FREEKV_BENCH_CONTEXTS=65536 FREEKV_BENCH_STEPS=16 \
    step bench-64k 120 "$BIN/cuda_decode" --bench
  cat "$WORK/bench-long.jsonl" >>"$OUT/bench.jsonl" 2>/dev/null
fi
finish
