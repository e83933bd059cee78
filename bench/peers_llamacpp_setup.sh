#!/usr/bin/env bash
# Builds the llama.cpp peer of bench/peers.py from PyPI's llama-cpp-python sdist (no other download): libllama,
# llama-quantize and llama-imatrix with cmake from the llama.cpp it vendors, then the Python bindings of the same
# sdist without a second compile of that library (LLAMA_BUILD=OFF; bench/peers_llamacpp.py points the bindings at
# the library built here through LLAMA_CPP_LIB_PATH). Everything lands outside the repository. Idempotent: each
# step is skipped when its result is there.
#   bash bench/peers_llamacpp_setup.sh [VERSION]     (default 0.3.36; ~35 minutes on 1-2 busy cores)
#   env: SENSIQUANT_PEERS_CACHE (default ~/.cache/sensiquant-peers), JOBS (parallel compile jobs, default 2),
#        LLAMA_ISA=avx2: build only the library, without AVX-512, into llama.cpp-VERSION-avx2 (what an AVX2-only
#        CPU runs; bench/speed.py --isa avx2 loads it; run the plain build first: the tools come from there)
set -euo pipefail
version="${1:-0.3.36}"
root="${SENSIQUANT_PEERS_CACHE:-$HOME/.cache/sensiquant-peers}"
src="$root/llama_cpp_python-$version"
build="$root/llama.cpp-$version${LLAMA_ISA:+-$LLAMA_ISA}"
mkdir -p "$root"
start=$SECONDS
if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
  python -m pip download -q --no-deps --no-binary llama-cpp-python -d "$root" "llama-cpp-python==$version"
  tar xzf "$root/llama_cpp_python-$version.tar.gz" -C "$root"
fi
# the vector extensions of this CPU (AMX off: ggml's AMX path crashed, SIGSEGV in llama_decode, with GGML_NATIVE=ON
# on an AVX-512 VM); a build made for another kind of CPU is rebuilt
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
if [ "${LLAMA_ISA:-}" = "avx2" ]; then has() { echo OFF; }; targets="llama"
elif [ -n "${LLAMA_ISA:-}" ]; then echo "LLAMA_ISA must be avx2 or unset, got $LLAMA_ISA" >&2; exit 2
else targets="llama llama-quantize llama-imatrix"; fi
isa="AVX512=$(has avx512f) VNNI=$(has avx512_vnni) BF16=$(has avx512_bf16) VBMI=$(has avx512vbmi)"
if [ "$(cat "$build/isa.txt" 2>/dev/null)" != "$isa" ]; then rm -rf "$build"; fi
missing=0; for t in $targets; do [ -e "$build/bin/$t" ] || [ -e "$build/bin/lib$t.so" ] || missing=1; done
if [ "$missing" = 1 ]; then
  echo "building llama.cpp $version in $build for $isa (logs: $build.cmake.log, $build.build.log)"
  cmake -S "$src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512="$(has avx512f)" \
    -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)" \
    -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF \
    -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    > "$build.cmake.log"
  cmake --build "$build" --target $targets -j "${JOBS:-2}" > "$build.build.log"
  echo "$isa" > "$build/isa.txt"
fi
installed=$(python -c "from importlib import metadata as m; print(m.version('llama_cpp_python'))" 2>/dev/null || true)
if [ "$installed" != "$version" ]; then
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" python -m pip install -q "$src"
fi
LLAMA_CPP_LIB_PATH="$build/bin" python -c "import llama_cpp" # the bindings load the library built above
echo "llama.cpp $version ready in $build/bin ($((SECONDS - start)) s)"
