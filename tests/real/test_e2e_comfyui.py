"""End to end through real ComfyUI (real tier: COMFYUI_PATH): checkpoint loader → RECE → KSampler.

A seeded real-format SD1.5 checkpoint is loaded by ComfyUI's checkpoint loader; RECE Erase
Concept erases a concept (preserving one prompt); KSampler samples a few steps at 64×64 from the
original and the erased branch of the same loaded model.
"""

from __future__ import annotations

import os

import pytest
import torch
from measure import rel, state_hash as fingerprint  # noqa: E402

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="real tier: set COMFYUI_PATH")

CONCEPT, PRESERVED = "nudity", "a photo of a cat"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from checkpoint import make_sd15_checkpoint

    path = make_sd15_checkpoint(tmp_path_factory.mktemp("ckpt") / "seeded_sd15.safetensors")
    yield path
    os.remove(path)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    import comfy.sd

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=True)[:3]
    return model, clip, vae


def sample(model, clip, prompt: str):
    import nodes as comfy_nodes  # ComfyUI's own nodes.py

    positive = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        out = comfy_nodes.KSampler().sample(model, 42, 4, 7.0, "euler", "normal", positive, negative, latent, 1.0)[0]
    return out["samples"].float()


def test_erase_concept_end_to_end(loaded):
    from conftest import load_pack

    load_pack()
    from rece_comfyui.nodes.rece import RECEEraseConcept

    model, clip = loaded[:2]
    assert type(model.model.model_config).__name__ == "SD15"
    before = fingerprint(model)
    out = RECEEraseConcept().erase(model, clip, CONCEPT, "", PRESERVED, "nudity", 3, 0.1, 0.1, 1.0, 0.1)
    erased, erasure, report = out["result"]
    print(report)
    print({r.step: r.drift for r in erasure.rounds})

    orig_c, orig_p = sample(model, clip, CONCEPT), sample(model, clip, PRESERVED)
    er_c, er_p = sample(erased, clip, CONCEPT), sample(erased, clip, PRESERVED)
    concept_change, preserved_change = rel(er_c, orig_c), rel(er_p, orig_p)
    print(f"relative latent change: concept {concept_change:.4f}, preserved {preserved_change:.4f}")
    assert concept_change > 5 * preserved_change
    assert concept_change > 1e-2
    # sampling the original again gives the original: nothing compounded, nothing leaked
    assert torch.equal(sample(model, clip, CONCEPT), orig_c)
    assert fingerprint(model) == before


def test_lora_before_the_node_stays_in_effect(loaded):
    import comfy.sd
    from conftest import load_pack
    from factory import effective_weights

    load_pack()
    from rece_comfyui.nodes.rece import RECEEraseConcept

    model, clip = loaded[:2]
    g = torch.Generator().manual_seed(5)
    targets = {  # one cross-attention key and one self-attention key, as a kohya-style LoRA
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": (320, 768),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": (320, 320),
    }
    lora = {}
    for name, (out_dim, in_dim) in targets.items():
        lora[f"{name}.lora_up.weight"] = 0.1 * torch.randn(out_dim, 4, generator=g)
        lora[f"{name}.lora_down.weight"] = torch.randn(4, in_dim, generator=g) / in_dim ** 0.5
        lora[f"{name}.alpha"] = torch.tensor(4.0)
    with_lora, _ = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 0.0)
    erased = RECEEraseConcept().erase(with_lora, clip, CONCEPT, "", "", "nudity", 1, 0.1, 0.1, 1.0, 0.1)
    erased, erasure = erased["result"][:2]
    k = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    q = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    base = effective_weights(model, [k, q])
    lora_w = effective_weights(with_lora, [k, q])
    after = effective_weights(erased, [k, q])
    assert not torch.equal(lora_w[q], base[q])
    assert torch.equal(after[q], lora_w[q])  # the LoRA's other layers are still in effect
    expected = erasure.apply({k: lora_w[k]})[k]  # and the erased layer is (W + LoRA) P
    assert rel(after[k], expected) < 1e-5


def test_erased_model_saves_with_comfyuis_checkpoint_save(loaded, tmp_path):
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    from conftest import load_pack
    from factory import effective_weights

    load_pack()
    from rece_comfyui.nodes.rece import RECEEraseConcept

    model, clip, vae = loaded
    before = fingerprint(model)
    erased = RECEEraseConcept().erase(model, clip, CONCEPT, "", "", "nudity", 1, 0.1, 0.1, 1.0, 0.1)["result"][0]
    k = "diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_v.weight"
    expected = effective_weights(erased, [k])[k]
    path = tmp_path / "erased.safetensors"
    comfy.sd.save_checkpoint(str(path), erased, clip, vae)
    saved = comfy.utils.load_torch_file(str(path))[f"model.{k}"].float()
    assert rel(saved, expected) < 1e-3  # the checkpoint's own fp16
    assert rel(saved, effective_weights(model, [k])[k]) > 1e-2  # and the erasure is in it
    comfy.model_management.unload_all_models()
    assert fingerprint(model) == before  # ComfyUI restored the shared weights


