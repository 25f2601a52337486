"""ConceptPrune (Chavhan et al., ICLR 2025): training-free pruning of the feed-forward weights that draw a concept.

Steps, as the authors' code does them (``wanda/wanda.py``, ``neuron_receivers/wanda_receiver.py``,
``wanda/save_union_over_time.py``):

1. Sample base and concept prompts with a fixed seed; at every step ``t``, for every feed-forward
   output layer ``l`` (``W: [out, in]``), every input row ``x`` (each token of each batch entry,
   the unconditional branch of classifier-free guidance included) is normalised to unit length and
   the column norms ``‖X_j‖ = sqrt(Σ_rows x_j²)`` are accumulated over all prompts of a side
   (``ColumnStats``).
2. WANDA score ``S = |W| ⊙ ‖X_j‖`` (the norm broadcast along each row), for each side.
3. At each step, a weight is *skilled* when it is among the top ``int(skill_ratio · in)`` of its row
   by the concept's score AND the concept's score beats the base prompts' score (``skilled_mask``).
4. The union of the skilled masks over the first τ steps (``union_mask``) is pruned:
   ``W ← W ⊙ (1 − M)`` (``pruned``).

Pure PyTorch; no ComfyUI import. Statistics accumulate in float64 (the authors' in float16).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ColumnStats", "PruneResult", "Slice", "masked_indices", "pruned", "skilled_mask", "union_mask"]

Slice = tuple[int, int] | None
"""Columns ``[start, end)`` of a layer's input that belong to its feed-forward (``None``: all of them)."""


class ColumnStats:
    """Per step and layer, ``Σ_rows x_j²`` of the unit-normalised input rows (float64 ``[in]``, on the CPU)."""

    def __init__(self) -> None:
        self.sq: dict[tuple[int, str], Tensor] = {}
        self.rows: dict[tuple[int, str], int] = {}

    def add(self, step: int, layer: str, x: Tensor) -> None:
        """Add the rows of ``x: [..., in]`` (every leading dimension is rows) at ``step`` for ``layer``."""
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        rows = F.normalize(rows, p=2, dim=1)  # each token row to unit length (the authors' "avoid inf")
        sq = (rows if rows.device.type == "mps" else rows.double()).pow(2).sum(dim=0).to("cpu", torch.float64)
        key = (step, layer)
        if key in self.sq:
            self.sq[key] += sq
            self.rows[key] += rows.shape[0]
        else:
            self.sq[key] = sq
            self.rows[key] = rows.shape[0]

    def norms(self, step: int, layer: str) -> Tensor:
        """``‖X_j‖`` at ``step`` for ``layer`` (float64 ``[in]``); ``KeyError`` if nothing was recorded."""
        return self.sq[(step, layer)].sqrt()

    def steps(self) -> list[int]:
        return sorted({t for t, _ in self.sq})

    def layers(self) -> list[str]:
        return sorted({name for _, name in self.sq})


def skilled_mask(w: Tensor, norm_concept: Tensor, norm_base: Tensor, skill_ratio: float) -> Tensor:
    """Step 3 for one layer and step: ``bool [out, in]`` of ``w: [out, in]`` and the column norms ``[in]``."""
    abs_w = w.abs().double()
    s_concept = abs_w * norm_concept.to(abs_w)
    s_base = abs_w * norm_base.to(abs_w)
    k = int(skill_ratio * w.shape[1])
    top = torch.zeros_like(abs_w, dtype=torch.bool)
    if k > 0:
        top.scatter_(1, torch.topk(s_concept, k, dim=1, sorted=False).indices, True)
    return top & (s_concept > s_base)


def union_mask(w: Tensor, concept: ColumnStats, base: ColumnStats, layer: str, tau: int, skill_ratio: float,
               cols: Slice = None) -> Tensor:
    """Step 4: the union of the skilled masks of steps ``0 … τ−1`` (``bool``, ``w``'s shape).

    With ``cols``, only those input columns are the feed-forward's (Flux's ``linear2`` reads the
    attention output and the MLP's together): scores and the top share are taken among them.
    """
    start, end = cols if cols is not None else (0, w.shape[1])
    part = w[:, start:end]
    out = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    for t in range(tau):
        out[:, start:end] |= skilled_mask(part, concept.norms(t, layer).to(w.device),
                                          base.norms(t, layer).to(w.device), skill_ratio)
    return out


def masked_indices(mask: Tensor) -> Tensor:
    """Flat (row-major) indices of a mask's ``True`` entries, int64, ascending."""
    return mask.reshape(-1).nonzero().reshape(-1).to(torch.int64).cpu()


def pruned(w: Tensor, indices: Tensor, strength: float = 1.0) -> Tensor:
    """``W ⊙ (1 − M)`` (at strength s: ``W − s · W ⊙ M``), ``M`` by its flat ``indices``; a new tensor."""
    out = w.clone()
    flat = out.view(-1)
    idx = indices.to(device=w.device, dtype=torch.int64)
    flat[idx] = flat[idx] * (1.0 - strength) if strength != 1.0 else 0
    return out


@dataclass(frozen=True)
class PruneResult:
    """A ConceptPrune mask: per weight key (``diffusion_model.…``), the pruned flat indices of ``[out, in]``."""

    indices: dict[str, Tensor]
    shapes: dict[str, tuple[int, int]]
    concepts: tuple[str, ...]
    architecture: str = "unet"
    kind: str = "custom"
    settings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def pruned_count(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def layer_weights(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def layers(self) -> list[dict]:
        """Per layer: key, pruned count, share of the layer."""
        return [{"key": k, "pruned": int(self.indices[k].numel()), "weights": math.prod(self.shapes[k]),
                 "share": int(self.indices[k].numel()) / max(1, math.prod(self.shapes[k]))}
                for k in self.shapes]

    def summary(self, model_weights: int | None = None) -> str:
        """The report: pruned weights per layer, share of the feed-forward layers (and of the model)."""
        n = self.pruned_count
        lines = [f"ConceptPrune of {', '.join(map(repr, self.concepts))} ({self.kind}): {n:,} weights pruned in "
                 f"{len(self.shapes)} feed-forward output layers, {n / max(1, self.layer_weights):.3%} of them"
                 + (f", {n / model_weights:.4%} of the diffusion model" if model_weights else "")]
        s = self.settings
        if s:
            lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in s.items()))
        for layer in self.layers():
            lines.append(f"  {layer['key'].removeprefix('diffusion_model.')}: {layer['pruned']:,} "
                         f"({layer['share']:.3%})")
        return "\n".join(lines)


def build_result(masks: Iterable[tuple[str, Tensor]], concepts: Iterable[str], **kw) -> PruneResult:
    """A ``PruneResult`` from ``(key, mask)`` pairs."""
    indices, shapes = {}, {}
    for key, mask in masks:
        indices[key] = masked_indices(mask)
        shapes[key] = (int(mask.shape[0]), int(mask.shape[1]))
    return PruneResult(indices, shapes, tuple(concepts), **kw)
