"""The whole RECE procedure: one erase step, then rounds of derive and erase."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .derive import Derivation, gram, reach, weighted_norm2
from .rows import TextEmbedding, erase_rows, fit_rows
from .streamed import Chunk, Statistics, chunked, dense_edit, gather, report_chunk, report_forms, round_edit
from .transform import LowRankTransform
from .validation import check_matrix, check_scale, check_transform, check_weights

CHUNK_ROWS = 8192
"""Token rows encoded and read at a time (a chunk of concepts: 106 of 77 tokens)."""

KEEP_BYTES = 2**30
"""The most encoder output kept between the encoding pass and the report pass (1,700 SDXL prompts in
float32, as ComfyUI's CLIP returns them); beyond it the concepts are encoded again, a chunk at a time,
to report."""

REPORT_BYTES = 256 * 2**20
"""The most ``d × d`` report forms held at once (more steps reported per pass over the rows)."""

__all__ = [
    "CHUNK_ROWS", "KEEP_BYTES", "PRESETS", "REPORT_BYTES", "Erasure", "Preset", "RoundReport", "TextEmbedding",
    "erase_rows", "fit_rows", "rece",
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
    spaces: dict[str, "Erasure"] = field(default_factory=dict)
    """The erasures of the model's other text spaces (``"pooled"``: the pooled text vector), each its
    own transform computed by the same closed form over that space's vectors."""

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


def rece(weights: Mapping[str, Tensor] | Tensor | Callable[[], Tensor], encode: Callable[[str], TextEmbedding],
         concepts: Sequence[str], guide: str | Sequence[str] = "", preserve: Sequence[str] = (), *,
         lamb: float = 0.1, erase_scale: float = 1.0, preserve_scale: float = 0.1,
         reg: float = 0.1, epochs: int = 3, device: torch.device | str | None = None,
         progress: Callable[[int, int], None] | None = None,
         encode_many: Callable[[Sequence[str]], Sequence[TextEmbedding]] | None = None,
         chunk_rows: int = CHUNK_ROWS, tokens: int | None = None, keep_bytes: int | None = None,
         check: Callable[[], None] | None = None) -> Erasure:
    """Erase ``concepts`` as the RECE authors do.

    1. Erase step on each concept's tail rows paired with its guide's (``erase_rows``), preserving
       ``''`` and every ``preserve`` prompt.
    2. ``epochs`` rounds: derive each concept's embedding against the weights before any erasure
       (all token rows, regularised toward zero by ``reg``), then erase the derived rows toward the
       guide's full embedding, preserving ``' '`` once per concept and the ``preserve`` prompts.
       (With an encoder that does not pad, the guide's rows are fitted to the concept's: ``fit_rows``.)

    ``weights``: name → ``[out, d]`` of every layer reading the text rows, their Gram ``Σ WᵀW``, or a
    function returning the Gram (called once the first prompts are encoded, so a wrong encoder is
    refused before any weight is read); ``encode``: the text encoder; an empty guide means the
    unconditional ``' '``; ``encode_many``: the same for a list of prompts at once (default: ``encode``
    one by one).

    Memory: concepts are encoded ``chunk_rows // tokens`` at a time (``tokens``: rows per prompt when
    known in advance, e.g. CLIP's 77; else the first chunk is one concept and the rest are sized by
    it), with the guides, ``''``, ``' '`` and ``preserve`` in the first call. When the concepts' rows
    outnumber ``d``, each chunk is added to ``d × d`` sums as it is encoded (``streamed``), and the
    reports read the rows once more; the encoder outputs are kept for that (as given: their dtype and
    device) while they fit in ``keep_bytes`` (default ``KEEP_BYTES``), and else encoded again, a chunk at
    a time. So memory grows with a chunk, and with the concepts only up to ``keep_bytes``.

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
    keep_bytes = KEEP_BYTES if keep_bytes is None else keep_bytes
    check = check or (lambda: None)
    scales = dict(lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale)

    def encode_part(part: Sequence[str]) -> list[TextEmbedding]:
        """The encoder's outputs for ``part`` (each distinct prompt once), detached, as given."""
        unique = list(dict.fromkeys(part))
        check()
        if encode_many is not None:
            out = list(encode_many(unique))
        else:
            out = []
            for text in unique:
                check()
                out.append(encode(text))
        if len(out) != len(unique):
            raise ValueError(f"the encoder returned {len(out)} embeddings for {len(unique)} prompts")
        found = {t: TextEmbedding(e.rows.detach() if e.rows.requires_grad else e.rows, int(e.last_token))
                 for t, e in zip(unique, out)}
        return [found[t] for t in part]

    # the first call: the prompts every concept needs (guides, '', ' ', preserve), and the first chunk
    fixed_texts = list(dict.fromkeys(guides + ("", " ") + preserve))
    first = list(concepts[:max(1, chunk_rows // tokens) if tokens else 1])
    encoded = encode_part(fixed_texts + first)
    fixed = dict(zip(fixed_texts, encoded))
    first_emb = encoded[len(fixed_texts):]

    dev = torch.device(device) if device is not None else None
    s = _as_gram(weights() if callable(weights) else weights, dev)
    dev, d = s.device, s.shape[0]
    for text, e in fixed.items():  # the concepts are checked chunk by chunk (_refuse_alike)
        check_matrix(f"embedding of {text!r}", e.rows, d)
    per_chunk = max(1, chunk_rows // max(e.rows.shape[0] for e in first_emb))
    rest = len(first)
    # each chunk's concepts and their guides
    parts = [(first, guides[:rest])] + list(zip(chunked(concepts[rest:], per_chunk),
                                                chunked(guides[rest:], per_chunk)))
    streamed = len(concepts) * first_emb[0].rows.shape[0] > d

    def full(e: TextEmbedding) -> TextEmbedding:
        """``e``'s rows in float64 on the solve device."""
        return TextEmbedding(e.rows.to(device=dev, dtype=torch.float64), e.last_token)

    steps = 1 + epochs
    passes = -(-steps // _report_group(d)) if streamed else 0
    total = len(parts) * (1 + passes) + steps
    done = 0

    def tick() -> None:
        nonlocal done
        check()
        done += 1
        if progress is not None:
            progress(done, total)

    preserved = {name: full(fixed[name]).rows for name in ("",) + preserve}
    # The authors preserve ' ' once per concept; given preserve prompts are kept as well (the empty
    # prompt is every negative/unconditional branch, so it must not drift either). n copies of r add
    # n·rᵀr to the erase system, as one copy of √n·r does.
    round_preserve = torch.cat([full(fixed[" "]).rows * math.sqrt(len(concepts))]
                               + [full(fixed[x]).rows for x in preserve])
    keep = not streamed or len(concepts) * _bytes(first_emb[0].rows) <= keep_bytes
    kept: list[list[TextEmbedding]] = []
    passes_made = 0

    def concept_chunks() -> Iterator[tuple[list[TextEmbedding], list[TextEmbedding]]]:
        """One pass over the concepts, a chunk at a time: the first pass encodes (and keeps what it
        may); a later one reads what was kept, or encodes again (the first chunk is held either way)."""
        nonlocal passes_made
        first_pass = passes_made == 0
        passes_made += 1
        for i, (part, part_guides) in enumerate(parts):
            if i == 0:
                emb = first_emb
            elif not first_pass and keep:
                emb = kept[i - 1]
            else:
                emb = encode_part(part)
            if first_pass:
                _refuse_alike(part, emb, part_guides, fixed, d)
                if keep and i:
                    kept.append(emb)
            yield emb, [fixed[g] for g in part_guides]

    if streamed:
        p, rounds = _rece_streamed(s, concept_chunks, preserved, round_preserve, reg=reg, epochs=epochs,
                                   tick=tick, check=check, **scales)
    else:
        for _ in concept_chunks():
            tick()
        concept_emb = [full(e) for part in [first_emb] + kept for e in part]
        guide_emb = [full(fixed[g]) for g in guides]
        p, rounds = _rece_rows(s, concept_emb, guide_emb, preserved, round_preserve, reg=reg, epochs=epochs,
                               tick=tick, **scales)
    check_transform(p.up, p.down)
    return Erasure(
        transform=p.to(dtype=torch.float32), concepts=concepts, guides=guides,
        preserve=preserve, lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale,
        reg=reg, epochs=epochs, rounds=tuple(rounds), seconds=time.perf_counter() - start,
        device=str(dev))


def _bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _refuse_alike(part: Sequence[str], emb: list[TextEmbedding], part_guides: Sequence[str],
                  fixed: Mapping[str, TextEmbedding], d: int) -> None:
    """Check a chunk's embeddings, and refuse a concept that encodes as its guide does."""
    for c, e, g in zip(part, emb, part_guides):
        check_matrix(f"embedding of {c!r}", e.rows, d)
        if _alike(e.rows, fixed[g].rows):
            raise ValueError(f"the concept {c!r} and its guide {g!r} encode to the same text embedding (the "
                             "tokenizer reads them alike), so there is nothing to erase; choose another guide")


def _report_group(d: int) -> int:
    """Steps reported in one pass over the rows: their ``d × d`` forms within ``REPORT_BYTES``."""
    return max(1, REPORT_BYTES // (12 * d * d))  # Q in float64 and G in float32 per step


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


def _on_device(chunks: Iterable[tuple[list[TextEmbedding], list[TextEmbedding]]], dev: torch.device
               ) -> Iterator[Chunk]:
    """Each chunk's rows in float64 on ``dev``: one transfer per chunk; a shared guide moved once per pass."""
    guides: dict[tuple[int, int], Tensor] = {}
    for concept_emb, guide_emb in chunks:
        rows = [e.rows for e in concept_emb]
        host = rows[-1].device
        c = torch.cat([r.to(device=host) for r in rows]).to(device=dev, dtype=torch.float64)
        g = []
        for e, r in zip(guide_emb, rows):
            key = (id(e.rows), r.shape[0])
            if key not in guides:
                if len(guides) >= 8:  # many distinct guides: keep the device copies to a chunk's worth
                    guides.clear()
                guides[key] = fit_rows(e.rows, r.shape[0]).to(device=dev, dtype=torch.float64)
            g.append(guides[key])
        yield Chunk(c, [r.shape[0] for r in rows], g, [e.last_token for e in concept_emb],
                    [e.last_token for e in guide_emb])


def _rece_streamed(s: Tensor, chunks: Callable[[], Iterable[tuple[list[TextEmbedding], list[TextEmbedding]]]],
                   preserved: dict[str, Tensor], round_preserve: Tensor, *, reg: float, epochs: int,
                   tick: Callable[[], None], check: Callable[[], None] | None = None,
                   **scales: float) -> tuple[LowRankTransform, list[RoundReport]]:
    """RECE from ``d × d`` sums; ``chunks()`` makes one pass over the concepts, ``(concept, guide)``
    embeddings a chunk at a time. The first pass gathers the sums; every later pass reports as many
    steps as ``_report_group`` allows."""
    d, dev = s.shape[0], s.device
    stats = Statistics(d, dev)
    for chunk in _on_device(chunks(), dev):
        gather(stats, s, chunk, check)
        tick()
    reach_scale = torch.cat(stats.reach_scale).clamp_min(torch.finfo(torch.float64).tiny)
    gap_before = torch.cat(stats.gap_before).clamp_min(1e-300)
    system = Derivation(s, None, reg=reg)
    (check or (lambda: None))()
    system = system.then(dense_edit(stats.tail_gram, stats.tail_cross, torch.cat(list(preserved.values())), **scales))
    group = _report_group(d)
    rounds: list[RoundReport] = []
    forms: list[tuple[Tensor, Tensor]] = []
    drifts: list[dict[str, float]] = []
    check = check or (lambda: None)
    check()
    k = system.map()
    for step in range(epochs + 1):
        if step:  # Cancel between the step's d × d parts (each one or two [d, d] × [d, d] products)
            check()
            edit = round_edit(stats, k, round_preserve, **scales)
            check()
            system.then(edit)
            check()
            k = system.map()
        check()
        forms.append(report_forms(s, system.p, k, system.system))
        check()
        drifts.append(_drift(s, system.p, preserved))
        tick()
        if len(forms) == group or step == epochs:
            per_chunk = []
            for chunk in _on_device(chunks(), dev):
                per_chunk.append(report_chunk(forms, chunk, check))
                tick()
            for j in range(len(forms)):
                miss = torch.cat([part[j][0] for part in per_chunk])
                gaps = torch.cat([part[j][1] for part in per_chunk])
                reaches = (1.0 - miss / reach_scale).clamp(0.0, 1.0)
                rounds.append(RoundReport(len(rounds), tuple((gaps / gap_before).sqrt().tolist()),
                                          tuple(reaches.tolist()), drifts[j]))
            forms.clear()
            drifts.clear()
    return system.p, rounds
