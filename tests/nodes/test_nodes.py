"""The three nodes, through ComfyUI's interfaces (stand-in in CI, real with COMFYUI_PATH)."""

from __future__ import annotations

import pytest
import torch

import comfy.model_management
import comfy.utils
from conftest import load_pack
from factory import FakeCLIP, effective_weights, make_model

pack = load_pack()
from rece_comfyui.nodes.rece import (  # noqa: E402
    ApplyErasedWeights, RECEDeriveEmbedding, RECEEraseConcept)
from rece_comfyui.rece_core import Erasure  # noqa: E402
from rece_comfyui.rece_core.toy import layer_names  # noqa: E402
from measure import rel  # noqa: E402

DEFAULTS = dict(concepts="nudity", guide="", preserve="", concept_kind="nudity", rounds=2, reg=0.1, lamb=0.1,
                erase_scale=1.0, preserve_scale=0.1)


def erase(model, clip, **kw):
    out = RECEEraseConcept().erase(model, clip, **(DEFAULTS | kw))
    return out["result"], out["ui"]


def keys(arch="tiny"):
    return [k for k, _ in layer_names(arch)]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def test_registered_with_stable_ids_and_display_names():
    # RECE's ids and names stay; each further method's test checks its own (e.g. tests/nodes/test_fewshot.py)
    assert pack.NODE_DISPLAY_NAME_MAPPINGS.items() >= {"RECEEraseConcept": "RECE Erase Concept",
                                               "RECEDeriveEmbedding": "RECE Derive Embedding",
                                               "RECEApplyErasedWeights": "Apply Erased Weights",
                                               "RECESaveErasedWeights": "Save Erased Weights",
                                               "RECELoadErasedWeights": "Load Erased Weights",
                                               "RECEExportErasureAsLoRA": "Export Erasure as LoRA"}.items()
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["ConceptPruneEraseConcept"] == "ConceptPrune Erase Concept"
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert pack.WEB_DIRECTORY == "./web"


def test_erase_patches_a_clone_and_leaves_the_given_model_untouched():
    model, clip = make_model(), FakeCLIP()
    before = snapshot(model)
    patches_before = {k: list(v) for k, v in model.patches.items()}
    (erased, erasure, report), ui = erase(model, clip)
    assert erased is not model and isinstance(erasure, Erasure)
    assert model.patches == patches_before
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    assert set(erased.patches) == set(keys())
    assert "nudity" in report and ui["rece_report"][0]["concepts"] == ["nudity"]
    # the original branch still samples with the original weights
    orig = effective_weights(model, keys())
    assert all(torch.equal(orig[k], before[k]) for k in keys())


def test_erased_weights_are_w_times_p_and_the_concept_moves_to_its_guide():
    model, clip = make_model(), FakeCLIP()
    (erased, erasure, _), _ = erase(model, clip, rounds=0, lamb=1e-3, erase_scale=10.0, preserve_scale=0.0)
    base, after = effective_weights(model, keys()), effective_weights(erased, keys())
    expected = erasure.apply(base)
    tok_c, tok_g = clip.tokenize("nudity")["l"][0], clip.tokenize(" ")["l"][0]
    c = clip.encode_from_tokens(clip.tokenize("nudity"))[0]
    g = clip.encode_from_tokens(clip.tokenize(" "))[0]
    last = [t[0] for t in tok_c].index(clip.parts[0].end) - 1
    for k in keys():
        assert rel(after[k], expected[k]) < 1e-5
        e_rows, g_rows = c[last:last + 70], g[0:70]
        moved = (e_rows @ after[k].T - g_rows @ base[k].T).norm()
        assert moved < 0.05 * (e_rows @ base[k].T - g_rows @ base[k].T).norm()
    assert tok_g[1][0] == clip.parts[0].end


def test_many_concepts_give_a_full_rank_erasure_patched_exactly():
    """Three concepts on a 64-wide model: P − I has full rank and is kept dense (down = I)."""
    model, clip = make_model(), FakeCLIP()
    (erased, erasure, _), _ = erase(model, clip, concepts="nudity\nblood\na castle", rounds=1)
    assert erasure.concepts == ("nudity", "blood", "a castle") and erasure.transform.is_dense
    p = erasure.transform.dense().double()
    base, after = effective_weights(model, keys()), effective_weights(erased, keys())
    for k in keys():
        assert rel(after[k], base[k].double() @ p.to(base[k].device)) < 1e-5


def test_lora_applied_before_the_node_is_taken_into_account():
    model, clip = make_model(), FakeCLIP()
    lora = model.clone()
    g = torch.Generator().manual_seed(7)
    diffs = {k: 0.05 * torch.randn(w.shape, generator=g) for k, w in effective_weights(model, keys()).items()}
    lora.add_patches({k: (d,) for k, d in diffs.items()}, 1.0)
    (erased, erasure, _), _ = erase(lora, clip)
    base = effective_weights(model, keys())
    with_lora = {k: base[k] + diffs[k] for k in keys()}
    after = effective_weights(erased, keys())
    expected = erasure.apply(with_lora)
    assert max(rel(after[k], expected[k]) for k in keys()) < 1e-5
    # and the erasure was computed from the LoRA'd weights, not the checkpoint's
    (_, plain, _), _ = erase(model, clip)
    assert not torch.allclose(plain.transform.dense(), erasure.transform.dense())


