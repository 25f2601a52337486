"""Stand-in for current ComfyUI's ``comfy`` package (CI tier); falls back to the 0.3.64 stand-in."""

import os

__path__.append(os.path.join(os.path.dirname(__file__), "..", "..", "standin", "comfy"))  # noqa: F821
