"""The engine against the literal per-layer equations, and the properties a user relies on."""

from __future__ import annotations


import pytest
import torch

from rece_core import (PRESETS, TextEmbedding, closed_form_edit, derive_embedding, edit_transform,
                       erase_rows, rece)
from rece_core.baseline import literal_derive, literal_edit, literal_rece
from rece_core.derive import Derivation, gram
from rece_core.toy import ToyTextEncoder, cross_attention_weights
from measure import rel  # noqa: E402


@pytest.fixture(scope="module")
def sd15():
    return cross_attention_weights("sd15", seed=1), ToyTextEncoder(768, seed=1)


# to_k and to_v of six of SD1.5's sixteen attention blocks, every output width (320/640/1280): the text width
# is 768 and S = Σ WᵀW keeps full rank, while the literal per-matrix loops cost 12 solves a step, not 32
PART = ("input_blocks.1.1", "input_blocks.4.1", "input_blocks.7.1", "middle_block.1", "output_blocks.3.1",
        "output_blocks.11.1")


@pytest.fixture(scope="module")
def sd15_part(sd15):
    weights, enc = sd15
    part = {k: w for k, w in weights.items() if any(f".{b}." in k for b in PART)}
    assert len(part) == 12 and {w.shape[0] for w in part.values()} == {320, 640, 1280}
    assert int(torch.linalg.matrix_rank(gram(part.values()))) == 768
    return part, enc


def test_agrees_with_float64_literal_equations_on_sd15_shapes(sd15_part):
    weights, enc = sd15_part
    reg, kw = 1e-3, dict(lamb=0.1, erase_scale=1.0, preserve_scale=0.1)
    concept, guide = enc("Van Gogh"), enc("art")
    e, g = erase_rows(concept, guide)
    expected, derived = literal_rece(
        weights, [e], [g], [enc("").rows], [concept.rows], [guide.rows], [enc(" ").rows],
        **kw, reg=reg, epochs=2)
    erasure = rece(weights, enc, ["Van Gogh"], "art", **kw, reg=reg, epochs=2)
    got = erasure.apply({k: w.double() for k, w in weights.items()})
    worst = max(rel(got[k] - weights[k].double(), expected[k] - weights[k].double()) for k in weights)
    assert worst < 1e-4  # relative to the edit itself, the strictest reading


def test_public_functions_match_literal(sd15_part):
    weights, enc = sd15_part
    kw = dict(lamb=0.1, erase_scale=1.0, preserve_scale=0.1)
    c, g = erase_rows(enc("a castle"), enc(" "))
    ours = closed_form_edit(weights, [c], [g], [enc("").rows], **kw)
    lit = literal_edit(weights, [c], [g], [enc("").rows], **kw)
    assert max(rel(ours[k], lit[k]) for k in weights) < 1e-5
    d_ours = derive_embedding(ours, weights, enc("a castle").rows, reg=1e-3)
    d_lit = literal_derive(lit, weights, enc("a castle").rows, reg=1e-3)
    assert rel(d_ours, d_lit) < 1e-4


def test_erased_keys_and_values_land_on_the_guide(sd15):
    weights, enc = sd15
    c, g = erase_rows(enc("nudity"), enc(" "))
    # λ small and erase_scale large: the edit is (nearly) an exact constraint
    out = closed_form_edit(weights, [c], [g], [], lamb=1e-4, erase_scale=10.0, preserve_scale=0.0)
    for k, w in weights.items():
        before = (c @ w.T - g @ w.T).norm()
        after = (c @ out[k].T - g @ w.T).norm()
        assert after < 0.02 * before, k


def test_preserved_concepts_barely_move(sd15):
    weights, enc = sd15
    erasure = rece(weights, enc, ["nudity"], "", ["a photo of a cat", "a red car"], epochs=2)
    after = erasure.apply(weights)
    for prompt in ["a photo of a cat", "a red car"]:
        r = enc(prompt).rows
        moved = max(rel(r @ after[k].T, r @ w.T) for k, w in weights.items())
        assert moved < 0.05, prompt
        assert erasure.rounds[-1].drift[prompt] < 0.05
    c = enc("nudity").rows
    assert max(rel(c @ after[k].T, c @ w.T) for k, w in weights.items()) > 0.2