def test_queueing_twice_gives_identical_patches():
    model, clip = make_model(), FakeCLIP()
    (a, ea, ra), _ = erase(model, clip)
    (b, eb, rb), _ = erase(model, clip)
    wa, wb = effective_weights(a, keys()), effective_weights(b, keys())
    assert all(torch.equal(wa[k], wb[k]) for k in keys())
    # nothing compounds: erasing the original again does not see the first erasure
    assert torch.equal(ea.transform.up, eb.transform.up)


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_real_text_widths(arch):
    """Every attn2.to_k/to_v is found and patched; SDXL on 6 of its 70 blocks (its text width, its key
    names, both output widths), which costs a tenth of the whole model."""
    blocks = 6 if arch == "sdxl" else None
    model, clip = make_model(arch, blocks=blocks), FakeCLIP(arch)
    (erased, erasure, report), _ = erase(model, clip, rounds=1)
    assert erasure.dim == {"sd15": 768, "sd21": 1024, "sdxl": 2048}[arch]
    expected = [k for k in model.model.state_dict() if ".attn2.to_" in k]
    assert sorted(erased.patches) == sorted(expected)
    assert len(expected) == (12 if blocks else len(layer_names(arch)))
    if blocks:
        assert {model.model.state_dict()[k].shape[0] for k in expected} == {640, 1280}


def test_no_text_cross_attention_is_refused_naming_the_model():
    model = make_model(config="Flux", cross_attention=False)
    with pytest.raises(ValueError, match="this model is Flux"):
        erase(model, FakeCLIP())
    video = make_model(config="SVD_img2vid")
    with pytest.raises(ValueError, match="SVD_img2vid"):
        erase(video, FakeCLIP())


def test_clip_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match="768-wide text embeddings but this SD15 model's cross-attention reads 64"):
        erase(make_model(), FakeCLIP("sd15"))


@pytest.mark.parametrize("concepts", ["", "   \n  \n"])
def test_empty_concepts_refused(concepts):
    with pytest.raises(ValueError, match="at least one concept"):
        erase(make_model(), FakeCLIP(), concepts=concepts)


def test_long_prompt_refused_clearly():
    long = " ".join(["word"] * 100)
    with pytest.raises(ValueError, match="longer than one 77-token chunk"):
        erase(make_model(), FakeCLIP(), concepts=long)


def test_bad_parameters_refused_and_nothing_half_applied():
    model = make_model()
    with pytest.raises(ValueError, match="lamb"):
        erase(model, FakeCLIP(), lamb=-1.0)
    assert model.patches == {}


def test_progress_is_reported_and_cancel_stops_cleanly():
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        model = make_model()
        erase(model, FakeCLIP(), rounds=2)
        assert seen and seen[-1][0] == seen[-1][1]
        comfy.model_management.interrupt_current_processing(True)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            erase(model, FakeCLIP())
        assert model.patches == {}
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)


def test_report_notes_when_values_differ_from_the_paper():
    (_, _, report), _ = erase(make_model(), FakeCLIP(), concept_kind="artistic_style", rounds=3, reg=0.1)
    assert "the paper uses reg=0.001 and 1 round(s) for artistic_style" in report
    (_, _, report), _ = erase(make_model(), FakeCLIP(), concept_kind="nudity", rounds=3, reg=0.1)
    assert "note:" not in report


def test_derive_embedding_returns_usable_conditioning_and_reach_falls_with_rounds():
    model, clip = make_model(), FakeCLIP()
    reaches = []
    for rounds in (0, 3):
        (erased, _, _), _ = erase(model, clip, rounds=rounds)
        out = RECEDeriveEmbedding().derive(erased, clip, "nudity", 0.1)
        cond, value, report = out["result"]
        assert cond[0][0].shape == (1, 77, 64) and torch.isfinite(cond[0][0]).all()
        assert "reaches" in report and out["ui"]["rece_report"][0]["reach"] == value
        reaches.append(value)
    assert 0.0 <= reaches[1] < reaches[0] <= 1.0


def test_derive_on_sdxl_carries_pooled_output():
    """SDXL's text path (CLIP-L + bigG, 2048 wide, pooled from bigG) on 4 of its 70 attention blocks: the
    pooled output and the rows' width do not depend on how many blocks read them."""
    model, clip = make_model("sdxl", blocks=4), FakeCLIP("sdxl")
    assert len(model.patches) == 0 and sum(".attn2.to_" in k for k in model.model.state_dict()) == 8
    (erased, _, _), _ = erase(model, clip, rounds=1)
    cond, _, _ = RECEDeriveEmbedding().derive(erased, clip, "nudity", 0.1)["result"]
    assert cond[0][0].shape == (1, 77, 2048) and cond[0][1]["pooled_output"].shape == (1, 1280)


