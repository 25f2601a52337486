"""Input checks shared by the engine: every problem becomes a ``ValueError`` naming it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["MAX_TRANSFORM_NORM", "check_matrix", "check_rows", "check_scale", "check_transform", "check_weights"]

MAX_TRANSFORM_NORM = 1e6
"""Largest ``‖P − I‖_F`` accepted: a real erasure is orders of magnitude below (tens at most); beyond
it ``W (P − I)`` swamps the weights and, for huge factors, overflows (NaN images)."""


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


def check_transform(up: Tensor, down: Tensor, what: str = "the erasure") -> float:
    """Factors of ``P − I = up @ down`` that are finite and give ``‖P − I‖_F ≤ MAX_TRANSFORM_NORM``;
    returns ``‖P − I‖_F``.

    ``‖U V‖_F² = tr((UᵀU)(VVᵀ))`` in float64, from the ``[r, r]`` Gram matrices (no ``d × d`` product).
    """
    if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
        raise ValueError(f"{what} contains NaN or Inf")
    u, v = up.to(torch.float64), down.to(torch.float64)
    if v.shape[0] == v.shape[1] and bool(torch.equal(v, torch.eye(v.shape[0], dtype=v.dtype, device=v.device))):
        norm = float(u.norm())  # dense P − I (down = I)
    else:
        norm = math.sqrt(max(float(((u.T @ u) * (v @ v.T)).sum()), 0.0))
    if not norm <= MAX_TRANSFORM_NORM:
        raise ValueError(f"{what} is absurdly large (‖P − I‖ = {norm:.3g}, limit {MAX_TRANSFORM_NORM:g}): it would "
                         "swamp or overflow the model's weights; increase lamb or lower erase_scale")
    return norm
