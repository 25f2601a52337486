"""The erase step (UCE's closed-form edit) over a set of cross-attention projections."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .transform import LowRankTransform
from .validation import check_rows, check_scale, check_weights

__all__ = ["closed_form_edit", "edit_transform", "stack_rows"]


def stack_rows(name: str, blocks: Sequence[Tensor] | Tensor, d: int, *,
               device: torch.device | None = None) -> Tensor:
    """Validate ``[n_i, d]`` blocks and stack them into one float64 ``[Σn_i, d]`` matrix."""
    rows = check_rows(name, blocks, d)
    if not rows:
        return torch.zeros(0, d, dtype=torch.float64, device=device)
    return torch.cat([r.to(device=device or r.device, dtype=torch.float64) for r in rows])


def edit_transform(erase: Sequence[Tensor] | Tensor, guide: Sequence[Tensor] | Tensor,
                   preserve: Sequence[Tensor] | Tensor, d: int, *, lamb: float, erase_scale: float,
                   preserve_scale: float, device: torch.device | None = None) -> LowRankTransform:
    """The transform ``P`` of one erase step; ``erase[i]`` and ``guide[i]`` are ``[n_i, d]``."""
    lamb = check_scale("lamb", lamb)
    erase_scale = check_scale("erase_scale", erase_scale)
    preserve_scale = check_scale("preserve_scale", preserve_scale)
    erase_l = check_rows("erase", erase, d)
    guide_l = check_rows("guide", guide, d)
    if not erase_l:
        raise ValueError("nothing to erase: erase is empty")
    if len(erase_l) != len(guide_l):
        raise ValueError(f"erase has {len(erase_l)} blocks but guide has {len(guide_l)}; pair them one to one")
    for i, (e, g) in enumerate(zip(erase_l, guide_l)):
        if e.shape != g.shape:
            raise ValueError(f"erase[{i}] has shape {tuple(e.shape)} but guide[{i}] has {tuple(g.shape)}")
    dev = device or erase_l[0].device
    return LowRankTransform.from_edit(
        stack_rows("erase", erase_l, d, device=dev), stack_rows("guide", guide_l, d, device=dev),
        stack_rows("preserve", preserve, d, device=dev),
        lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale)


def closed_form_edit(weights: Mapping[str, Tensor], erase: Sequence[Tensor] | Tensor,
                     guide: Sequence[Tensor] | Tensor, preserve: Sequence[Tensor] | Tensor, *,
                     lamb: float = 0.1, erase_scale: float = 1.0,
                     preserve_scale: float = 0.1) -> dict[str, Tensor]:
    """``W' = (λW + s·Σ (W gᵢ) eᵢᵀ + p·Σ (W r) rᵀ)(λI + s·Σ eᵢeᵢᵀ + p·Σ r rᵀ)⁻¹`` for every ``W``.

    ``weights``: name → ``[out, d]``; ``erase[i]``/``guide[i]``: ``[n_i, d]`` paired rows;
    ``preserve``: ``[m, d]`` blocks. Returns name → ``[out, d]`` in each weight's own dtype.
    """
    d = check_weights(weights)
    first = next(iter(weights.values()))
    p = edit_transform(erase, guide, preserve, d, lamb=lamb, erase_scale=erase_scale,
                       preserve_scale=preserve_scale, device=first.device)
    return {k: p.apply_weight(w).to(w.dtype) for k, w in weights.items()}
