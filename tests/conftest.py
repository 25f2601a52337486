"""Shared fixtures: the authors' reference vectors and seeded SD-shaped weights."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REFERENCE = Path(os.environ.get("RECE_REFERENCE", ROOT.parent / "shared" / "reference" / "rece_tiny.safetensors"))


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
