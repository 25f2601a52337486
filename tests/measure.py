"""Comparisons shared by the tests, on any device (both sides brought to the CPU in float64)."""

from __future__ import annotations

import hashlib

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64 on the CPU, whatever devices ``a`` and ``b`` are on."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def state_hash(model) -> str:
    """SHA-256 of every tensor of ``model.model``'s state dict (names and bytes): equal iff the weights are."""
    h = hashlib.sha256()
    for k, v in sorted(model.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
