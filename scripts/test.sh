#!/usr/bin/env bash
# Set up (CPU torch from this machine's wheel, never a multi-GB CUDA build) and run every test:
# the whole suite against the ComfyUI 0.3.64-shaped stand-in (or a real ComfyUI with COMFYUI_PATH),
# then, in the CI tier, the ComfyUI-facing tests again against the current-ComfyUI-shaped stand-in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet "safetensors>=0.4.2" numpy einops "pytest>=8"
"$PY" -m pytest -q "$@"
if [ -z "${COMFYUI_PATH:-}" ]; then
  RECE_HOST=current "$PY" -m pytest -q tests/nodes tests/test_example_workflows.py
fi
if command -v node >/dev/null 2>&1 && [ -d tests/web ] && ls tests/web/*.test.mjs >/dev/null 2>&1; then
  node --test tests/web/
fi
