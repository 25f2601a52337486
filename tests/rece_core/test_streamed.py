"""Many concepts: the streamed procedure equals the row-holding one, chunk by chunk, in bounded memory."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rece_core import rece
from rece_core.derive import gram
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


@pytest.mark.parametrize("epochs", [0, 2])
def test_streamed_steps_and_reports_equal_the_row_holding_procedure(tiny, epochs):
    weights, enc = tiny
    s = gram(weights.values())
    guides = [" ", "art", " ", "a building"] * 3
    args = inputs(enc, s, CONCEPTS, guides, ["a cat"])
    p_rows, r_rows = _rece_rows(s, *args, epochs=epochs, tick=lambda: None, **KW)
    p_str, r_str = _rece_streamed(s, *args, per_chunk=5, epochs=epochs, tick=lambda: None, **KW)
    assert rel(p_str.dense(), p_rows.dense()) < 1e-9
    for a, b in zip(r_rows, r_str):
        assert a.step == b.step
        assert a.reach == pytest.approx(b.reach, abs=1e-7)
        assert a.guide_gap == pytest.approx(b.guide_gap, abs=1e-5)  # the row path measures gaps in float32
        assert a.drift == pytest.approx(b.drift, abs=1e-5)


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


def test_encoding_is_chunked_and_cancel_stops_within_it(tiny):
    weights, enc = tiny
    calls: list[int] = []

    def encode_many(texts):
        calls.append(len(texts))
        return [enc(t) for t in texts]

    concepts = [f"concept number {i}" for i in range(30)]
    erasure = rece(weights, enc, concepts, epochs=1, chunk_rows=770, encode_many=encode_many, **KW)
    assert max(calls) <= 10 and sum(calls) == 30 - 1 + 2  # every prompt once ('' and ' ' too)
    assert len(erasure.rounds) == 2

    class Cancelled(Exception):
        pass

    calls.clear()

    def progress(done: int, total: int) -> None:
        if done == 1:
            raise Cancelled

    with pytest.raises(Cancelled):
        rece(weights, enc, concepts, epochs=1, chunk_rows=770, encode_many=encode_many, progress=progress, **KW)
    assert calls == [10]  # the first chunk only: Cancel did not wait for every prompt


def test_progress_counts_every_chunk_and_step(tiny):
    weights, enc = tiny
    seen: list[tuple[int, int]] = []
    rece(weights, enc, [f"c{i}" for i in range(30)], epochs=2, chunk_rows=770,
         progress=lambda d, t: seen.append((d, t)), **KW)
    total = seen[0][1]
    assert [d for d, _ in seen] == list(range(1, total + 1)) and all(t == total for _, t in seen)
    assert total == 4 + 3 + 3 * 3  # encode chunks (31 prompts), gather chunks, 3 steps × 3 report chunks
