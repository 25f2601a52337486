"""The whole RECE procedure: one erase step, then rounds of derive and erase."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .derive import Derivation, gram, reach, weighted_norm2
from .transform import LowRankTransform
from .validation import check_matrix, check_scale, check_weights

__all__ = [
    "PRESETS", "Erasure", "Preset", "RoundReport", "TextEmbedding", "erase_rows", "fit_rows", "rece",
]


@dataclass(frozen=True)
class TextEmbedding:
    """A prompt's text-encoder output ``rows: [tokens, d]``.

    ``last_token`` is the index of the prompt's last word token (the tokenizer's attention-mask
    sum minus 2); an empty prompt has ``last_token = 0``, its start token.
    """

    rows: Tensor
    last_token: int


@dataclass(frozen=True)
class Preset:
    """The paper's tuned derivation regularisation ``reg`` (ρ) and rounds for a concept kind."""

    reg: float
    epochs: int


PRESETS: dict[str, Preset] = {
    "nudity": Preset(reg=0.1, epochs=3),
    "unsafe": Preset(reg=0.1, epochs=2),
    "artistic_style": Preset(reg=1e-3, epochs=1),
    "object": Preset(reg=1e-3, epochs=1),
}
"""Concept kinds tuned in the paper (objects also use ρ = 0.1 for some classes)."""


@dataclass(frozen=True)
class RoundReport:
    """Diagnostics after one step (step 0: the erase step; step e ≥ 1: RECE round e).

    ``guide_gap[i]``: ``‖W'(eᵢ − gᵢ)‖ / ‖W(eᵢ − gᵢ)‖`` over concept i's tail rows
    (0: its keys/values landed on the guide's; 1: unchanged).
    ``reach[i]``: how much of concept i the derived embedding still reaches (see ``derive.reach``).
    ``drift[name]``: ``‖W'r − Wr‖ / ‖Wr‖`` for each preserved prompt.
    """

    step: int
    guide_gap: tuple[float, ...]
    reach: tuple[float, ...]
    drift: dict[str, float]


