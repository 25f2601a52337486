"""RECE in a text space of one vector per prompt (a pooled text vector: Flux's ``vector_in``, SD3's ``y_embedder``).

The same closed forms as on the token rows: the UCE edit ``P = I + s (G − E)ᵀ E M⁻¹``
(``LowRankTransform.from_edit``) and the derivation ``c' = c Kᵀ`` (``Derivation``), with
``S = Σ WᵀW`` of the layers reading the pooled vector.

One difference from the rows (``procedure.rece``): each round erases the derived vectors *and the
concepts' own vectors* toward the guides. With one vector per prompt, a round that erased only the
derived vectors moves the concept's image again (measured on the test models: the concept's guide gap
grew from 0.01 after the erase step to 0.69 after two rounds); on the rows, the tail rows of many
tokens keep it in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .derive import Derivation, reach, weighted_norm2
from .procedure import RoundReport
from .transform import LowRankTransform
from .validation import check_scale

__all__ = ["rece_vectors"]


def rece_vectors(s: Tensor, concepts: Tensor, guides: Tensor, preserved: Mapping[str, Tensor], blank: Tensor, *,
                 lamb: float, erase_scale: float, preserve_scale: float, reg: float, epochs: int,
                 check: Callable[[], None] | None = None) -> tuple[LowRankTransform, list[RoundReport]]:
    """RECE over one vector per prompt: ``(P, per-step reports)``.

    ``s``: ``Σ WᵀW`` of the readers ``[d, d]``; ``concepts``, ``guides``: ``[n, d]`` paired row by row;
    ``preserved``: name → ``[1, d]`` kept in the erase step (``''`` and the preserve prompts);
    ``blank``: ``' '``'s vector ``[1, d]``, preserved once per concept in each round (as on the rows).
    """
    check = check or (lambda: None)
    for name, value in (("lamb", lamb), ("erase_scale", erase_scale), ("preserve_scale", preserve_scale),
                        ("reg", reg)):
        check_scale(name, value)
    s = s.to(torch.float64)
    dev = s.device
    e = concepts.to(device=dev, dtype=torch.float64)
    g = guides.to(device=dev, dtype=torch.float64)
    names = list(preserved)
    r = torch.cat([preserved[k].to(device=dev, dtype=torch.float64).reshape(1, -1) for k in names])
    blank = blank.to(device=dev, dtype=torch.float64).reshape(1, -1)
    round_preserve = torch.cat([blank * math.sqrt(e.shape[0]), r[1:]])  # ' ' per concept, then the preserve prompts
    scales = dict(lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale)
    ones = [1] * e.shape[0]
    gap_before = weighted_norm2(e - g, s, ones).clamp_min(1e-300)
    r_norm = weighted_norm2(r, s, [1] * len(names)).clamp_min(1e-300)

    def report(step: int, system: Derivation, derived: Tensor) -> RoundReport:
        p = system.p
        gaps = (weighted_norm2(p.apply_rows(e - g), s, ones) / gap_before).sqrt()
        drift = (weighted_norm2(p.apply_rows(r) - r, s, [1] * len(names)) / r_norm).sqrt()
        reaches = reach(s, p, e, derived, g, ones)
        return RoundReport(step, tuple(gaps.tolist()), tuple(reaches.tolist()), dict(zip(names, drift.tolist())))

    check()
    system = Derivation(s, e, reg=reg).then(LowRankTransform.from_edit(e, g, r, **scales))
    derived = system.derive()
    rounds = [report(0, system, derived)]
    for step in range(1, epochs + 1):
        check()
        system.then(LowRankTransform.from_edit(torch.cat([derived, e]), torch.cat([g, g]), round_preserve, **scales))
        derived = system.derive()
        rounds.append(report(step, system, derived))
    return system.p, rounds
