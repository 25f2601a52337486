"""The whole RECE procedure: one erase step, then rounds of derive and erase."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .derive import Derivation, gram, reach, weighted_norm2
from .rows import TextEmbedding, erase_rows, fit_rows
from .streamed import Statistics, chunked, dense_edit, gather, report_chunk, round_edit
from .transform import LowRankTransform
from .validation import check_matrix, check_scale, check_transform, check_weights

CHUNK_ROWS = 8192
"""Token rows encoded and read at a time (a chunk of concepts: 106 of 77 tokens)."""

__all__ = [
    "CHUNK_ROWS", "PRESETS", "Erasure", "Preset", "RoundReport", "TextEmbedding", "erase_rows", "fit_rows", "rece",
]


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


def _alike(a: Tensor, b: Tensor) -> bool:
    """Rows equal up to encoder round-off (a relative 1e-6)."""
    if a.shape != b.shape:
        return False
    a, b = a.float(), b.to(device=a.device, dtype=torch.float32)
    return bool((a - b).norm() <= 1e-6 * a.norm())


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
         progress: Callable[[int, int], None] | None = None,
         encode_many: Callable[[Sequence[str]], Sequence[TextEmbedding]] | None = None,
         chunk_rows: int = CHUNK_ROWS, check: Callable[[], None] | None = None) -> Erasure:
    """Erase ``concepts`` as the RECE authors do.

    1. Erase step on each concept's tail rows paired with its guide's (``erase_rows``), preserving
       ``''`` and every ``preserve`` prompt.
    2. ``epochs`` rounds: derive each concept's embedding against the weights before any erasure
       (all token rows, regularised toward zero by ``reg``), then erase the derived rows toward the
       guide's full embedding, preserving ``' '`` once per concept and the ``preserve`` prompts.
       (With an encoder that does not pad, the guide's rows are fitted to the concept's: ``fit_rows``.)

    ``weights``: name → ``[out, d]`` of every layer reading the text rows (or their Gram ``Σ WᵀW``);
    ``encode``: the text encoder; an empty guide means the unconditional ``' '``;
    ``encode_many``: the same for a list of prompts at once (default: ``encode`` one by one).
    Prompts are encoded ``chunk_rows // tokens`` at a time. When the concepts' token rows outnumber
    ``d``, the steps run from ``d × d`` sums and the rows are read a chunk at a time (``streamed``);
    the encoder outputs are kept as given (their own dtype and device), nothing else per row.
    ``progress(done, total)`` is called after each chunk and step; raising from it cancels. ``check()``
    is called before every encoder call and in every loop over chunks and rounds; raising from it
    cancels promptly (e.g. ComfyUI's interrupt check).
    Refuses a concept whose guide encodes to the same rows (nothing to erase) and an erasure with
    ``‖P − I‖`` beyond ``validation.MAX_TRANSFORM_NORM``.
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
    scales = dict(lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale)
    check = check or (lambda: None)

    cache: dict[str, TextEmbedding] = {}  # the encoder's output as given

    def keep(text: str, e: TextEmbedding) -> None:
        check_matrix(f"embedding of {text!r}", e.rows, d)
        cache[text] = TextEmbedding(e.rows.detach(), int(e.last_token))

    def full(text: str) -> TextEmbedding:
        """``text``'s rows in float64 on the solve device."""
        e = cache[text]
        return TextEmbedding(e.rows.to(device=dev, dtype=torch.float64), e.last_token)

    check()
    keep(concepts[0], encode(concepts[0]))
    tokens = cache[concepts[0]].rows.shape[0]
    per_chunk = max(1, chunk_rows // tokens)
    streamed = len(concepts) * tokens > d
    todo = [t for t in dict.fromkeys(concepts + guides + ("", " ") + preserve) if t not in cache]
    n_report = -(-len(concepts) // per_chunk) if streamed else 1
    total = -(-len(todo) // per_chunk) + (1 + epochs) * n_report + (n_report if streamed else 0)
    done = 0

    def tick() -> None:
        nonlocal done
        check()
        done += 1
        if progress is not None:
            progress(done, total)

    def encode_each(part: Sequence[str]) -> list[TextEmbedding]:
        out = []
        for text in part:
            check()
            out.append(encode(text))
        return out

    for part in chunked(todo, per_chunk):
        check()
        out = list(encode_many(part)) if encode_many is not None else encode_each(part)
        if len(out) != len(part):
            raise ValueError(f"the encoder returned {len(out)} embeddings for {len(part)} prompts")
        for text, e in zip(part, out):
            keep(text, e)
        tick()

    for c, g in zip(concepts, guides):
        if _alike(cache[c].rows, cache[g].rows):
            raise ValueError(f"the concept {c!r} and its guide {g!r} encode to the same text embedding (the "
                             "tokenizer reads them alike), so there is nothing to erase; choose another guide")
    preserved = {name: full(name).rows for name in ("",) + preserve}
    # The authors preserve ' ' once per concept; given preserve prompts are kept as well (the empty
    # prompt is every negative/unconditional branch, so it must not drift either). n copies of r add
    # n·rᵀr to the erase system, as one copy of √n·r does.
    round_preserve = torch.cat([full(" ").rows * math.sqrt(len(concepts))] + [full(x).rows for x in preserve])
    if streamed:
        p, rounds = _rece_streamed(s, [cache[c] for c in concepts], [cache[g] for g in guides], preserved,
                                   round_preserve, per_chunk, reg=reg, epochs=epochs, tick=tick, **scales)
    else:
        p, rounds = _rece_rows(s, [full(c) for c in concepts], [full(g) for g in guides], preserved,
                               round_preserve, reg=reg, epochs=epochs, tick=tick, **scales)
    check_transform(p.up, p.down)
    return Erasure(
        transform=p.to(dtype=torch.float32), concepts=concepts, guides=guides,
        preserve=preserve, lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale,
        reg=reg, epochs=epochs, rounds=tuple(rounds), seconds=time.perf_counter() - start,
        device=str(dev))


def _drift(s: Tensor, p: LowRankTransform, preserved: dict[str, Tensor]) -> dict[str, float]:
    """``‖W'r − Wr‖ / ‖Wr‖`` for each preserved prompt."""
    rows = torch.cat(list(preserved.values()))
    sizes = [r.shape[0] for r in preserved.values()]
    moved = weighted_norm2(p.apply_rows(rows) - rows, s, sizes)
    return dict(zip(preserved, (moved / weighted_norm2(rows, s, sizes).clamp_min(1e-300)).sqrt().tolist()))


def _rece_rows(s: Tensor, concept_emb: list[TextEmbedding], guide_emb: list[TextEmbedding],
               preserved: dict[str, Tensor], round_preserve: Tensor, *, reg: float, epochs: int,
               tick: Callable[[], None], **scales: float) -> tuple[LowRankTransform, list[RoundReport]]:
    """RECE holding every concept's rows (float64): few concepts, low-rank steps."""
    pairs = [erase_rows(c, g) for c, g in zip(concept_emb, guide_emb)]
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
        torch.cat([e for e, _ in pairs]), torch.cat([g for _, g in pairs]), preserve_rows, **scales))
    derived = system.derive()
    rounds = [report(0, system.p, derived)]
    tick()
    for epoch in range(1, epochs + 1):
        system.then(LowRankTransform.from_edit(derived, guide_rows, round_preserve, **scales))
        derived = system.derive()
        rounds.append(report(epoch, system.p, derived))
        tick()
    return system.p, rounds


def _rece_streamed(s: Tensor, concept_emb: list[TextEmbedding], guide_emb: list[TextEmbedding],
                   preserved: dict[str, Tensor], round_preserve: Tensor, per_chunk: int, *, reg: float,
                   epochs: int, tick: Callable[[], None], **scales: float
                   ) -> tuple[LowRankTransform, list[RoundReport]]:
    """RECE from ``d × d`` sums, reading the concepts' rows ``per_chunk`` concepts at a time."""
    d, dev = s.shape[0], s.device

    def chunks():
        guides: dict[tuple[int, int], Tensor] = {}  # a shared guide goes to the device once per pass
        for part in chunked(range(len(concept_emb)), per_chunk):
            rows = [concept_emb[i].rows for i in part]
            host = rows[-1].device  # one transfer per chunk, not one per concept
            c = torch.cat([r.to(device=host) for r in rows]).to(device=dev, dtype=torch.float64)
            g = []
            for i, r in zip(part, rows):
                key = (id(guide_emb[i].rows), r.shape[0])
                if key not in guides:
                    if len(guides) >= 8:  # many distinct guides: keep the device copies to a chunk's worth
                        guides.clear()
                    guides[key] = fit_rows(guide_emb[i].rows, r.shape[0]).to(device=dev, dtype=torch.float64)
                g.append(guides[key])
            yield (list(c.split([r.shape[0] for r in rows])), g,
                   [concept_emb[i].last_token for i in part], [guide_emb[i].last_token for i in part])

    stats = Statistics(d, dev)
    for chunk in chunks():
        gather(stats, s, *chunk)
        tick()
    reach_scale = torch.cat(stats.reach_scale).clamp_min(torch.finfo(torch.float64).tiny)
    gap_before = torch.cat(stats.gap_before).clamp_min(1e-300)
    preserve_rows = torch.cat(list(preserved.values()))
    system = Derivation(s, None, reg=reg).then(
        dense_edit(stats.tail_gram, stats.tail_cross, preserve_rows, **scales))

    def report(step: int) -> tuple[RoundReport, Tensor]:
        k = system.map()
        misses, gaps = [], []
        for chunk in chunks():
            miss, gap = report_chunk(s, system.p, k, *chunk)
            misses.append(miss)
            gaps.append(gap)
            tick()
        reaches = (1.0 - torch.cat(misses) / reach_scale).clamp(0.0, 1.0)
        gap = (torch.cat(gaps) / gap_before).sqrt()
        return RoundReport(step, tuple(gap.tolist()), tuple(reaches.tolist()), _drift(s, system.p, preserved)), k

    first, k = report(0)
    rounds = [first]
    for epoch in range(1, epochs + 1):
        system.then(round_edit(stats, k, round_preserve, **scales))
        r, k = report(epoch)
        rounds.append(r)
    return system.p, rounds
