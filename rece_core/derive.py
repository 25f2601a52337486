"""The derive step: the embedding that makes the edited model reproduce the concept anyway."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from .transform import LowRankTransform, spd_solve
from .validation import check_matrix, check_scale, check_weights

__all__ = ["derive_embedding", "derive_with_transform", "gram", "reach", "weighted_norm2"]


def gram(weights: Iterable[Tensor], *, device: torch.device | None = None) -> Tensor:
    """``S = Σ WᵀW: [d, d]`` in float64, accumulated from float32 (or better) products.

    Raises ``ValueError`` if any weight holds NaN or Inf (they surface in ``S``).
    """
    acc: Tensor | None = None
    h = 0
    for w in weights:
        w = w.to(device=device or w.device)
        w = w if w.dtype in (torch.float32, torch.float64) else w.float()
        if acc is None:
            d = w.shape[1]
            h = d // 2
            acc = torch.zeros(d, d, dtype=w.dtype, device=w.device)
        w = w.to(acc.dtype)
        # S is symmetric: accumulate the two diagonal blocks and one off-diagonal block (3/4 of the work)
        wt = w.T
        acc[:h, :h].addmm_(wt[:h], w[:, :h])
        acc[:h, h:].addmm_(wt[:h], w[:, h:])
        acc[h:, h:].addmm_(wt[h:], w[:, h:])
    if acc is None:
        raise ValueError("no weights to form the Gram matrix from")
    acc[h:, :h] = acc[:h, h:].T
    s = acc.to(torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("cross-attention weights contain NaN or Inf (or overflow)")
    return s


def weighted_norm2(x: Tensor, s: Tensor, sizes: list[int] | None = None) -> Tensor:
    """``Σ_layers ‖W x‖²`` summed over rows ``x: [n, d]``, as ``tr(x S xᵀ)``.

    With ``sizes``, one sum per consecutive block of rows: ``[len(sizes)]``.
    """
    x = x.to(s.dtype)
    per_row = ((x @ s) * x).sum(dim=1)
    if sizes is None:
        return per_row.sum()
    return torch.stack([b.sum() for b in per_row.split(sizes)])


def derive_with_transform(s: Tensor, p: LowRankTransform, concept: Tensor, *, reg: float) -> Tensor:
    """``c' = c · [(PᵀSP + ρI)⁻¹ PᵀS]ᵀ`` for ``concept: [n, d]``; returns float64 ``[n, d]``.

    ``S = Σ WᵀW`` of the weights before any erasure, ``W' = W P`` the edited ones.
    """
    reg = check_scale("reg", reg)
    c = concept.to(device=s.device, dtype=torch.float64)
    up, down = p.up.to(s.device), p.down.to(s.device)
    k = s @ up  # S U: [d, r]
    kd = k @ down  # S U D
    # Pᵀ S P = S + S U D + (S U D)ᵀ + Dᵀ (Uᵀ S U) D
    a = s + kd + kd.T + down.T @ ((up.T @ k) @ down)
    a.diagonal().add_(reg)
    rhs = s @ c.T + down.T @ (k.T @ c.T)  # Pᵀ S cᵀ
    return spd_solve(a, rhs, "the derivation system ΣW'ᵀW' + ρI").T


def reach(s: Tensor, p: LowRankTransform, concept: Tensor, derived: Tensor, guide: Tensor,
          sizes: list[int] | None = None) -> Tensor:
    """How much of the concept the derived embedding still reaches on the edited model, in ``[0, 1]``.

    ``1 − Σ‖W'c' − Wc‖² / Σ‖Wc − Wg‖²`` (all ``[n, d]`` rows; ``g`` the guide's): 1 means the
    edited model reproduces the concept's original keys and values exactly, 0 that the derived
    embedding misses them by at least as much as the guide differs from the concept.
    With ``sizes`` (rows of several concepts stacked), one value per concept.
    """
    c = concept.to(device=s.device, dtype=torch.float64)
    scale = weighted_norm2(c - guide.to(device=s.device, dtype=torch.float64), s, sizes)
    miss = weighted_norm2(p.apply_rows(derived.to(s.device)) - c, s, sizes)
    return (1.0 - miss / scale.clamp_min(torch.finfo(torch.float64).tiny)).clamp(0.0, 1.0)


def derive_embedding(edited: Mapping[str, Tensor], original: Mapping[str, Tensor], concept: Tensor, *,
                     reg: float) -> Tensor:
    """``c' = argmin Σ‖W'c' − W c‖² + ρ‖c'‖²`` over all matrices together.

    ``edited``/``original``: the same names → ``[out, d]``; ``concept: [n, d]``.
    Returns ``[n, d]`` float32 (float64 if the concept is float64).
    """
    d = check_weights(edited)
    if check_weights(original) != d or set(edited) != set(original):
        raise ValueError("edited and original weights must have the same names and width")
    check_matrix("concept", concept, d)
    reg = check_scale("reg", reg)
    dev = concept.device
    a = torch.zeros(d, d, dtype=torch.float64, device=dev)
    b = torch.zeros(d, d, dtype=torch.float64, device=dev)
    for k, we in edited.items():
        wo = original[k]
        if wo.shape != we.shape:
            raise ValueError(f"weight {k!r}: edited {tuple(we.shape)} vs original {tuple(wo.shape)}")
        we64, wo64 = we.to(dev, torch.float64), wo.to(dev, torch.float64)
        a += we64.T @ we64
        b += we64.T @ wo64
    a += reg * torch.eye(d, dtype=torch.float64, device=dev)
    out = spd_solve(a, b @ concept.T.to(torch.float64), "the derivation system ΣW'ᵀW' + ρI").T
    return out.to(torch.float64 if concept.dtype == torch.float64 else torch.float32)
