#!/usr/bin/env bash
# Installs a CUDA 13.0 compiler toolchain from PyPI wheels into a cached, git-ignored folder and
# prints the environment that points cargo, cudarc, candle-kernels and our NVRTC path at it.
#
#   eval "$(kernels/toolchain.sh)"          # install if missing, then export the variables
#   kernels/toolchain.sh --stubs            # also make the link stubs (only to link test binaries)
#
# Why wheels: they are the smallest reachable way to get nvcc + NVRTC (about 190 MB of downloads,
# a few seconds), versus about 2 GB for Debian's nvidia-cuda-toolkit (and that one is CUDA 11.8).
# Why 13.0 exactly: the H200 machines run driver 580 (CUDA 13.0). PTX made by a newer nvcc/NVRTC
# carries a newer PTX ISA that such a driver refuses to load, and binaries linked here must find the
# same sonames there (libnvrtc.so.13, libcudart.so.13, libcublas.so.13, libcurand.so.10).
#
# Layout of $FREEKV_CUDA_HOME (default <repo>/.cache/cuda-13.0): a CUDA root as nvcc expects it
# (bin/, nvvm/, include/, lib/). lib/stubs/ (with --stubs) holds link-only stubs for the libraries
# that no wheel here ships small enough: libcuda (the driver), libcublas, libcublasLt and libcurand.
# They carry the real sonames and export every symbol cudarc binds, so the linker records the real
# libraries as needed; they are never loaded at run time (the GPU machine has the real ones).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CUDA_HOME_DIR=${FREEKV_CUDA_HOME:-$ROOT/.cache/cuda-13.0}
WHEELS_DIR=${FREEKV_CUDA_WHEELS:-$ROOT/.cache/cuda-wheels}
STAMP="cuda-13.0.88 nvcc nvrtc runtime-13.0.96 nvvm crt cccl-13.0.85 v1"
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
)

log() { echo "toolchain: $*" >&2; }

install() {
  local t0=$SECONDS
  mkdir -p "$WHEELS_DIR"
  log "downloading ${#WHEELS[@]} wheels into $WHEELS_DIR"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
    --platform manylinux2010_x86_64 -d "$WHEELS_DIR" "${WHEELS[@]}" >&2
  rm -rf "$CUDA_HOME_DIR.tmp"
  mkdir -p "$CUDA_HOME_DIR.tmp"
  local unpack
  unpack=$(mktemp -d)
  for spec in "${WHEELS[@]}"; do
    local name=${spec%%==*} ver=${spec##*==}
    local whl
    whl=$(ls "$WHEELS_DIR"/"${name//-/_}"-"$ver"-*.whl | head -n1)
    # The alt NVRTC build (libnvrtc.alt.*) is a second copy we never use: skip 110 MB.
    unzip -qq -o "$whl" 'nvidia/cu13/*' -x "*.alt.*" "*/.metadata/*" -d "$unpack"
  done
  cp -a "$unpack"/nvidia/cu13/. "$CUDA_HOME_DIR.tmp"/
  rm -rf "$unpack"
  # Unversioned names for the linker (wheels ship only the sonames).
  ln -sf libnvrtc.so.13 "$CUDA_HOME_DIR.tmp/lib/libnvrtc.so"
  ln -sf libcudart.so.13 "$CUDA_HOME_DIR.tmp/lib/libcudart.so"
  chmod +x "$CUDA_HOME_DIR.tmp"/bin/* "$CUDA_HOME_DIR.tmp"/nvvm/bin/*
  echo "$STAMP" >"$CUDA_HOME_DIR.tmp/.freekv-stamp"
  rm -rf "$CUDA_HOME_DIR"
  mv "$CUDA_HOME_DIR.tmp" "$CUDA_HOME_DIR"
  log "installed $("$CUDA_HOME_DIR/bin/nvcc" --version | tail -n2 | head -n1) in $((SECONDS - t0)) s"
}

# Link-only stubs: every symbol cudarc's bindings load for a library, as empty functions, in a
# shared object that carries the real library's soname.
make_stubs() {
  local src
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort -V | tail -n1)
  [ -n "$src" ] || { log "cudarc sources not found (run a cargo fetch first)"; exit 1; }
  mkdir -p "$CUDA_HOME_DIR/lib/stubs"
  local spec lib soname sys tmp
  for spec in "cuda:libcuda.so.1:driver" "cublas:libcublas.so.13:cublas" \
    "cublasLt:libcublasLt.so.13:cublaslt" "curand:libcurand.so.10:curand"; do
    IFS=: read -r lib soname sys <<<"$spec"
    tmp=$(mktemp --suffix=.c)
    grep -o 'load::<_F>("[A-Za-z0-9_]*")' "$src/src/$sys/sys/mod.rs" |
      sed 's/.*("\(.*\)")/void \1(void) {}/' | sort -u >"$tmp"
    gcc -shared -fPIC -o "$CUDA_HOME_DIR/lib/stubs/lib$lib.so" -Wl,-soname,"$soname" "$tmp"
    rm -f "$tmp"
  done
  log "link stubs in $CUDA_HOME_DIR/lib/stubs (from $src)"
}

if [ ! -f "$CUDA_HOME_DIR/.freekv-stamp" ] || [ "$(cat "$CUDA_HOME_DIR/.freekv-stamp")" != "$STAMP" ]; then
  install
fi
if [ "${1:-}" = "--stubs" ] && [ ! -f "$CUDA_HOME_DIR/lib/stubs/libcuda.so" ]; then
  make_stubs
fi

cat <<EOF
export FREEKV_CUDA_HOME='$CUDA_HOME_DIR'
export CUDA_HOME='$CUDA_HOME_DIR'
export CUDA_PATH='$CUDA_HOME_DIR'
export NVCC='$CUDA_HOME_DIR/bin/nvcc'
export PATH='$CUDA_HOME_DIR/bin':"\$PATH"
export LD_LIBRARY_PATH='$CUDA_HOME_DIR/lib':"\${LD_LIBRARY_PATH:-}"
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
EOF
