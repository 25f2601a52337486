"""Input checks shared by the engine: every problem becomes a ``ValueError`` naming it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["check_matrix", "check_rows", "check_scale", "check_weights"]


def check_scale(name: str, value: float, *, positive: bool = False) -> float:
    """A finite, non-negative (or strictly positive) float."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'}, got {value}")
    return value


def check_matrix(name: str, w: Tensor, d: int | None = None, *, finite: bool = True) -> Tensor:
    """A 2-D floating tensor ``[out, d]``, finite unless ``finite=False`` (checked later)."""
    if not isinstance(w, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [out, d] matrix, got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)})")
    if not w.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {w.dtype}")
    if d is not None and w.shape[1] != d:
        raise ValueError(f"{name} has width {w.shape[1]}, expected {d} (the text-embedding width)")
    if finite and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return w


def check_weights(weights: Mapping[str, Tensor], *, finite: bool = True) -> int:
    """Validate a name → ``[out, d]`` mapping; return the common width ``d``.

    ``finite=False`` skips the NaN/Inf scan, for callers that check the Gram matrix instead.
    """
    if not isinstance(weights, Mapping) or len(weights) == 0:
        raise ValueError("weights must be a non-empty mapping of name -> [out, d] tensor")
    d: int | None = None
    for name, w in weights.items():
        check_matrix(f"weight {name!r}", w, d, finite=finite)
        d = w.shape[1]
    assert d is not None
    return d


def check_rows(name: str, rows: Sequence[Tensor] | Tensor, d: int) -> list[Tensor]:
    """A list of finite ``[n, d]`` row blocks (a single tensor is one block)."""
    if isinstance(rows, Tensor):
        rows = [rows]
    out = []
    for i, r in enumerate(rows):
        if isinstance(r, Tensor) and r.ndim == 1:
            r = r.unsqueeze(0)
        out.append(check_matrix(f"{name}[{i}]", r, d))
    return out
