"""Stand-in for ComfyUI's ``comfy`` package (CI tier only)."""
