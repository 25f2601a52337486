"""Many concepts: the streamed procedure equals the row-holding one, chunk by chunk, in bounded memory."""

from __future__ import annotations

import gc
import weakref
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rece_core import rece
from rece_core.derive import gram
from rece_core import procedure
from rece_core.procedure import _rece_rows, _rece_streamed
from rece_core.toy import ToyTextEncoder, cross_attention_weights
from measure import rel  # noqa: E402

CONCEPTS = ["nudity", "blood", "Van Gogh", "a castle", "Mickey Mouse", "gore", "Picasso", "a red car",
            "Monet", "weapons", "a dog", "Pikachu"]
KW = dict(lamb=0.1, erase_scale=1.0, preserve_scale=0.1, reg=0.05)


@pytest.fixture(scope="module")
def tiny():
    return cross_attention_weights("tiny", seed=5), ToyTextEncoder(64, seed=5)


def inputs(enc, s, concepts, guides, preserve):
    full = lambda t: type(enc(t))(enc(t).rows.double(), enc(t).last_token)  # noqa: E731
    preserved = {name: full(name).rows for name in ("",) + tuple(preserve)}
    round_preserve = torch.cat([full(" ").rows * len(concepts) ** 0.5] + [full(p).rows for p in preserve])
    return [full(c) for c in concepts], [full(g) for g in guides], preserved, round_preserve


def passes(concept_emb, guide_emb, size):
    """A ``chunks()`` for ``_rece_streamed``: a pass over the embeddings, ``size`` concepts at a time."""
    return lambda: ((concept_emb[i:i + size], guide_emb[i:i + size]) for i in range(0, len(concept_emb), size))


@pytest.mark.parametrize("epochs", [0, 2])
@pytest.mark.parametrize("report_bytes", [1, None])  # one step per report pass, or every step in one pass
def test_streamed_steps_and_reports_equal_the_row_holding_procedure(tiny, epochs, report_bytes, monkeypatch):
    weights, enc = tiny
    s = gram(weights.values())
    guides = [" ", "art", " ", "a building"] * 3
    concept_emb, guide_emb, preserved, round_preserve = inputs(enc, s, CONCEPTS, guides, ["a cat"])
    if report_bytes is not None:
        monkeypatch.setattr(procedure, "REPORT_BYTES", report_bytes)
    p_rows, r_rows = _rece_rows(s, concept_emb, guide_emb, preserved, round_preserve, epochs=epochs,
                                tick=lambda: None, **KW)
    p_str, r_str = _rece_streamed(s, passes(concept_emb, guide_emb, 5), preserved, round_preserve, epochs=epochs,
                                  tick=lambda: None, **KW)
    assert rel(p_str.dense(), p_rows.dense()) < 1e-9
    assert len(r_str) == len(r_rows) == epochs + 1
    for a, b in zip(r_rows, r_str):
        assert a.step == b.step
        assert a.reach == pytest.approx(b.reach, abs=1e-7)
        assert a.guide_gap == pytest.approx(b.guide_gap, abs=1e-5)  # both measure gaps in float32
        assert a.drift == pytest.approx(b.drift, abs=1e-5)
    if epochs:  # the rounds closed holes: every concept is reached less
        assert all(b < a for a, b in zip(r_str[0].reach, r_str[-1].reach))


def test_chunk_size_does_not_change_the_erasure(tiny):
    weights, enc = tiny
    one = rece(weights, enc, CONCEPTS, epochs=1, chunk_rows=77, **KW)  # a concept at a time
    all_ = rece(weights, enc, CONCEPTS, epochs=1, chunk_rows=10_000, **KW)
    assert rel(one.transform.dense(), all_.transform.dense()) < 1e-6
    assert one.rounds[-1].reach == pytest.approx(all_.rounds[-1].reach, abs=1e-6)


