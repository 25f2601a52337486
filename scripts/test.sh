#!/usr/bin/env bash
# Set up (CPU torch from this machine's wheel, never a multi-GB CUDA build) and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet "safetensors>=0.4.2" numpy einops "pytest>=8"
"$PY" -m pytest -q "$@"
if command -v node >/dev/null 2>&1 && [ -d tests/web ] && ls tests/web/*.test.mjs >/dev/null 2>&1; then
  node --test tests/web/
fi
