"""Shared fixtures and the two test tiers.

CI tier (default): ``tests/standin`` stands in for ComfyUI's modules.
Real tier: ``COMFYUI_PATH=/path/to/ComfyUI`` runs the same tests against the real modules.
The pack itself is loaded as the package ``rece_comfyui``, as ComfyUI loads a custom node folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
# CI tier: which host generation the stand-in has the shape of: "0.3.64" (default) or "current"
HOST = os.environ.get("RECE_HOST", "0.3.64")
if HOST not in ("0.3.64", "current"):
    raise RuntimeError(f"RECE_HOST must be 0.3.64 or current, got {HOST!r}")
STANDIN = ROOT / "tests" / ("standin_current" if HOST == "current" else "standin")
sys.path.insert(0, str(ROOT))
if not COMFYUI_PATH:
    sys.path.insert(0, str(ROOT / "tests" / "standin"))  # folder_paths; the current stand-in's fallback
sys.path.insert(0, COMFYUI_PATH if COMFYUI_PATH else str(STANDIN))
sys.path.insert(0, str(ROOT / "tests"))

if COMFYUI_PATH:
    import torch
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # what `python main.py --cpu` sets

REFERENCE = Path(os.environ.get("RECE_REFERENCE", ROOT / "tests" / "data" / "rece_tiny.safetensors"))


def load_pack():
    """Import the repository as the custom-node package ``rece_comfyui``."""
    if "rece_comfyui" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "rece_comfyui", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["rece_comfyui"] = module
        spec.loader.exec_module(module)
    return sys.modules["rece_comfyui"]


def pytest_report_header(config):
    return f"ComfyUI tier: {'real, ' + COMFYUI_PATH if COMFYUI_PATH else f'stand-in of ComfyUI {HOST} ({STANDIN.name})'}"


@pytest.fixture(scope="session")
def reference() -> tuple[dict, dict]:
    """(tensors, metadata) of the authors' run; metadata values parsed from JSON."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not REFERENCE.is_file():
        pytest.fail(f"reference vectors missing: {REFERENCE} (set RECE_REFERENCE)")
    with safe_open(str(REFERENCE), "pt") as f:
        meta = {k: json.loads(v) if v[:1] in "[{" else v for k, v in f.metadata().items()}
    return load_file(str(REFERENCE)), meta


@pytest.fixture()
def models_dir(tmp_path, monkeypatch):
    """Empty ``models/rece`` and ``models/loras`` in a temporary folder, registered with folder_paths."""
    import folder_paths

    for name in ("rece", "loras"):
        (tmp_path / name).mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(tmp_path / name)], {".safetensors"}))
    if hasattr(folder_paths, "filename_list_cache"):
        monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return tmp_path