def test_derive_refuses_a_model_without_erasure():
    with pytest.raises(ValueError, match="carries no RECE erasure"):
        RECEDeriveEmbedding().derive(make_model(), FakeCLIP(), "nudity", 0.1)


def test_apply_to_a_fine_tune_uses_its_own_weights():
    base, clip = make_model(seed=0), FakeCLIP()
    (_, erasure, _), _ = erase(base, clip)
    tune = make_model(seed=0)
    with torch.no_grad():
        for p in tune.model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    tuned_before = snapshot(tune)
    for strength in (1.0, 0.0, 0.5):
        out, report = ApplyErasedWeights().apply(tune, erasure, strength)["result"]
        w0, w1 = effective_weights(tune, keys()), effective_weights(out, keys())
        expected = erasure.apply(w0, strength)
        assert max(rel(w1[k], expected[k]) for k in keys()) < 1e-5
        if strength == 0.0:
            assert all(torch.equal(w1[k], w0[k]) for k in keys())
    assert all(torch.equal(tuned_before[k], v) for k, v in tune.model.state_dict().items())


def test_apply_refuses_another_text_width():
    (_, erasure, _), _ = erase(make_model(), FakeCLIP())
    with pytest.raises(ValueError, match="64-wide text embeddings but this SD15 model's cross-attention reads 768"):
        ApplyErasedWeights().apply(make_model("sd15"), erasure, 1.0)
    with pytest.raises(ValueError, match="not a RECE erasure"):
        ApplyErasedWeights().apply(make_model(), "nope", 1.0)


def test_half_precision_model():
    model, clip = make_model(dtype=torch.float16), FakeCLIP()
    (erased, erasure, _), _ = erase(model, clip, rounds=1)
    after = effective_weights(erased, keys())
    assert all(torch.isfinite(w).all() for w in after.values())


def test_chained_erase_nodes_compose_on_the_weights_in_use():
    model, clip = make_model(), FakeCLIP()
    (first, e1, _), _ = erase(model, clip, concepts="nudity")
    (second, e2, _), _ = erase(first, clip, concepts="blood")
    base = effective_weights(model, keys())
    expected = e2.apply(e1.apply(base))
    after = effective_weights(second, keys())
    assert max(rel(after[k], expected[k]) for k in keys()) < 1e-5
    # the second erasure was computed from the first's output, not from the checkpoint
    (_, alone, _), _ = erase(model, clip, concepts="blood")
    assert not torch.allclose(alone.transform.dense(), e2.transform.dense())
    # and Derive sees both
    out = RECEDeriveEmbedding().derive(second, clip, "nudity", 0.1)
    assert out["ui"]["rece_report"][0]["erasures"] == 2


@pytest.mark.parametrize("arch", ["tiny", "sdxl"])
def test_batched_encoding_gives_each_prompt_its_own_rows(arch):
    from rece_comfyui.nodes.host import encoding

    clip = FakeCLIP(arch)
    texts = ["nudity", "a photo of a cat", " ", "", "blood and gore on the floor"]
    batched = encoding.encode_many(clip, texts)
    assert clip.calls == 1  # one encoder call for all of them
    for text, b in zip(texts, batched):
        one = encoding.encode(clip, text, b.rows.device)[0]
        assert b.last_token == one.last_token
        assert rel(b.rows, one.rows) < 1e-6


def test_many_concepts_erase_through_the_node_in_chunks(monkeypatch):
    """More concepts than fit a chunk: encoded in batches, streamed, every concept reported."""
    from rece_comfyui.nodes.host import encoding

    class Instant(encoding.EncoderCalls):
        """An encoder that takes no time (the clock stands still): calls grow to whole chunks after the first."""

        def __init__(self, **kw):
            super().__init__(clock=lambda: 0.0, **kw)

    monkeypatch.setattr(encoding, "EncoderCalls", Instant)
    model, clip = make_model(), FakeCLIP()
    concepts = "\n".join(f"concept number {i}" for i in range(150))
    (erased, erasure, report), ui = erase(model, clip, concepts=concepts, rounds=1)
    assert len(erasure.concepts) == 150 and len(ui["rece_report"][0]["rounds"][-1]["reach"]) == 150
    assert clip.prompts == 152  # every concept, '' and ' ' encoded once (kept for the report)
    # 4 prompts first, the rest of the first chunk (106 concepts + 2), then the second chunk of 44
    assert clip.calls == 3
    after, base = effective_weights(erased, keys()), effective_weights(model, keys())
    p = erasure.transform.dense().double()
    assert max(rel(after[k], base[k].double() @ p.to(base[k].device)) for k in keys()) < 1e-5
