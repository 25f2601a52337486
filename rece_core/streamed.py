"""RECE for many concepts: every step from ``d × d`` statistics, the token rows read in chunks.

When the concepts' token rows outnumber ``d``, every erase step is the dense system of
``edit.from_edit`` and every derivation a ``d × d`` map ``K = (PᵀSP + ρI)⁻¹PᵀS``. Both need only
sums over the rows, gathered in one pass:

- erase step: ``Σ eᵀe`` and ``Σ eᵀ(g − e)`` over the concepts' tail rows (``erase_rows``);
- rounds: the derived rows are ``c Kᵀ``, so ``Σ c'ᵀc' = K C Kᵀ`` and ``Σ c'ᵀ(g − c') = K X − K C Kᵀ``
  with ``C = Σ cᵀc`` and ``X = Σ cᵀg`` over all rows.

The per-concept diagnostics (reach, guide gap) read the rows again, a chunk at a time. Nothing of
size ``[n_concepts × tokens, d]`` is formed; the caller keeps each concept's encoder output (in the
encoder's own dtype, wherever it likes) and hands over chunks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .derive import weighted_norm2
from .rows import TextEmbedding, erase_rows
from .transform import LowRankTransform, spd_solve

__all__ = ["Statistics", "chunked", "dense_edit", "gather", "report_chunk", "round_edit"]

class Statistics:
    """Sums over every concept's rows (float64, ``[d, d]``) and each concept's denominators."""

    def __init__(self, d: int, device: torch.device) -> None:
        z = lambda: torch.zeros(d, d, dtype=torch.float64, device=device)  # noqa: E731
        self.tail_gram, self.tail_cross = z(), z()  # Σ eᵀe, Σ eᵀ(g − e) over tail rows
        self.gram, self.cross = z(), z()  # C = Σ cᵀc, X = Σ cᵀg over all rows
        self.reach_scale: list[Tensor] = []  # ‖c − g‖²_S per concept
        self.gap_before: list[Tensor] = []  # ‖e − g‖²_S per concept (tail rows)


def _tails(c: list[Tensor], g: list[Tensor], fc: list[int], fg: list[int]) -> tuple[list[Tensor], list[Tensor]]:
    pairs = [erase_rows(TextEmbedding(ci, a), TextEmbedding(gi, b)) for ci, gi, a, b in zip(c, g, fc, fg)]
    return [e for e, _ in pairs], [t for _, t in pairs]


def gather(stats: Statistics, s: Tensor, c: list[Tensor], g: list[Tensor], fc: list[int], fg: list[int]) -> None:
    """Add one chunk of concepts (rows ``[T, d]`` each, float64 on ``s``'s device) to ``stats``."""
    e, eg = _tails(c, g, fc, fg)
    tails, tail_guides = torch.cat(e), torch.cat(eg)
    stats.tail_gram.addmm_(tails.T, tails)
    stats.tail_cross.addmm_(tails.T, tail_guides - tails)
    rows, guides = torch.cat(c), torch.cat(g)
    stats.gram.addmm_(rows.T, rows)
    stats.cross.addmm_(rows.T, guides)
    stats.reach_scale.append(weighted_norm2(rows - guides, s, [x.shape[0] for x in c]))
    stats.gap_before.append(weighted_norm2(tails - tail_guides, s, [x.shape[0] for x in e]))


def dense_edit(erase_gram: Tensor, erase_cross: Tensor, preserve: Tensor, *, lamb: float, erase_scale: float,
               preserve_scale: float) -> LowRankTransform:
    """The erase step from its sums: ``P − I = s (M⁻¹ Σ eᵀ(g − e))ᵀ``, ``M = λI + s Σ eᵀe + p RᵀR``.

    ``erase_gram = Σ eᵀe``, ``erase_cross = Σ eᵀ(g − e)``: ``[d, d]``; ``preserve: [m, d]``. Dense (``down = I``).
    """
    d = erase_gram.shape[0]
    m = erase_scale * erase_gram + preserve_scale * (preserve.T @ preserve)
    m.diagonal().add_(lamb)
    delta = erase_scale * spd_solve(m, erase_cross, "the erase system λI + s·Σeeᵀ + p·Σrrᵀ").T
    return LowRankTransform(delta.contiguous(), torch.eye(d, dtype=torch.float64, device=delta.device))


def round_edit(stats: Statistics, k: Tensor, preserve: Tensor, **scales: float) -> LowRankTransform:
    """A RECE round's erase step on the derived rows ``c Kᵀ`` toward the guides' full rows."""
    kc = k @ stats.gram  # K C
    derived_gram = kc @ k.T  # K C Kᵀ
    return dense_edit(derived_gram, k @ stats.cross - derived_gram, preserve, **scales)


def report_chunk(s: Tensor, p: LowRankTransform, k: Tensor, c: list[Tensor], g: list[Tensor], fc: list[int],
                 fg: list[int]) -> tuple[Tensor, Tensor]:
    """Per concept of the chunk: ``‖c Kᵀ Pᵀ − c‖²_S`` (reach's miss) and ``‖(e − g)Pᵀ‖²_S`` (guide gap)."""
    rows = torch.cat(c)
    miss = weighted_norm2(p.apply_rows(rows @ k.T) - rows, s, [x.shape[0] for x in c])
    e, eg = _tails(c, g, fc, fg)
    gaps = weighted_norm2(p.apply_rows(torch.cat(e) - torch.cat(eg)), s, [x.shape[0] for x in e])
    return miss, gaps


def chunked(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
