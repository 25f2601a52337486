"""Diverse Inversion (Pham et al., arXiv 2404.03631): a large, deliberately diverse set of word
embeddings that each make the model draw the concept; it sets the task-vector strength α.

The paper's code does not include it; this is the pack's reading of the paper, stated in full:

- **Embeddings.** ``N`` token embeddings ``v_i`` (one vector each, the width of the text encoder's
  token table), each used in place of one word of a prompt, as textual inversion does (the host
  puts it in the prompt ``"<v_i>"``). All start from the concept word's own token embedding
  ``e`` plus a seeded offset ``spread · ‖e‖/√d · z_i``, so each starts somewhere else.
- **Loss.** Textual inversion's: the denoising loss ``‖ε − ε_θ(x_t, t, c(v_i))‖²`` on the concept
  latents, one latent, noise and timestep drawn per embedding and step (seeded), plus the
  **diversity term** ``λ · mean_{i≠j} cos(v_i − e, v_j − e)``: the directions in which the
  embeddings leave the concept word are kept apart (without it they collapse onto one solution).
- **Optimiser.** Adam (β 0.9/0.999, no weight decay) on the ``v_i`` only, in the pack's training loop
  (``train.train``); the model and the text encoder are frozen.
- **Stopping measure** (``task_vector.reach``): on a fixed seeded probe (latents, noises, timesteps),
  embedding i reaches the concept on a model while its denoising loss is below the neutral
  (empty-prompt) loss of the unedited model. α is the smallest strength at which no embedding of the
  set reaches it (``task_vector.choose_alpha``). This replaces the paper's classifier, which the pack
  cannot ship: it is measured on noise predictions of the concept latents.

Timesteps are fractions ``t ∈ [0, 1)`` of the model's schedule; the ``loss`` callable maps them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .task_vector import AlphaSearch, choose_alpha, reach
from .train import AdamSettings, Step, train
from .train import Progress as TrainProgress

__all__ = ["Inversion", "LossFn", "Probe", "alpha_for_set", "diverse_inversion", "diversity_term", "make_probe",
           "neutral_loss", "set_losses"]

LossFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``loss(cond [B, T, d], x0 [B, ...], noise [B, ...], t [B]) → [B]`` per-sample denoising loss."""


@dataclass(frozen=True)
class Probe:
    """A fixed seeded evaluation batch: ``x0 [S, ...]``, ``noise [S, ...]``, ``t [S]``."""

    x0: Tensor
    noise: Tensor
    t: Tensor