@dataclass(frozen=True)
class Erasure:
    """A computed erasure: ``W' = W P`` for every cross-attention key/value projection."""

    transform: LowRankTransform
    concepts: tuple[str, ...]
    guides: tuple[str, ...]
    preserve: tuple[str, ...]
    lamb: float
    erase_scale: float
    preserve_scale: float
    reg: float
    epochs: int
    rounds: tuple[RoundReport, ...]
    seconds: float = 0.0
    device: str = "cpu"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.transform.dim

    @property
    def rank(self) -> int:
        return self.transform.rank

    def delta(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """LoRA factors of ``W' − W = (W U) Vᵀ``: ``([out, r], [r, d])`` in float32."""
        t = self.transform
        w32 = w.to(device=t.up.device, dtype=torch.float32)
        return w32 @ t.up.float(), t.down.float()

    def apply(self, weights: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        """``W + strength · W (P − I)`` for each weight, in its own dtype."""
        t = self.transform
        out = {}
        for k, w in weights.items():
            dw = t.delta_weight(w.to(device=t.up.device, dtype=torch.float32))
            out[k] = (w.float() + strength * dw.to(w.device)).to(w.dtype)
        return out

    def summary(self) -> str:
        """A short human-readable report."""
        lines = [
            f"RECE erased {', '.join(repr(c) for c in self.concepts)} toward "
            f"{', '.join(repr(g) for g in dict.fromkeys(self.guides))}"
            + (f", preserving {', '.join(repr(p) for p in self.preserve)}" if self.preserve else ""),
            f"λ={self.lamb:g} erase_scale={self.erase_scale:g} preserve_scale={self.preserve_scale:g} "
            f"ρ={self.reg:g} rounds={self.epochs}; rank {self.rank} of {self.dim}; "
            f"{self.seconds:.2f} s on {self.device}",
        ]
        for r in self.rounds:
            name = "erase" if r.step == 0 else f"round {r.step}"
            reach_s = " ".join(f"{x:.3f}" for x in r.reach)
            gap_s = " ".join(f"{x:.3f}" for x in r.guide_gap)
            drift = max(r.drift.values()) if r.drift else 0.0
            lines.append(f"  {name:>8}: reach {reach_s} | guide gap {gap_s} | max preserve drift {drift:.4f}")
        return "\n".join(lines)


def erase_rows(concept: TextEmbedding, guide: TextEmbedding) -> tuple[Tensor, Tensor]:
    """The erase step's paired rows: each prompt from its last word token on, cut to one length.

    As the authors' ``train_uce.edit_model``: with ``f = max(fᶜ, fᵍ)`` over both last-token
    indices, the concept gives rows ``[fᶜ, T − (f − fᶜ))`` and the guide ``[fᵍ, T − (f − fᵍ))``.
    Encoders that do not pad (T5 without padding, Qwen, Gemma) give prompts of different lengths:
    then the two tails are paired row by row up to the shorter one (the same rule when both are ``T``).
    """
    tc, tg = concept.rows.shape[0], guide.rows.shape[0]
    fc, fg = int(concept.last_token), int(guide.last_token)
    if not (0 <= fc < tc and 0 <= fg < tg):
        raise ValueError(f"last_token out of range: concept {fc} of {tc} rows, guide {fg} of {tg}")
    n = min(tc - fc, tg - fg)
    return concept.rows[fc:fc + n], guide.rows[fg:fg + n]


def fit_rows(rows: Tensor, n: int) -> Tensor:
    """``rows: [m, d]`` cut or extended (with copies of its last row) to ``[n, d]``.

    Pairs a guide's full embedding with a concept of another length (encoders that do not pad);
    the identity when both have the same number of rows, as with CLIP's 77.
    """
    m = rows.shape[0]
    if m >= n:
        return rows[:n]
    return torch.cat([rows, rows[-1:].expand(n - m, -1)])


def _as_gram(weights: Mapping[str, Tensor] | Tensor, device: torch.device | None) -> Tensor:
    if isinstance(weights, Tensor):
        s = check_matrix("gram", weights)
        if s.shape[0] != s.shape[1]:
            raise ValueError(f"a Gram matrix must be square, got {tuple(s.shape)}")
        return s.to(device=device or s.device, dtype=torch.float64)
    check_weights(weights, finite=False)  # gram() refuses NaN/Inf from S, one scan instead of 32
    return gram(weights.values(), device=device)


def rece(weights: Mapping[str, Tensor] | Tensor, encode: Callable[[str], TextEmbedding],
         concepts: Sequence[str], guide: str | Sequence[str] = "", preserve: Sequence[str] = (), *,
         lamb: float = 0.1, erase_scale: float = 1.0, preserve_scale: float = 0.1,
         reg: float = 0.1, epochs: int = 3, device: torch.device | str | None = None,
         progress: Callable[[int, int], None] | None = None) -> Erasure:
    """Erase ``concepts`` as the RECE authors do.

    1. Erase step on each concept's tail rows paired with its guide's (``erase_rows``), preserving
       ``''`` and every ``preserve`` prompt.
    2. ``epochs`` rounds: derive each concept's embedding against the weights before any erasure
       (all token rows, regularised toward zero by ``reg``), then erase the derived rows toward the
       guide's full embedding, preserving ``' '`` once per concept and the ``preserve`` prompts.
       (With an encoder that does not pad, the guide's rows are fitted to the concept's: ``fit_rows``.)

    ``weights``: name → ``[out, d]`` of every layer reading the text rows (or their Gram ``Σ WᵀW``);
    ``encode``: the text encoder; an empty guide means the unconditional ``' '``.
    ``progress(done, total)`` is called after each step; raising from it cancels.
    """
    start = time.perf_counter()
    lamb = check_scale("lamb", lamb)
    erase_scale = check_scale("erase_scale", erase_scale)
    preserve_scale = check_scale("preserve_scale", preserve_scale)
    reg = check_scale("reg", reg)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    concepts = tuple(str(c).strip() for c in concepts)
    if not concepts or any(not c for c in concepts):
        raise ValueError("every concept must be a non-empty prompt")
    guides = (guide,) * len(concepts) if isinstance(guide, str) else tuple(guide)
    if len(guides) == 1 and len(concepts) > 1:
        guides = guides * len(concepts)
    if len(guides) != len(concepts):
        raise ValueError(f"{len(concepts)} concepts but {len(guides)} guides; give one guide or one per concept")
    guides = tuple(g.strip() or " " for g in guides)
    preserve = tuple(p.strip() for p in preserve if p.strip())

    dev = torch.device(device) if device is not None else None
    s = _as_gram(weights, dev)
    dev = s.device
    d = s.shape[0]
    total = 1 + epochs + 1
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    cache: dict[str, TextEmbedding] = {}

    def emb(text: str) -> TextEmbedding:
        if text not in cache:
            e = encode(text)
            check_matrix(f"embedding of {text!r}", e.rows, d)
            cache[text] = TextEmbedding(e.rows.to(device=dev, dtype=torch.float64), int(e.last_token))
        return cache[text]

    concept_emb = [emb(c) for c in concepts]
    guide_emb = [emb(g) for g in guides]
    preserved = {name: emb(name).rows for name in ("",) + preserve}
    pairs = [erase_rows(c, g) for c, g in zip(concept_emb, guide_emb)]
    tick()

    concept_rows = torch.cat([c.rows for c in concept_emb])
    guide_rows = torch.cat([fit_rows(g.rows, c.rows.shape[0]) for c, g in zip(concept_emb, guide_emb)])
    concept_sizes = [c.rows.shape[0] for c in concept_emb]
    gap_rows = torch.cat([e - g for e, g in pairs])
    gap_sizes = [e.shape[0] for e, _ in pairs]
    preserve_rows = torch.cat(list(preserved.values()))
    preserve_sizes = [r.shape[0] for r in preserved.values()]
    gap_before = weighted_norm2(gap_rows, s, gap_sizes).clamp_min(1e-300)
    preserve_norm = weighted_norm2(preserve_rows, s, preserve_sizes).clamp_min(1e-300)
    # gaps and drift need ~6 digits, not float64: one float32 pass over their rows per step
    s32 = s.float()
    moved_rows = torch.cat([gap_rows, preserve_rows]).float()
    n_gap, n_gap_rows = len(gap_sizes), gap_rows.shape[0]
    reach_scale = weighted_norm2(concept_rows - guide_rows, s, concept_sizes)

    def report(step: int, p: LowRankTransform, derived: Tensor) -> RoundReport:
        moved = p.to(dtype=torch.float32).apply_rows(moved_rows)  # gaps: (e−g)Pᵀ
        moved[n_gap_rows:] -= moved_rows[n_gap_rows:]  # drift: rPᵀ − r
        sums = weighted_norm2(moved, s32, gap_sizes + preserve_sizes).double()
        gaps = (sums[:n_gap] / gap_before).sqrt()
        drift = (sums[n_gap:] / preserve_norm).sqrt()
        reaches = reach(s, p, concept_rows, derived, guide_rows, concept_sizes, scale=reach_scale)
        return RoundReport(step, tuple(gaps.tolist()), tuple(reaches.tolist()),
                           dict(zip(preserved, drift.tolist())))

    # one derivation for every concept at a time: the system depends only on S, P and ρ
    system = Derivation(s, concept_rows, reg=reg).then(LowRankTransform.from_edit(
        torch.cat([e for e, _ in pairs]), torch.cat([g for _, g in pairs]), preserve_rows,
        lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale))
    derived = system.derive()
    rounds = [report(0, system.p, derived)]
    tick()

    # The authors preserve ' ' once per concept; given preserve prompts are kept as well (the empty
    # prompt is every negative/unconditional branch, so it must not drift either). n copies of r add
    # n·rᵀr to the erase system, as one copy of √n·r does.
    space = emb(" ").rows * math.sqrt(len(concepts))
    round_preserve = torch.cat([space] + [emb(x).rows for x in preserve])
    for epoch in range(1, epochs + 1):
        system.then(LowRankTransform.from_edit(
            derived, guide_rows, round_preserve,
            lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale))
        derived = system.derive()
        rounds.append(report(epoch, system.p, derived))
        tick()

    p = system.p
    return Erasure(
        transform=p.to(dtype=torch.float32), concepts=concepts, guides=guides,
        preserve=preserve, lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale,
        reg=reg, epochs=epochs, rounds=tuple(rounds), seconds=time.perf_counter() - start,
        device=str(dev))
