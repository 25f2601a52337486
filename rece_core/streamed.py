"""RECE for many concepts: every step from ``d × d`` statistics, the token rows read in chunks.

When the concepts' token rows outnumber ``d``, every erase step is the dense system of
``edit.from_edit`` and every derivation a ``d × d`` map ``K = (PᵀSP + ρI)⁻¹PᵀS``. Both need only
sums over the rows, gathered in one pass (the encoding pass: each chunk is gathered as it is encoded):

- erase step: ``Σ eᵀe`` and ``Σ eᵀ(g − e)`` over the concepts' tail rows (``erase_rows``);
- rounds: the derived rows are ``c Kᵀ``, so ``Σ c'ᵀc' = K C Kᵀ`` and ``Σ c'ᵀ(g − c') = K X − K C Kᵀ``
  with ``C = Σ cᵀc`` and ``X = Σ cᵀg`` over all rows.

Since no step needs a single concept's rows, every step's ``P`` and ``K`` are known before any
report is made. The per-concept diagnostics are quadratic forms of the rows in ``d × d`` matrices
(``report_forms``), so one more pass over the rows reports several steps at once. Nothing of size
``[n_concepts × tokens, d]`` is formed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .transform import LowRankTransform, spd_solve

__all__ = ["Chunk", "Statistics", "chunked", "dense_edit", "gather", "report_chunk", "report_forms", "round_edit"]

@dataclass(frozen=True)
class Chunk:
    """A chunk of concepts on the solve device.

    ``rows: [R, d]`` float64: the concepts' rows one after another, ``sizes[i]`` of them each;
    ``guides[i]``: concept i's guide rows fitted to its length (a shared guide is one tensor);
    ``last``/``guide_last``: the last word token of each concept and of its guide.
    """

    rows: Tensor
    sizes: list[int]
    guides: list[Tensor]
    last: list[int]
    guide_last: list[int]

    def concepts(self) -> Iterator[tuple[Tensor, Tensor, slice, slice]]:
        """Per concept: its rows, its guide's, and the tail slices ``erase_rows`` pairs (concept, guide)."""
        start = 0
        for size, g, fc, fg in zip(self.sizes, self.guides, self.last, self.guide_last):
            n = min(size - fc, g.shape[0] - fg)
            yield self.rows[start:start + size], g, slice(fc, fc + n), slice(fg, fg + n)
            start += size


class Statistics:
    """Sums over every concept's rows (float64, ``[d, d]``) and each concept's denominators."""

    def __init__(self, d: int, device: torch.device) -> None:
        z = lambda: torch.zeros(d, d, dtype=torch.float64, device=device)  # noqa: E731
        self.tail_gram, self.tail_cross = z(), z()  # Σ eᵀe, Σ eᵀ(g − e) over tail rows
        self.gram, self.cross = z(), z()  # C = Σ cᵀc, X = Σ cᵀg over all rows
        self.reach_scale: list[Tensor] = []  # ‖c − g‖²_S per concept
        self.gap_before: list[Tensor] = []  # ‖e − g‖²_S per concept (tail rows)


BLOCK_ROWS = 1024
"""Rows per product in ``gather``: Cancel (``check``) is honoured between blocks, so within one
``[1024, d] × [d, d]`` float64 product (SDXL: 8.6 GFLOP) instead of a whole chunk's."""


def _blocks(rows: Tensor, check: Callable[[], None]) -> Iterator[Tensor]:
    for i in range(0, rows.shape[0], BLOCK_ROWS):
        check()
        yield rows[i:i + BLOCK_ROWS]