def make_probe(latents: Tensor, samples: int, seed: int) -> Probe:
    """``samples`` (latent, noise, t) triples cycling through the latents, seeded on the CPU."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(samples) % latents.shape[0]
    x0 = latents.detach().float().cpu()[idx]
    noise = torch.randn(x0.shape, generator=g)
    t = (torch.arange(samples, dtype=torch.float32) + torch.rand(samples, generator=g)) / samples  # stratified
    return Probe(x0.to(latents.device), noise.to(latents.device), t.to(latents.device))


@dataclass(frozen=True)
class Inversion:
    """The learned set: ``embeddings [N, d_tok]`` (float32), the word they started from ``init [d_tok]``,
    the total loss per step, and the final diversity (mean pairwise cosine of the offsets)."""

    embeddings: Tensor
    init: Tensor
    losses: tuple[float, ...]
    diversity: float
    seconds: float = 0.0


def diversity_term(v: Tensor, init: Tensor) -> Tensor:
    """``mean_{i≠j} cos(v_i − e, v_j − e)`` over the ``[N, d]`` set (0 for a single embedding)."""
    n = v.shape[0]
    if n < 2:
        return v.sum() * 0.0
    off = torch.nn.functional.normalize(v - init, dim=-1)
    cos = off @ off.T
    return (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))


def diverse_inversion(encode: Callable[[Tensor], Tensor], loss: LossFn, latents: Tensor, init: Tensor, *,
                      n: int = 8, steps: int = 100, lr: float = 5e-3, diversity: float = 0.1,
                      spread: float = 0.5, seed: int = 0, check: Callable[[], None] | None = None,
                      progress: Callable[[int, int], None] | None = None) -> Inversion:
    """Learn ``n`` embeddings (see the module docstring); ``encode(V [B, d_tok]) → cond [B, T, d]``
    must be differentiable in ``V``. ``latents [M, ...]``: the concept's latents (the model's own
    scaled latent space). Same seed, same result (on the same device)."""
    if n < 1 or steps < 0:
        raise ValueError(f"Diverse Inversion needs n ≥ 1 embeddings and steps ≥ 0 (got n={n}, steps={steps})")
    if latents.shape[0] < 1:
        raise ValueError("Diverse Inversion needs at least one concept latent")
    start = time.perf_counter()
    check = check or (lambda: None)
    e = init.detach().float()
    d = e.shape[-1]
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode(False):
        e = e.clone()
        x_all = latents.detach().float().clone()
        v0 = e + spread * e.norm() / d ** 0.5 * z.to(e.device)

    def objective(trainables: dict[str, Tensor], step: Step) -> Tensor:
        check()
        v = trainables["v"]
        x0 = x_all[step.randint(x_all.shape[0], n).to(x_all.device)]
        noise = torch.randn(x0.shape, generator=step.generator).to(x0.device)
        t = torch.rand(n, generator=step.generator).to(x0.device)
        return loss(encode(v), x0, noise, t).mean() + diversity * diversity_term(v, e)

    def callback(p: TrainProgress) -> None:
        if progress is not None:
            progress(p.step, p.total)
        check()

    result = train({"v": v0}, objective, n_items=1, batch_size=1, epochs=steps,
                   adam=AdamSettings(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), seed=seed,
                   device=e.device, callback=callback) if steps else None
    v = result.trained["v"] if result is not None else v0
    history = result.losses if result is not None else []
    with torch.no_grad():
        div = float(diversity_term(v, e))
    return Inversion(v.detach().clone(), e.clone(), tuple(history), div, time.perf_counter() - start)


@torch.no_grad()
def set_losses(conds: Tensor, loss: LossFn, probe: Probe, batch: int = 16) -> Tensor:
    """``[N]``: each embedding's mean denoising loss over the whole probe (float64); ``conds [N, T, d]``:
    the embeddings encoded (``encode(V)``)."""
    out = []
    s = probe.x0.shape[0]
    for i in range(conds.shape[0]):
        cond = conds[i:i + 1]
        total = 0.0
        for a in range(0, s, batch):
            b = min(s, a + batch)
            total += float(loss(cond.expand(b - a, *cond.shape[1:]), probe.x0[a:b], probe.noise[a:b],
                                probe.t[a:b]).double().sum())
        out.append(total / s)
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def neutral_loss(neutral: Tensor, loss: LossFn, probe: Probe, batch: int = 16) -> float:
    """The neutral conditioning's (``[1, T, d]``) mean denoising loss over the probe."""
    s, total = probe.x0.shape[0], 0.0
    for a in range(0, s, batch):
        b = min(s, a + batch)
        total += float(loss(neutral.expand(b - a, *neutral.shape[1:]), probe.x0[a:b], probe.noise[a:b],
                            probe.t[a:b]).double().sum())
    return total / s


def alpha_for_set(loss_with: Callable[[float], LossFn], encode: Callable[[Tensor], Tensor], embeddings: Tensor,
                  neutral: Tensor, probe: Probe, *, alpha_max: float = 4.0, scan: int = 8, tolerance: float = 0.02,
                  threshold: float = 0.0, check: Callable[[], None] | None = None,
                  ) -> tuple[AlphaSearch, float, Tensor]:
    """Choose α for the set: ``loss_with(α)`` is the denoising loss of the model ``θ − α·τ``.

    Returns the search, the neutral loss of the unedited model and the set's losses there; refuses a
    set in which no embedding beats the neutral prompt on the unedited model (nothing to stop).
    """
    with torch.no_grad():
        conds = encode(embeddings)  # the same at every α: encoded once
    base = loss_with(0.0)
    l0 = neutral_loss(neutral, base, probe)
    base_losses = set_losses(conds, base, probe)
    if not bool((base_losses < l0).any()):
        raise ValueError("none of the inverted embeddings denoises the concept better than the empty prompt "
                         f"(best {float(base_losses.min()):.4g} vs {l0:.4g}); invert with more steps or images")
    search = choose_alpha(lambda a: reach(set_losses(conds, loss_with(a), probe), l0, base_losses),
                          alpha_max=alpha_max, scan=scan, tolerance=tolerance, threshold=threshold, check=check)
    return search, l0, base_losses
