"""RECE for ComfyUI: node registration.

ComfyUI imports this file from ``custom_nodes/``. Outside ComfyUI (tests, ``python -m
rece_core``) importing it must not fail, so the node modules are loaded only when ComfyUI's own
modules are importable.
"""

from __future__ import annotations

import logging

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
WEB_DIRECTORY = "./web"

try:
    import comfy.model_patcher  # noqa: F401  (present only inside ComfyUI)
except ImportError:  # imported outside ComfyUI
    pass
else:
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
    except ImportError as exc:  # pragma: no cover - a broken install should say why, not crash ComfyUI
        logging.getLogger(__name__).error("RECE nodes could not be loaded: %s", exc)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
