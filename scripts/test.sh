#!/usr/bin/env bash
# Set up and run every test: the whole suite against the ComfyUI 0.3.64-shaped stand-in (or a real
# ComfyUI with COMFYUI_PATH), then, in the CI tier, the tests whose outcome depends on the host's
# patching contract (adapters rebuilt, bypass, quantized tensors, training on the model as patched) against the
# current-ComfyUI-shaped one.
# torch: installed if missing, pinned to 2.13.0 (CI machines carry its CPU wheel; see README for a CPU install elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet "safetensors>=0.4.2" numpy einops "pytest>=8"
"$PY" -m pytest -q "$@"
if [ -z "${COMFYUI_PATH:-}" ]; then
  # current ComfyUI's quantized weights (fp8 scaled, INT8, NVFP4) are comfy-kitchen's QuantizedTensor (CPU eager backend)
  "$PY" -m pip install --quiet "comfy-kitchen>=0.2.40"
  RECE_HOST=current "$PY" -m pytest -q tests/nodes/test_host_contract.py tests/nodes/test_nodes.py \
    tests/nodes/test_dit_families.py tests/nodes/test_sweep.py tests/nodes/test_quantized_formats.py \
    tests/nodes/test_fewshot.py tests/nodes/test_fewshot_flux.py tests/test_example_workflows.py
fi
if command -v node >/dev/null 2>&1 && [ -d tests/web ] && ls tests/web/*.test.mjs >/dev/null 2>&1; then
  node --test tests/web/
fi