def gather(stats: Statistics, s: Tensor, chunk: Chunk, check: Callable[[], None] | None = None) -> None:
    """Add one chunk of concepts to ``stats``: two ``[R, d] × [d, d]`` products, the rest per guide.

    ``Σ cᵀg = Σ_guides (Σ c)ᵀ g`` (and ``Σ eᵀ g_tail`` likewise) for concepts sharing a guide; the
    tails' Gram is the rows' Gram less the few rows outside the tails; the per-concept norms
    ``‖x − y‖²_S = Σ (xS − yS)·(x − y)`` reuse ``cS`` and each guide's ``gS``. The two products run
    ``BLOCK_ROWS`` rows at a time with ``check()`` (Cancel) before each block.
    """
    check = check or (lambda: None)
    rows_s = torch.cat([block @ s for block in _blocks(chunk.rows, check)])
    guide_s: dict[int, tuple[Tensor, Tensor]] = {}  # id → (g, g S)
    sum_rows: dict[int, Tensor] = {}  # Σ c per guide
    sum_tails: dict[tuple[int, int, int], Tensor] = {}  # Σ e per (guide, its tail start, tail length)
    outside: list[Tensor] = []
    reach_scale, gap_before = [], []
    start = 0
    for c, g, tail, guide_tail in chunk.concepts():
        cs = rows_s[start:start + c.shape[0]]
        start += c.shape[0]
        if id(g) not in guide_s:
            guide_s[id(g)] = (g, g @ s)
        gs = guide_s[id(g)][1]
        reach_scale.append(torch.vdot((cs - gs).flatten(), (c - g).flatten()))
        gap_before.append(torch.vdot((cs[tail] - gs[guide_tail]).flatten(), (c[tail] - g[guide_tail]).flatten()))
        outside += [c[:tail.start], c[tail.stop:]]
        key = (id(g), guide_tail.start, guide_tail.stop)
        for sums, k, x in ((sum_rows, id(g), c), (sum_tails, key, c[tail])):
            if k in sums:
                sums[k] += x
            else:
                sums[k] = x.clone()
    gram = torch.zeros_like(stats.gram)
    for block in _blocks(chunk.rows, check):
        gram.addmm_(block.T, block)
    check()
    out = torch.cat(outside)
    tail_gram = torch.addmm(gram, out.T, out, alpha=-1.0)  # Σ eᵀe = Σ cᵀc − Σ (rows outside the tails)ᵀ(...)
    stats.gram += gram
    stats.tail_gram += tail_gram
    for k, x in sum_rows.items():
        stats.cross.addmm_(x.T, guide_s[k][0])
    stats.tail_cross -= tail_gram
    for (k, a, b), x in sum_tails.items():
        stats.tail_cross.addmm_(x.T, guide_s[k][0][a:b])
    stats.reach_scale.append(torch.stack(reach_scale))
    stats.gap_before.append(torch.stack(gap_before))


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


def report_forms(s: Tensor, p: LowRankTransform, k: Tensor, pulled_back: Tensor) -> tuple[Tensor, Tensor]:
    """The ``d × d`` forms of one step's per-concept diagnostics.

    ``Q = A S Aᵀ`` with ``A = KᵀPᵀ − I``: reach's miss ``‖c Kᵀ Pᵀ − c‖²_S = Σ_rows c Q cᵀ`` (float64);
    ``G = PᵀSP`` (``pulled_back``, as the derivation holds it): the guide gap ``‖(e − g)Pᵀ‖²_S =
    Σ_rows (e − g) G (e − g)ᵀ``, in float32 (a ratio shown to 3 digits).
    """
    a = p.apply_rows(k.T)  # Kᵀ Pᵀ
    a.diagonal().sub_(1.0)
    q = a @ s @ a.T
    return (q + q.T) / 2, pulled_back.float()


def _weighted_norm2(x: Tensor, q: Tensor, sizes: list[int], check: Callable[[], None]) -> Tensor:
    """``weighted_norm2(x, q, sizes)`` with the ``[rows, d] × [d, d]`` product in blocks of ``BLOCK_ROWS``
    rows, ``check()`` (Cancel) before each; each row's value is computed as in one product."""
    x = x.to(q.dtype)
    per_row = torch.cat([((block @ q) * block).sum(dim=1) for block in _blocks(x, check)])
    return torch.stack([b.sum() for b in per_row.split(sizes)])


def report_chunk(forms: Sequence[tuple[Tensor, Tensor]], chunk: Chunk,
                 check: Callable[[], None] | None = None) -> list[tuple[Tensor, Tensor]]:
    """Per step of ``forms``, per concept of the chunk: ``(‖c Kᵀ Pᵀ − c‖²_S, ‖(e − g)Pᵀ‖²_S)``; ``check()``
    (Cancel) between blocks of ``BLOCK_ROWS`` rows."""
    check = check or (lambda: None)
    gaps = [(c[tail] - g[guide_tail]).float() for c, g, tail, guide_tail in chunk.concepts()]
    gap_rows, gap_sizes = torch.cat(gaps), [x.shape[0] for x in gaps]
    return [(_weighted_norm2(chunk.rows, q, chunk.sizes, check),
             _weighted_norm2(gap_rows, gm, gap_sizes, check).double()) for q, gm in forms]


def chunked(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
