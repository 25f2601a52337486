"""Paths and host set-up shared by the benchmarks (imported first, for its effect).

``tests/`` (factories, ``conftest.load_pack``), the ComfyUI tier (``COMFYUI_PATH``, else the CI stand-in, with
``tests/standin`` behind it for ``folder_paths``) and the repository root go on ``sys.path``; with a real
ComfyUI and no CUDA, ComfyUI runs on the CPU (what ``python main.py --cpu`` sets).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), os.environ.get("COMFYUI_PATH") or str(ROOT / "tests" / "standin"), str(ROOT)]
if not os.environ.get("COMFYUI_PATH"):
    sys.path.insert(3, str(ROOT / "tests" / "standin"))

import torch  # noqa: E402

if os.environ.get("COMFYUI_PATH"):
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
