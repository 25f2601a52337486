"""Comparisons shared by the tests, on any device (both sides brought to the CPU in float64)."""

from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64 on the CPU, whatever devices ``a`` and ``b`` are on."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())