def test_huge_lambda_changes_nothing(sd15):
    weights, enc = sd15
    erasure = rece(weights, enc, ["nudity"], lamb=1e9, epochs=1)
    after = erasure.apply(weights)
    assert max(rel(after[k], w) for k, w in weights.items()) < 1e-6


def test_more_rounds_lower_the_derived_embeddings_reach(sd15):
    weights, enc = sd15
    erasure = rece(weights, enc, ["nudity"], epochs=3)
    reach = [r.reach[0] for r in erasure.rounds]
    assert all(b < a for a, b in zip(reach, reach[1:])), reach
    assert 0.0 <= reach[-1] < reach[0] <= 1.0


def test_several_concepts_each_get_erased(sd15):
    weights, enc = sd15
    erasure = rece(weights, enc, ["nudity", "blood", "Van Gogh"], epochs=1)
    assert len(erasure.rounds[0].guide_gap) == 3
    assert all(gap < 0.2 for gap in erasure.rounds[0].guide_gap)


@pytest.mark.parametrize("reg", [1e-3, 0.1])
def test_many_concepts_wider_than_the_embedding_match_literal(reg):
    """More erase rows than d (every system dense, P − I of full rank), several rounds."""
    weights = cross_attention_weights("tiny", seed=4)
    enc = ToyTextEncoder(64, seed=4)
    names = ["nudity", "blood", "Van Gogh"]
    kw = dict(lamb=0.1, erase_scale=1.0, preserve_scale=0.1)
    pairs = [erase_rows(enc(c), enc(" ")) for c in names]
    expected, derived = literal_rece(
        weights, [e for e, _ in pairs], [g for _, g in pairs], [enc("").rows, enc("a cat").rows],
        [enc(c).rows for c in names], [enc(" ").rows] * 3, [enc(" ").rows] * 3 + [enc("a cat").rows],
        **kw, reg=reg, epochs=2)
    erasure = rece(weights, enc, names, " ", ["a cat"], **kw, reg=reg, epochs=2)
    assert erasure.rank == 64
    got = erasure.apply({k: w.double() for k, w in weights.items()})
    assert max(rel(got[k] - weights[k].double(), expected[k] - weights[k].double()) for k in weights) < 1e-4


def test_transform_is_compact_and_exact(sd15):
    weights, enc = sd15
    erasure = rece(weights, enc, ["nudity"], epochs=3)
    assert erasure.rank < 768
    p = erasure.transform.dense().double()
    for k, w in list(weights.items())[:3]:
        a, b = erasure.delta(w)
        assert rel(w.double() + (a @ b).double(), w.double() @ p) < 1e-5


@pytest.mark.parametrize("d", [1, 7, 130])
@pytest.mark.parametrize("blocks", [1, 2, 4, 9])
def test_gram_in_bands_is_the_whole_symmetric_gram(d, blocks):
    g = torch.Generator().manual_seed(d)
    ws = [torch.randn(n, d, generator=g) for n in (3, 40, 17)]
    s = gram(ws, blocks=blocks)
    expected = sum(w.double().T @ w.double() for w in ws)
    assert torch.equal(s, s.T)
    assert rel(s, expected) < 1e-6


