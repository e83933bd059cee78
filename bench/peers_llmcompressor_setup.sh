#!/usr/bin/env bash
# The environment of the llm-compressor peer (bench/peers_llmcompressor.py): llm-compressor 0.14.0.1 needs
# transformers <= 5.17 and sensiquant runs on 5.24, so it gets a virtual environment that sees the system's packages
# (torch 2.13.0, sensiquant's other dependencies) and installs transformers 5.17 and llm-compressor inside it, from
# PyPI. Outside the repository; idempotent.
#   bash bench/peers_llmcompressor_setup.sh          env: SENSIQUANT_PEERS_CACHE (default ~/.cache/sensiquant-peers)
set -euo pipefail
root="${SENSIQUANT_PEERS_CACHE:-$HOME/.cache/sensiquant-peers}"
venv="$root/llmc-venv"
mkdir -p "$root"
[ -x "$venv/bin/python" ] || python -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q "llmcompressor==0.14.0.1" "torch==2.13.0"
"$venv/bin/python" -c "import llmcompressor, transformers, torch; print('llm-compressor', llmcompressor.__version__, \
'transformers', transformers.__version__, 'torch', torch.__version__)"
