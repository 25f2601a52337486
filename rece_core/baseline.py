"""The literal per-layer formulation, kept only as a baseline for tests and benchmarks.

Each matrix is edited on its own, as the authors' code does: build ``mat1``/``mat2`` and solve;
the derivation sums ``W'ᵀW'`` and ``W'ᵀW`` over all matrices. Nothing here shares work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["literal_derive", "literal_edit", "literal_rece"]


def literal_edit(weights: Mapping[str, Tensor], erase: Sequence[Tensor], guide: Sequence[Tensor],
                 preserve: Sequence[Tensor], *, lamb: float, erase_scale: float, preserve_scale: float,
                 dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """``W' = (λW + s Σ (W g) eᵀ + p Σ (W r) rᵀ)(λI + s Σ e eᵀ + p Σ r rᵀ)⁻¹`` per matrix."""
    out = {}
    for name, w in weights.items():
        w = w.to(dtype)
        d = w.shape[1]
        mat1 = lamb * w
        mat2 = lamb * torch.eye(d, dtype=dtype, device=w.device)
        for e, g in zip(erase, guide):
            e, g = e.to(dtype), g.to(dtype)
            mat1 = mat1 + erase_scale * (w @ g.T) @ e
            mat2 = mat2 + erase_scale * e.T @ e
        for r in preserve:
            r = r.to(dtype)
            mat1 = mat1 + preserve_scale * (w @ r.T) @ r
            mat2 = mat2 + preserve_scale * r.T @ r
        out[name] = torch.linalg.solve(mat2, mat1, left=False)
    return out


def literal_derive(edited: Mapping[str, Tensor], original: Mapping[str, Tensor], concept: Tensor, *,
                   reg: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """``c' = c · [(Σ W'ᵀW' + ρI)⁻¹ Σ W'ᵀW]ᵀ``."""
    d = concept.shape[1]
    mat1 = reg * torch.eye(d, dtype=dtype, device=concept.device)
    mat2 = torch.zeros(d, d, dtype=dtype, device=concept.device)
    for name, we in edited.items():
        we, wo = we.to(dtype), original[name].to(dtype)
        mat1 = mat1 + we.T @ we
        mat2 = mat2 + we.T @ wo
    return concept.to(dtype) @ torch.linalg.solve(mat1, mat2).T


def literal_rece(weights: Mapping[str, Tensor], erase: Sequence[Tensor], erase_guide: Sequence[Tensor],
                 uce_preserve: Sequence[Tensor], concepts: Sequence[Tensor], guides: Sequence[Tensor],
                 round_preserve: Sequence[Tensor], *, lamb: float, erase_scale: float,
                 preserve_scale: float, reg: float, epochs: int,
                 dtype: torch.dtype = torch.float64) -> tuple[dict[str, Tensor], list[list[Tensor]]]:
    """Erase step, then ``epochs`` rounds of derive + erase. Returns final weights and derived rows."""
    kw = dict(lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale, dtype=dtype)
    w = literal_edit(weights, erase, erase_guide, uce_preserve, **kw)
    derived_all = []
    for _ in range(epochs):
        derived = [literal_derive(w, weights, c, reg=reg, dtype=dtype) for c in concepts]
        derived_all.append(derived)
        w = literal_edit(w, derived, guides, round_preserve, **kw)
    return w, derived_all