def test_derivation_kept_across_steps_equals_derivation_from_scratch(sd15):
    """Derivation.then pulls ΣW'ᵀW' back step by step; the result must be the literal one on W·P₁·P₂."""
    weights, enc = sd15
    kw = dict(lamb=0.1, erase_scale=1.0, preserve_scale=0.1)
    concept = enc("a castle").rows
    e, g = erase_rows(enc("a castle"), enc(" "))
    first = edit_transform([e], [g], [enc("").rows], 768, **kw)
    # a step of more rows than d: taken through its dense form
    many = torch.cat([enc(f"tower {i}").rows for i in range(11)])
    second = edit_transform([many], [torch.zeros_like(many)], [enc(" ").rows], 768, **kw)
    assert second.is_dense and second.rank == 768
    system = Derivation(gram(weights.values()), concept, reg=1e-3).then(first).then(second)
    edited = {k: second.apply_weight(first.apply_weight(w.double())) for k, w in weights.items()}
    assert rel(system.derive(), literal_derive(edited, weights, concept, reg=1e-3)) < 1e-4
    assert rel(system.p.dense(), first.then(second).dense()) < 1e-10


def test_deterministic(sd15):
    weights, enc = sd15
    a = rece(weights, enc, ["nudity"], epochs=2)
    b = rece(weights, enc, ["nudity"], epochs=2)
    assert torch.equal(a.transform.up, b.transform.up) and torch.equal(a.transform.down, b.transform.down)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    weights = cross_attention_weights("tiny", seed=2)
    enc = ToyTextEncoder(64, seed=2)
    half = {k: w.to(dtype) for k, w in weights.items()}

    def enc_half(text: str) -> TextEmbedding:
        e = enc(text)
        return TextEmbedding(e.rows.to(dtype), e.last_token)

    def enc_rounded(text: str) -> TextEmbedding:
        e = enc_half(text)
        return TextEmbedding(e.rows.float(), e.last_token)

    # the same (rounded) numbers given in float32 give the same erasure: we compute in float32+
    ref = rece({k: w.float() for k, w in half.items()}, enc_rounded, ["nudity"], epochs=1)
    got = rece(half, enc_half, ["nudity"], epochs=1)
    assert got.transform.up.dtype == torch.float32
    assert rel(got.transform.dense(), ref.transform.dense()) < 1e-5
    out = closed_form_edit(half, [enc("x").rows[1:]], [enc(" ").rows[:-1]], [])
    assert all(o.dtype == dtype and torch.isfinite(o).all() for o in out.values())


def test_presets_follow_the_paper():
    assert PRESETS["nudity"].reg == 0.1 and PRESETS["nudity"].epochs == 3
    assert PRESETS["unsafe"].reg == 0.1 and PRESETS["unsafe"].epochs == 2
    assert PRESETS["artistic_style"].reg == 1e-3 and PRESETS["artistic_style"].epochs == 1
    assert PRESETS["object"].epochs == 1


def test_float64_solve_beats_float32_inverse_at_small_reg(sd15):
    """The authors' float32 inverse drifts at ρ = 1e-3; ours stays at float64 accuracy."""
    weights, enc = sd15
    c, g = erase_rows(enc("Monet"), enc("art"))
    edited = closed_form_edit(weights, [c], [g], [enc("").rows])
    concept = enc("Monet").rows
    exact = literal_derive(edited, weights, concept, reg=1e-3, dtype=torch.float64)
    ours = derive_embedding(edited, weights, concept, reg=1e-3)
    mat1 = 1e-3 * torch.eye(768) + sum(edited[k].T @ edited[k] for k in weights)
    mat2 = sum(edited[k].T @ weights[k] for k in weights)
    theirs = concept @ (torch.inverse(mat1) @ mat2).T
    assert rel(ours, exact) < 1e-5
    assert rel(ours, exact) < rel(theirs, exact)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a GPU machine)")
def test_cuda_matches_cpu():
    weights = cross_attention_weights("sd15", seed=3)
    enc = ToyTextEncoder(768, seed=3)
    cpu = rece(weights, enc, ["nudity"], epochs=2)
    cuda = rece({k: w.cuda() for k, w in weights.items()}, enc, ["nudity"], epochs=2, device="cuda")
    assert cuda.transform.up.is_cuda
    assert rel(cuda.transform.dense().cpu(), cpu.transform.dense()) < 1e-4
