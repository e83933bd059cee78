#!/usr/bin/env bash
# Builds the llama.cpp peer of bench/peers.py from PyPI's llama-cpp-python source (no other download):
# libllama + llama-quantize + llama-imatrix with cmake, then the Python bindings without a second compile
# (they load the library through LLAMA_CPP_LIB_PATH, which bench/peers_llamacpp.py sets). Idempotent.
#   bash bench/peers_llamacpp_setup.sh [VERSION]      (default 0.3.36; about 15 minutes on 2 cores)
set -euo pipefail
version="${1:-0.3.36}"
root="${SENSIQUANT_PEERS_CACHE:-$HOME/.cache/sensiquant-peers}"
src="$root/llama_cpp_python-$version"
build="$root/llama.cpp-$version"
mkdir -p "$root"
if [ ! -d "$src" ]; then
  python -m pip download -q --no-deps --no-binary :all: -d "$root" "llama-cpp-python==$version"
  tar xzf "$root/llama_cpp_python-$version.tar.gz" -C "$root"
fi
if [ ! -x "$build/bin/llama-quantize" ] || [ ! -x "$build/bin/llama-imatrix" ]; then
  cmake -S "$src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF > "$build.cmake.log"
  cmake --build "$build" --target llama-quantize llama-imatrix -j "${JOBS:-2}" > "$build.build.log"
fi
python -c "import llama_cpp" 2>/dev/null || \
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" python -m pip install -q --no-deps "$src" diskcache jinja2
echo "llama.cpp $version: $build/bin"