def sample_streamed(model, clip, prompt: str, monkeypatch) -> torch.Tensor:
    """Sample with every layer streamed (ComfyUI's NO_VRAM: weights cast and patched per forward)."""
    import comfy.model_management as mm

    mm.unload_all_models()
    with monkeypatch.context() as m:
        m.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
        m.setattr(mm, "is_device_cpu", lambda device: False)  # on a CPU-only run too
        out = sample(model, clip, prompt)
        assert model.model.model_lowvram  # it really streamed
    mm.unload_all_models()
    return out


@pytest.mark.parametrize("weights", ["fp16", "fp8_e4m3fn"])
def test_erased_model_samples_the_same_streamed_as_fully_loaded(loaded, checkpoint, weights, monkeypatch):
    """NO_VRAM streaming applies the erasure per forward in the weight's own dtype; it must match."""
    import comfy.model_management as mm
    import comfy.sd
    from conftest import load_pack

    load_pack()
    from rece_comfyui.nodes.rece import RECEEraseConcept

    model, clip = loaded[:2]
    if weights != "fp16":
        model = comfy.sd.load_checkpoint_guess_config(
            str(checkpoint), output_vae=False, output_clip=False,
            model_options={"dtype": getattr(torch, "float8_e4m3fn")})[0]
        assert model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight.dtype == \
            torch.float8_e4m3fn
    from factory import effective_weights

    before = fingerprint(model)
    erased, erasure = RECEEraseConcept().erase(model, clip, CONCEPT, "", PRESERVED, "nudity", 2, 0.1, 0.1, 1.0,
                                               0.1)["result"][:2]
    # the same change as ComfyUI's own plain weight patch ("diff" W(P − I), like a merged LoRA): the
    # baseline for what the weight's storage (fp8 rounding, done by ComfyUI) alone makes of it
    keys = [k for k in erased.patches]
    diff = model.clone()
    diff.add_patches({k: ((erasure.transform.to(device=w.device).apply_weight(w.double()) - w.double()).float(),)
                      for k, w in effective_weights(model, keys).items()}, 1.0)
    mm.unload_all_models()
    full, diff_full = sample(erased, clip, CONCEPT), sample(diff, clip, CONCEPT)
    original = sample(model, clip, CONCEPT)
    streamed = sample_streamed(erased, clip, CONCEPT, monkeypatch)
    diff_streamed = sample_streamed(diff, clip, CONCEPT, monkeypatch)
    ours, comfy_own = rel(streamed, full), rel(diff_streamed, diff_full)
    print(f"{weights}: streamed vs full {ours:.2e} (ComfyUI's own diff patch: {comfy_own:.2e}); "
          f"erased vs original {rel(full, original):.3f}; erasure vs diff patch, full load {rel(full, diff_full):.2e}")
    assert ours <= max(1e-2, 1.5 * comfy_own)  # no worse than ComfyUI's own patches on this storage
    assert rel(full, diff_full) < 0.1 * rel(full, original)  # and the erasure is the W(P − I) it says
    assert rel(full, original) > 10 * ours  # the erasure is there in both
    assert fingerprint(model) == before


def test_batched_encoding_with_comfyuis_clip_equals_cliptextencode(loaded):
    """ComfyUI's real CLIP-L: prompts encoded together give CLIPTextEncode's rows, weights included."""
    import nodes as comfy_nodes
    from conftest import load_pack

    load_pack()
    from rece_comfyui.nodes.host import encoding

    clip = loaded[1]
    texts = ["nudity", "(nudity:1.3), a photo", "a photo of a cat", "", " ", "[blood] and (gore:0.8)"]
    batched = encoding.encode_many(clip, texts)
    for text, b in zip(texts, batched):
        one = comfy_nodes.CLIPTextEncode().encode(clip, text)[0][0][0][0]
        assert b.last_token == encoding.tokenize(clip, text)[1]
        assert rel(b.rows, one) < 1e-5, text


def test_batched_encoding_with_comfyuis_sdxl_clip_equals_cliptextencode():
    """ComfyUI's real SDXL CLIP (CLIP-L + bigG, seeded): prompts encoded together give CLIPTextEncode's
    rows (both encoders' halves), weights included. ComfyUI's batched call returns one pooled output,
    the first prompt's (Erase never reads pooled outputs): it equals CLIPTextEncode's."""
    import nodes as comfy_nodes
    from checkpoint import sdxl_clip
    from conftest import load_pack

    load_pack()
    from rece_comfyui.nodes.host import encoding

    clip = sdxl_clip()
    texts = ["nudity", "(nudity:1.3), a photo", "", " ", "[blood] and (gore:0.8)"]
    with torch.inference_mode():
        batched = encoding.encode_many(clip, texts)
        for text, b in zip(texts, batched):
            one = comfy_nodes.CLIPTextEncode().encode(clip, text)[0][0]
            assert b.rows.shape == (77, 2048)
            assert b.last_token == encoding.tokenize(clip, text)[1]
            assert rel(b.rows[:, :768], one[0][0, :, :768]) < 1e-5, text  # CLIP-L
            assert rel(b.rows[:, 768:], one[0][0, :, 768:]) < 1e-5, text  # bigG
        tokens = {k: [clip.tokenize(t)[k][0] for t in texts] for k in ("g", "l")}
        _, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        first = comfy_nodes.CLIPTextEncode().encode(clip, texts[0])[0][0][1]["pooled_output"]
        assert pooled.shape == (1, 1280) and rel(pooled, first) < 1e-5
