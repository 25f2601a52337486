"""Task vectors (Pham et al., *Robust Concept Erasure Using Task Vectors*, arXiv 2404.03631).

Fine-tuning a model toward a concept gives the task vector ``τ = θ_ft − θ``; the concept is erased
by ``θ − α·τ`` (the authors' ``save_tv.py`` negates τ and adds it at ``scaling_coef = α`` over every
UNet tensor; their script uses α = 1.75). A LoRA of the concept is a task vector too: its layer
deltas ``τ_l = (alpha / r) · up @ down`` are what ComfyUI's loader adds at strength 1.

The strength α is chosen by Diverse Inversion (``diverse_inversion``): the smallest α at which no
embedding of the inverted set still reaches the concept, by the stopping measure ``reach`` below.

Pure PyTorch; weights are ``name → tensor`` mappings, deltas float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["AlphaSearch", "LoRALayer", "apply_task_vector", "choose_alpha", "lora_task_vector", "rank_layers",
           "reach", "task_vector", "top_layers"]


def task_vector(base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``τ = θ_ft − θ`` (float32) of every floating tensor both hold; integer buffers are skipped,
    as in the authors' ``TaskVector``. Keys that differ in shape are refused; unchanged tensors give
    zero deltas and are dropped."""
    out = {}
    for key, w in base.items():
        if key not in finetuned or not w.is_floating_point():
            continue
        ft = finetuned[key]
        if ft.shape != w.shape:
            raise ValueError(f"task vector: {key} has shape {tuple(ft.shape)} in the fine-tune, "
                             f"{tuple(w.shape)} in the base model")
        delta = ft.detach().float() - w.detach().float().to(ft.device)
        if bool(delta.any()):
            out[key] = delta
    return out


def apply_task_vector(base: Mapping[str, Tensor], tau: Mapping[str, Tensor], alpha: float,
                      keys: list[str] | None = None) -> dict[str, Tensor]:
    """``θ − α·τ`` on the keys of ``tau`` (or the subset ``keys``), each in its weight's dtype."""
    chosen = list(tau) if keys is None else keys
    out = {}
    for key in chosen:
        w = base[key]
        out[key] = (w.detach().float() - alpha * tau[key].to(w.device).float()).to(w.dtype)
    return out


@dataclass(frozen=True)
class LoRALayer:
    """One layer of a LoRA: ``Δ = (alpha / r) · up @ down`` (``alpha=None``: scale 1, as ComfyUI).

    ``up: [out, r, (1, 1)]``, ``down: [r, in, (kh, kw)]``; ``shape``: the weight's shape.
    """

    up: Tensor
    down: Tensor
    alpha: float | None
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> Tensor:
        """The weight delta ``[shape]`` in float32."""
        scale = 1.0 if self.alpha is None else self.alpha / self.rank
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        return (scale * (up @ down)).reshape(self.shape)


def lora_task_vector(layers: Mapping[str, LoRALayer]) -> dict[str, Tensor]:
    """The task vector of a LoRA: each layer's delta at strength 1."""
    return {key: layer.delta() for key, layer in layers.items()}


def reach(losses: Tensor, neutral: float, base_losses: Tensor) -> Tensor:
    """The stopping measure: how much of each embedding's grip on the concept remains.

    ``losses [N]``: each embedding's denoising loss on the concept latents on the edited model;
    ``base_losses [N]``: the same on the unedited model; ``neutral``: the neutral (empty-prompt)
    embedding's loss on the unedited model. ``reach_i = (L_∅(θ) − L_i(θ')) / (L_∅(θ) − L_i(θ))``:
    1 on the unedited model, 0 once the embedding denoises the concept no better than the neutral
    prompt did before the edit, negative beyond. Embeddings that never beat the neutral prompt are NaN.
    """
    gain = neutral - base_losses.double()
    out = (neutral - losses.double()) / gain
    return torch.where(gain > 0, out, torch.full_like(out, math.nan))


@dataclass(frozen=True)
class AlphaSearch:
    """The α at which the set stops reaching the concept (``max_i reach_i(α) ≤ threshold``).

    ``curve``: every ``(α, max reach)`` evaluated, in the order evaluated; ``found``: False when even
    ``alpha_max`` leaves an embedding reaching the concept (``alpha`` is then ``alpha_max``).
    """

    alpha: float
    found: bool
    curve: tuple[tuple[float, float], ...] = field(default_factory=tuple)
    reach: tuple[float, ...] = ()


def choose_alpha(reach_at: Callable[[float], Tensor], alpha_max: float = 4.0, scan: int = 8,
                 tolerance: float = 0.02, threshold: float = 0.0,
                 check: Callable[[], None] | None = None) -> AlphaSearch:
    """Smallest α in ``(0, alpha_max]`` with ``max reach_at(α) ≤ threshold``: a scan of ``scan``
    equal steps finds the first stopped α, then bisection of the step before it down to ``tolerance``
    (so the first crossing is found even where the measure is not monotone beyond it).

    ``reach_at(α)``: ``[N]`` reach of every embedding (NaN entries ignored).
    """
    if not (alpha_max > 0 and math.isfinite(alpha_max)):
        raise ValueError(f"alpha_max must be a positive finite number, got {alpha_max}")
    check = check or (lambda: None)
    curve: list[tuple[float, float]] = []
    cache: dict[float, Tensor] = {}

    def worst(alpha: float) -> float:
        check()
        r = reach_at(alpha).double()
        cache[alpha] = r
        valid = r[~torch.isnan(r)]
        value = float(valid.max()) if valid.numel() else -math.inf
        curve.append((alpha, value))
        return value

    lo, hi = 0.0, None
    for k in range(1, scan + 1):
        a = alpha_max * k / scan
        if worst(a) <= threshold:
            hi = a
            break
        lo = a
    if hi is None:
        return AlphaSearch(alpha_max, False, tuple(curve), tuple(cache[alpha_max].tolist()))
    while hi - lo > tolerance:
        mid = 0.5 * (lo + hi)
        if worst(mid) <= threshold:
            hi = mid
        else:
            lo = mid
    return AlphaSearch(hi, True, tuple(curve), tuple(cache[hi].tolist()))


def rank_layers(grads: Mapping[str, Tensor], tau: Mapping[str, Tensor]) -> list[tuple[str, float]]:
    """Per-layer ranking for the weight subset: ``s_l = −⟨∇_{θ_l} L, τ_l⟩``, highest first.

    ``L`` is the inverted set's denoising loss on the concept; ``dL/dα`` of ``θ − α·τ`` at α = 0 is
    ``Σ_l s_l``, so ``s_l`` is how fast subtracting layer l's share of τ takes the concept away from
    the set (first order; one backward pass ranks every layer). Float64 sums.
    """
    scores = [(k, -float((grads[k].double() * tau[k].double().to(grads[k].device)).sum())) for k in tau if k in grads]
    return sorted(scores, key=lambda kv: kv[1], reverse=True)


def top_layers(ranking: list[tuple[str, float]], fraction: float) -> list[str]:
    """The highest-ranked layers whose positive scores add up to ``fraction`` of all positive
    scores (``fraction ≥ 1``: every layer of the ranking)."""
    if fraction >= 1.0:
        return [k for k, _ in ranking]
    total = sum(s for _, s in ranking if s > 0)
    out, acc = [], 0.0
    for key, score in ranking:
        if score <= 0 or acc >= fraction * total:
            break
        out.append(key)
        acc += score
    return out or [ranking[0][0]]