class _Float64Rows(TorchDispatchMode):
    """Records the most rows of any float64 matrix created."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.ndim == 2:
                self.rows = max(self.rows, t.shape[0])
        return out


def test_memory_scales_with_a_chunk_not_with_the_number_of_concepts(tiny):
    weights, enc = tiny
    s = gram(weights.values())
    concepts = [f"concept number {i}" for i in range(40)]  # 3080 token rows
    with _Float64Rows() as watch:
        erasure = rece(s, enc, concepts, epochs=1, chunk_rows=770, **KW)
    assert len(erasure.rounds[-1].reach) == 40
    assert watch.rows <= 770 + 3 * 77  # a chunk, or the few preserved prompts (√n·' ', '', ...)


class _Counted:
    """The toy encoder, counting calls and how many of its outputs are alive (not yet freed)."""

    def __init__(self, enc: ToyTextEncoder) -> None:
        self.enc, self.calls, self.encoded = enc, [], Counter()
        self.alive: weakref.WeakSet = weakref.WeakSet()
        self.most_alive = 0

    def watch(self, *_: int) -> None:
        gc.collect()
        self.most_alive = max(self.most_alive, len(self.alive))

    def __call__(self, texts):
        self.watch()
        self.calls.append(len(texts))
        self.encoded.update(texts)
        out = [self.enc(t) for t in texts]
        self.alive.update(e.rows for e in out)
        return out


def test_encoding_is_chunked_and_cancel_stops_within_it(tiny):
    weights, enc = tiny
    counted = _Counted(enc)
    concepts = [f"concept number {i}" for i in range(30)]
    erasure = rece(weights, enc, concepts, epochs=1, chunk_rows=770, tokens=77, encode_many=counted, **KW)
    # the first call: the first chunk with the guide ' ' and ''; then chunks of 10; every prompt once
    assert counted.calls == [12, 10, 10] and set(counted.encoded.values()) == {1}
    assert len(erasure.rounds) == 2

    class Cancelled(Exception):
        pass

    def progress(done: int, total: int) -> None:
        if done == 1:
            raise Cancelled

    counted = _Counted(enc)
    with pytest.raises(Cancelled):
        rece(weights, enc, concepts, epochs=1, chunk_rows=770, encode_many=counted, progress=progress, **KW)
    assert counted.calls == [3]  # the first concept, ' ' and '': Cancel did not wait for every prompt


def test_the_kept_rows_are_bounded_and_the_reports_encode_again_beyond_the_bound(tiny):
    weights, enc = tiny
    concepts = [f"concept number {i}" for i in range(40)]
    kept, again = _Counted(enc), _Counted(enc)
    a = rece(weights, enc, concepts, epochs=2, chunk_rows=770, encode_many=kept, progress=kept.watch, **KW)
    b = rece(weights, enc, concepts, epochs=2, chunk_rows=770, encode_many=again, progress=again.watch,
             keep_bytes=0, **KW)
    assert rel(a.transform.dense(), b.transform.dense()) == 0.0
    assert a.rounds == b.rounds  # the same reports, bit for bit
    assert set(kept.encoded.values()) == {1}  # kept: every prompt encoded once
    assert {again.encoded[c] for c in concepts[1:]} == {2}  # bounded: once more for the report pass
    assert kept.most_alive >= 2 + 40  # kept: every concept's rows alive at once
    assert again.most_alive <= 2 + 1 + 10 + 10  # bounded: '', ' ', the first chunk held, one chunk


def test_progress_counts_every_chunk_and_step(tiny):
    weights, enc = tiny
    seen: list[tuple[int, int]] = []
    rece(weights, enc, [f"c{i}" for i in range(30)], epochs=2, chunk_rows=770,
         progress=lambda d, t: seen.append((d, t)), **KW)
    total = seen[0][1]
    assert [d for d, _ in seen] == list(range(1, total + 1)) and all(t == total for _, t in seen)
    assert total == 4 + 3 + 4  # encode chunks (1 + 10 + 10 + 9 concepts), 3 steps, one report pass of 4 chunks


class _MatmulWork(TorchDispatchMode):
    """Multiply-adds of every matrix product, summed per stretch between two ``check()`` calls."""

    MM = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}

    def __init__(self) -> None:
        super().__init__()
        self.stretches = [0]

    def check(self) -> None:
        self.stretches.append(0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.MM:
            a, b = args[-2], args[-1]
            self.stretches[-1] += a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def test_cancel_is_checked_within_every_few_products(tiny, monkeypatch):
    """Between two Cancel checks there are at most a few ``[d, d] × [d, d]``-sized products (one part of a
    step: a round's erase, or pulling the system back through it, 4–5 here): a chunk's sums and reports run
    in blocks of ``BLOCK_ROWS`` rows, a step's parts are checked between them (before, one stretch held a
    whole chunk's sums, 24 such products here, or a whole step, about 15)."""
    from rece_core import streamed

    weights, enc = tiny
    d = 64
    monkeypatch.setattr(streamed, "BLOCK_ROWS", d)  # a block's product costs d³, a chunk's (770 rows) 12 d³
    s = gram(weights.values())
    concepts = [f"concept number {i}" for i in range(40)]
    with _MatmulWork() as work:
        erasure = rece(s, enc, concepts, epochs=2, chunk_rows=770, check=lambda: work.check(), **KW)
    assert len(erasure.rounds) == 3 and len(work.stretches) > 50
    assert max(work.stretches) <= 6 * d ** 3, sorted(work.stretches)[-5:]
