"""Where the work runs, ComfyUI's progress bar, and Cancel."""

from __future__ import annotations

import torch

import comfy.model_management
import comfy.utils


def compute_device() -> torch.device:
    return comfy.model_management.get_torch_device()


def solve_device(device: torch.device) -> torch.device:
    """float64 solves run where float64 exists (not on Apple's MPS)."""
    return torch.device("cpu") if device.type == "mps" else device


class Progress:
    """ComfyUI's ProgressBar plus a cancel check at every step."""

    def __init__(self, total: int) -> None:
        self.bar = comfy.utils.ProgressBar(total)
        self.done = 0

    def tick(self) -> None:
        self.at(self.done + 1)

    def at(self, done: int, total: int | None = None) -> None:
        """Cancel if asked to; else show ``done`` of ``total`` (the total may grow as work is known)."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.done = done
        self.bar.update_absolute(done, total)
