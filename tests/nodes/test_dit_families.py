"""RECE on the DiT families (Flux, SD3, Wan, Qwen-Image, Chroma, Lumina2/Z-Image, Qwen-Image 2.1, HunyuanVideo, Stable Cascade),
in both tiers, pooled text paths included.

CI tier: stand-in models with the families' text-reader key names, sampled by a small forward that reads
the text through them. Real tier (COMFYUI_PATH): Flux, SD3, Wan, Qwen-Image and HunyuanVideo are ComfyUI's own
model classes with tiny configs, sampled by ``comfy.sample``, with ComfyUI's own tokenizers where they ship.
Qwen-Image 2.1 is newer than ComfyUI 0.3.64: its stand-in mirrors the current class's text path exactly
(``txt_in.text_norm``, a zero-centred RMSNorm, then ``txt_in.in_layer``), in both tiers.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import load_pack
from dit_factory import D, FAMILIES, REAL, REAL_FAMILIES, DiTCLIP, make_model, sample
from factory import effective_weights

load_pack()
from rece_comfyui.nodes.host import architectures  # noqa: E402
from rece_comfyui.nodes.files import ExportErasureAsLoRA, LoadErasedWeights, SaveErasedWeights  # noqa: E402
from rece_comfyui.nodes.rece import ApplyErasedWeights, RECEDeriveEmbedding, RECEEraseConcept  # noqa: E402
from rece_comfyui.rece_core.files import lora_key, save_erasure  # noqa: E402

ARGS = dict(concepts="nudity", guide="", preserve="", concept_kind="nudity", rounds=2, reg=0.1, lamb=0.1,
            erase_scale=1.0, preserve_scale=0.1)
ALL = list(FAMILIES)
CONCEPT, PRESERVED = "nudity", "a photo of a cat"
# HiDream: the Llama-3 readers and the space each reads (llama_layers [0, 2] of the tiny config)
LAYER_READERS = {"hidream": {"caption_projection.0.linear.weight": "llama3.0",
                             "caption_projection.1.linear.weight": "llama3.2"}}


def erase(model, clip, **kw):
    return RECEEraseConcept().erase(model, clip, **(ARGS | kw))["result"]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def reader_keys(family):
    return [f"diffusion_model.{k}" for k in FAMILIES[family].readers]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


@pytest.fixture(scope="module", params=ALL)
def erased(request):
    family = request.param
    model, clip = make_model(family), DiTCLIP(family)
    before = snapshot(model)
    out, erasure, report = erase(model, clip, preserve=PRESERVED)
    return family, model, clip, out, erasure, report, before


def test_detected_and_recorded(erased):
    family, model, _, out, erasure, report, _ = erased
    arch, keys = architectures.detect(FAMILIES[family].config, list(model.model.state_dict()))
    assert arch.name == family and keys == reader_keys(family)
    assert erasure.extra["architecture"] == family and erasure.dim == D
    pooled = [f"diffusion_model.{FAMILIES[family].pooled}"] if FAMILIES[family].pooled else []
    layers = [f"diffusion_model.{k}" for k in LAYER_READERS.get(family, {})]
    # only the text readers, pooled readers and (HiDream) Llama-3 readers: norm, bias untouched
    assert set(out.patches) == set(keys + pooled + layers)
    assert ("pooled" in erasure.spaces) == bool(pooled)
    assert {n for n in erasure.spaces if n != "pooled"} == set(LAYER_READERS.get(family, {}).values())


def test_concept_moves_preserved_barely_and_model_untouched(erased):
    family, model, clip, out, _, _, before = erased
    negative = clip.conditioning("")
    orig_c, er_c = (sample(m, family, clip.conditioning(CONCEPT), negative) for m in (model, out))
    orig_p, er_p = (sample(m, family, clip.conditioning(PRESERVED), negative) for m in (model, out))
    concept, preserved = rel(er_c, orig_c), rel(er_p, orig_p)
    print(f"{family}: relative latent change: concept {concept:.4f}, preserved {preserved:.4f}")
    # 2x, not 3x: on the stand-in Flux the rows' erasure moves the preserved prompt's T5 rows by 35% (its
    # padding rows are the concept's tail), which shows since the stand-in's pooled vector depends on the prompt
    assert concept > 1e-2 and concept > 2 * preserved
    assert torch.equal(sample(model, family, clip.conditioning(CONCEPT), negative), orig_c)
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())


def test_edit_is_w_times_p_on_the_readers(erased):
    family, model, _, out, erasure, _, _ = erased
    base, after = effective_weights(model), effective_weights(out)
    p = erasure.transform.dense().double()
    for k in reader_keys(family):
        assert rel(after[k], base[k].double() @ p.to(base[k].device)) < 1e-5
    edited = list(reader_keys(family))
    if FAMILIES[family].pooled:  # the pooled reader: W P with the pooled space's own transform
        k = f"diffusion_model.{FAMILIES[family].pooled}"
        pp = erasure.spaces["pooled"].transform.dense().double()
        assert pp.shape[0] == base[k].shape[1] and not torch.allclose(pp, torch.eye(pp.shape[0], dtype=pp.dtype))
        assert rel(after[k], base[k].double() @ pp) < 1e-5
        edited.append(k)
    for key, space in LAYER_READERS.get(family, {}).items():  # HiDream: each Llama reader, W P of its own layer
        k = f"diffusion_model.{key}"
        pl = erasure.spaces[space].transform.dense().double()
        assert not torch.allclose(pl, p.to(pl)) and rel(after[k], base[k]) > 1e-3
        assert rel(after[k], base[k].double() @ pl) < 1e-5
        edited.append(k)
    for k in base:
        if k not in edited:
            assert torch.equal(after[k], base[k]), k


@pytest.mark.parametrize("family", [f for f in ALL if FAMILIES[f].pooled])
def test_pooled_vector_alone_no_longer_moves_toward_the_concept(family):
    """With the empty prompt's rows and the concept's pooled vector, the erased model samples (nearly) as
    with the empty prompt; the original model is moved by the pooled vector."""
    model, clip = make_model(family), DiTCLIP(family)
    out = erase(model, clip, preserve=PRESERVED)[0]
    empty, concept = clip.conditioning(""), clip.conditioning(CONCEPT)
    pooled_only = [[empty[0][0], empty[0][1] | {"pooled_output": concept[0][1]["pooled_output"]}]]
    moved = {m: rel(sample(mm, family, pooled_only, empty), sample(mm, family, empty, empty))
             for m, mm in (("original", model), ("erased", out))}
    print(f"{family}: pooled vector alone moves the sample {moved['original']:.4f} (original), "
          f"{moved['erased']:.4f} (erased)")
    assert moved["original"] > 1e-3 and moved["erased"] < 0.5 * moved["original"]


@pytest.mark.parametrize("family", ALL)
def test_erase_step_lands_the_rows_the_reader_sees_on_the_guide(family):
    """rounds 0, a hard constraint: the reader maps the concept's tail rows (normed where the model norms
    them) onto the guide's, bias included."""
    model, clip = make_model(family), DiTCLIP(family)
    out, erasure, _ = erase(model, clip, rounds=0, lamb=1e-4, erase_scale=10.0, preserve_scale=0.0)
    from rece_comfyui.nodes.host import encoding, weights

    arch, keys = weights.architecture(model)
    c = encoding.encode(clip, CONCEPT, torch.device("cpu"), arch, model)[0]
    g = encoding.encode(clip, " ", torch.device("cpu"), arch, model)[0]
    from rece_comfyui.rece_core import erase_rows

    e_rows, g_rows = erase_rows(c, g)
    base, after = effective_weights(model), effective_weights(out)
    for k in keys:
        moved = (e_rows @ after[k].T - g_rows @ base[k].T).norm()
        assert moved < 0.05 * (e_rows @ base[k].T - g_rows @ base[k].T).norm()


@pytest.mark.parametrize("family", ALL)
def test_derived_embedding_reach_falls_and_its_conditioning_samples(family):
    model, clip = make_model(family), DiTCLIP(family)
    reaches = []
    for rounds in (0, 3):
        out = erase(model, clip, rounds=rounds)[0]
        cond, value, _ = RECEDeriveEmbedding().derive(out, clip, CONCEPT, 0.1)["result"]
        reaches.append(value)
    rows, extra = cond[0]
    concept_cond = clip.conditioning(CONCEPT)[0]
    assert rows.shape == concept_cond[0].shape and torch.isfinite(rows).all()
    assert set(extra) == set(concept_cond[1])  # pooled_output (Flux, SD3), guidance (Flux)
    if family == "flux":
        assert extra["guidance"] == 3.5
    assert torch.isfinite(sample(out, family, cond, clip.conditioning(""))).all()
    assert 0.0 <= reaches[1] < reaches[0] <= 1.0


@pytest.mark.parametrize("family", ["qwen_image", "lumina2"])
def test_derived_conditioning_is_normed_onto_the_derived_direction(family):
    """The model norms the returned rows again: what its reader sees points along the derived rows."""
    from rece_comfyui.nodes.host import encoding, weights
    from rece_comfyui.rece_core.derive import derive_with_transform

    model, clip = make_model(family), DiTCLIP(family)
    out = erase(model, clip, rounds=1)[0]
    cond = RECEDeriveEmbedding().derive(out, clip, CONCEPT, 0.1)["result"][0][0][0][0]
    arch, keys = weights.architecture(out)
    emb = encoding.encode(clip, CONCEPT, torch.device("cpu"), arch, out)[0]
    s = weights.gram_of(out, keys, torch.device("cpu"))
    derived = derive_with_transform(s, weights.combined_transform(weights.applied_erasures(out), D, torch.device("cpu")),
                                    emb.rows, reg=0.1).float()
    w = effective_weights(out)[f"diffusion_model.{arch.norm}"]
    seen = architectures.rms_norm(cond.float(), w, weights.norm_eps(out, arch))
    cos = torch.nn.functional.cosine_similarity(seen, derived, dim=-1)
    assert bool((cos > 0.999).all())


def test_unknown_config_name_is_detected_by_its_keys():
    model = make_model("flux")
    model.model.model_config = type("FluxKontextSomething", (), {})()
    arch, keys = architectures.detect("FluxKontextSomething", list(model.model.state_dict()))
    assert arch.name == "flux" and keys == ["diffusion_model.txt_in.weight"]


def test_model_without_text_readers_is_refused_naming_it():
    model = make_model("flux")
    with pytest.raises(ValueError, match="this model is StableCascade_X, which has none of the text readers"):
        architectures.detect("StableCascade_X", ["diffusion_model.img_in.weight"])
    assert model.patches == {}


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_save_load_apply_and_mismatch_refused(models_dir, family):
    model, clip = make_model(family), DiTCLIP(family)
    erasure = erase(model, clip, rounds=1)[1]
    SaveErasedWeights().save(erasure, "e")
    path = models_dir / "rece" / "e_00001.safetensors"
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["rece"])["architecture"] == family
        assert f.metadata()["format_version"] == ("2" if FAMILIES[family].pooled else "1")
    loaded = LoadErasedWeights().load("e_00001.safetensors")["result"][0]
    assert set(loaded.spaces) == set(erasure.spaces)
    for name, space in erasure.spaces.items():
        assert torch.equal(loaded.spaces[name].transform.up, space.transform.up)
        assert loaded.spaces[name].rounds == space.rounds
    a = ApplyErasedWeights().apply(model, erasure, 0.5)["result"][0]
    b, report = ApplyErasedWeights().apply(model, loaded, 0.5)["result"]
    assert set(a.patches) == set(b.patches) and len(b.patches) == len(reader_keys(family)) + len(loaded.spaces)
    wa, wb = effective_weights(a), effective_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and "warning" not in report
    other = "wan" if family == "flux" else "flux"  # same 64 width, another text space
    with pytest.raises(ValueError, match="another text space"):
        ApplyErasedWeights().apply(make_model(other), loaded, 1.0)


def test_old_files_without_architecture_load_as_unet_and_are_refused_on_flux(models_dir):
    from factory import FakeCLIP
    from factory import make_model as make_unet

    erasure = RECEEraseConcept().erase(make_unet(), FakeCLIP(), **(ARGS | {"rounds": 1}))["result"][1]
    path = models_dir / "rece" / "old.safetensors"
    save_erasure(erasure, str(path))
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    info = json.loads(meta["rece"])
    info.pop("architecture")
    info["extra"].pop("architecture")
    save_file(load_file(str(path)), str(path), metadata=meta | {"rece": json.dumps(info)})
    loaded = LoadErasedWeights().load("old.safetensors")["result"][0]
    assert loaded.extra["architecture"] == "unet"
    ApplyErasedWeights().apply(make_unet(), loaded, 1.0)  # applies to the UNet it was made for
    with pytest.raises(ValueError, match="made for SD1.x / SD2.x / SDXL UNet"):
        ApplyErasedWeights().apply(make_model("flux"), loaded, 1.0)


@pytest.mark.parametrize("family", ["flux", "sd3", "wan", "qwen_image"])
def test_lora_export_uses_keys_comfyui_maps(models_dir, family):
    model, clip = make_model(family), DiTCLIP(family)
    erasure = erase(model, clip, rounds=1)[1]
    report = ExportErasureAsLoRA().export(model, erasure, "lora", 0, "fp32")["result"][0]
    assert "exact" in report
    lora = load_file(str(models_dir / "loras" / "lora_00001.safetensors"))
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora}
    edited = reader_keys(family) + ([f"diffusion_model.{FAMILIES[family].pooled}"] if FAMILIES[family].pooled else [])
    assert names == {"lora_unet_" + k.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_")
                     for k in edited}
    base = effective_weights(model, edited)
    applied = effective_weights(ApplyErasedWeights().apply(model, erasure, 1.0)["result"][0], edited)
    for k in edited:
        name = lora_key(k, family)
        up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
        assert rel(base[k] + float(lora[f"{name}.alpha"]) / down.shape[0] * up @ down, applied[k]) < 1e-5
    if REAL and family in REAL_FAMILIES:  # ComfyUI's own LoRA loader maps every key and reproduces the edit
        import comfy.lora
        import comfy.sd

        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        assert all(key_map.get(n) == k for n, k in zip(map(lambda k: lora_key(k, family), edited), edited))
        via_lora = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)[0]
        got = effective_weights(via_lora, edited)
        assert max(rel(got[k], applied[k]) for k in got) < 1e-5


@pytest.mark.skipif(not REAL, reason="real tier: set COMFYUI_PATH")
def test_real_tier_uses_comfyuis_model_classes_and_tokenizers():
    for family in REAL_FAMILIES:
        model = make_model(family)
        assert type(model.model.model_config).__name__ == FAMILIES[family].config
        assert type(model.model).__module__ == "comfy.model_base"
    assert type(DiTCLIP("flux").tokenizer).__module__ == "comfy.text_encoders.flux"
    assert type(DiTCLIP("qwen_image").tokenizer).__module__ == "comfy.text_encoders.qwen_image"
    assert os.environ.get("COMFYUI_PATH")


@pytest.mark.parametrize("family", ["flux", "sd3", "chroma", "qwen_image"])
def test_last_word_token_found_with_comfyuis_tokenizer(family):
    """The row RECE treats as the last word token is the prompt's last word, the next its end token."""
    from rece_comfyui.nodes.host import encoding, weights

    model, clip = make_model(family), DiTCLIP(family)
    arch, _ = weights.architecture(model)
    tokens = clip.tokenize("a red car")
    emb = encoding.encode(clip, "a red car", torch.device("cpu"), arch, model)[0]
    ids = [t[0] for t in tokens[arch.encoder][0]]
    offset = len(ids) - clip.encode_from_tokens(tokens, return_pooled=True)[0].shape[1]
    at = ids[emb.last_token + max(offset, 0):][:2]
    if REAL:
        tok = getattr(clip.tokenizer, f"clip_{arch.encoder}", None) or getattr(clip.tokenizer, arch.encoder)
        words = [tok.tokenizer.decode([i]).strip() for i in at]
        assert words[0] == "car" and words[1] in ("</s>", "<|endoftext|>", "<|im_end|>")
    else:
        from dit_factory import word_ids

        assert at[0] == word_ids("car")[0] and at[1] in (1, 49407, 151645)


def test_hidream_rows_are_the_t5_projection_and_each_llama_layer_its_own_space():
    """HiDream's last caption_projection reads T5 (the rows); projection i reads Llama-3 layer llama_layers[i],
    so the projections reading one layer share its space (comfy/ldm/hidream/model.py)."""
    keys = [f"diffusion_model.caption_projection.{i}.linear.weight" for i in range(12)]
    arch, found = architectures.detect("HiDream", keys + ["diffusion_model.x_embedder.proj.weight"])
    assert arch.name == "hidream" and found == ["diffusion_model.caption_projection.11.linear.weight"]
    spaces = arch.layers.readers(keys, {"llama_layers": list(range(8)) + [7] * 3})
    assert list(spaces) == [f"llama3.{i}" for i in range(8)]
    assert spaces["llama3.7"] == [f"diffusion_model.caption_projection.{i}.linear.weight" for i in (7, 8, 9, 10)]
    assert arch.unedited(keys, found + [k for ks in spaces.values() for k in ks], {"llama_layers": list(range(11))}) == ""
    # with the Llama spaces not edited (a CLIP without them), the report line still names what is left
    line = arch.unedited(keys, found, {"llama_layers": list(range(8)) + [7] * 3})
    assert line.startswith("not edited: 11 layer(s) reading other text spaces (caption_projection.0.linear.weight")


def test_hidream_report_names_every_space_erased():
    """The Erase report names the Llama-3 spaces erased (and no longer says they are left); Apply says it applies
    them; a CLIP whose Llama rows are all zero (ComfyUI's HiDream encoder without Llama) leaves them, saying why."""
    model, clip = make_model("hidream"), DiTCLIP("hidream")
    out, erasure, report = erase(model, clip)
    assert "not edited" not in report and "not erased" not in report
    assert ("Llama-3 layers (2 spaces, llama3.0 … llama3.2, read by 2 layers, caption_projection.0.linear.weight … "
            "caption_projection.1.linear.weight), each its own transform") in report
    assert "pooled text (p_embedder.pooled_embedder.linear_1.weight)" in report
    applied = ApplyErasedWeights().apply(model, erasure, 1.0)["result"]
    assert "and 1 that read the pooled text and 2 that read the Llama-3 layers" in applied[1]
    assert "not edited" not in applied[1]
    after = effective_weights(out)
    assert all(torch.equal(v, after[k]) for k, v in effective_weights(applied[0]).items())

    class NoLlama(DiTCLIP):
        def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
            out = super().encode_from_tokens(tokens, return_pooled, return_dict)
            if return_dict:
                out["conditioning_llama3"] = torch.zeros(1, 32, 1, D)  # what ComfyUI gives without Llama
            return out

    _, partial, report = erase(model, NoLlama("hidream"))
    assert set(partial.spaces) == {"pooled"}
    # the T5 rows' and the pooled vector's transforms are what they were without the Llama spaces
    assert torch.equal(partial.transform.up, erasure.transform.up) and torch.equal(partial.transform.down,
                                                                                     erasure.transform.down)
    assert torch.equal(partial.spaces["pooled"].transform.up, erasure.spaces["pooled"].transform.up)
    assert "note: the Llama-3 layers are not erased: the CLIP's conditioning_llama3 rows are all zero" in report
    assert "not edited: 2 layer(s) reading other text spaces" in report


def test_hidream_llama_rows_alone_no_longer_move_toward_the_concept():
    """With the empty prompt's T5 rows and pooled vector and the concept's Llama-3 layers, the original model's sample
    moves toward the concept; the erased model's barely does (its move projected on the original's). A model carrying
    only the Llama spaces' patches leaves a preserved prompt's Llama rows where they took the sample.

    One RECE round: on this stand-in later rounds move the concept's Llama-only effect back (its projection on the
    original move: 0.04 after the erase step, 0.02 after 1 round, 0.22 after 2, 0.47 after 3; its T5 rows alone:
    −0.25, −0.58, −0.42, 0.27), see docs/families.md."""
    from rece_comfyui.nodes.host import weights
    from rece_comfyui.nodes.rece import patched

    model, clip = make_model("hidream"), DiTCLIP("hidream")
    out, erasure, _ = erase(model, clip, preserve=PRESERVED, rounds=1)
    arch, keys = weights.architecture(model)
    llama_only = patched(model, erasure, [], 1.0, weights.layer_keys(model, arch, keys))
    empty, concept, kept = clip.conditioning(""), clip.conditioning(CONCEPT), clip.conditioning(PRESERVED)

    def rows_of(cond):  # the empty prompt's T5 rows and pooled vector, this prompt's Llama-3 layers
        return [[empty[0][0], empty[0][1] | {"conditioning_llama3": cond[0][1]["conditioning_llama3"]}]]

    def move(m, cond):
        return (sample(m, "hidream", rows_of(cond), empty) - sample(m, "hidream", empty, empty)).double()

    original = move(model, concept)
    assert float(original.norm()) > 0.1 * float(sample(model, "hidream", empty, empty).norm())
    for name, m in (("erased", out), ("Llama spaces only", llama_only)):
        after = move(m, concept)
        toward = float((after * original).sum() / (original * original).sum())
        print(f"hidream ({name}): the concept's Llama rows move the sample {toward:.3f} of the original move toward "
              f"it ({float(after.norm() / original.norm()):.3f} as far)")
        assert toward < 0.1 and float(after.norm()) < 0.5 * float(original.norm())
    kept_before, kept_after = move(model, kept), move(llama_only, kept)
    assert float((kept_after - kept_before).norm()) < 0.02 * float(kept_before.norm())


def test_hidream_llama_spaces_save_load_apply_undo_and_export(models_dir):
    """A file with Llama-3 spaces saves, loads and applies as the erasure itself (every reader the same weight);
    strength −1 undoes it exactly; the LoRA holds each Llama reader's W (P_layer − I); an erasure without the
    Llama spaces (an older file) still loads and applies, leaving the Llama readers as they were."""
    model, clip = make_model("hidream"), DiTCLIP("hidream")
    erasure = erase(model, clip, rounds=1)[1]
    SaveErasedWeights().save(erasure, "hd")
    loaded = LoadErasedWeights().load("hd_00001.safetensors")["result"][0]
    assert set(loaded.spaces) == set(erasure.spaces) == {"pooled", "llama3.0", "llama3.2"}
    with safe_open(str(models_dir / "rece" / "hd_00001.safetensors"), "pt") as f:
        assert f.metadata()["format_version"] == "2"
        assert {"llama3.0.up", "llama3.2.down"} <= set(f.keys())
    direct = effective_weights(ApplyErasedWeights().apply(model, erasure, 1.0)["result"][0])
    via_file = ApplyErasedWeights().apply(model, loaded, 1.0)["result"][0]
    got = effective_weights(via_file)
    assert all(rel(got[k], v) < 1e-6 if not torch.equal(got[k], v) else True for k, v in direct.items())
    base = effective_weights(model)
    undone = effective_weights(ApplyErasedWeights().apply(via_file, loaded, -1.0)["result"][0])
    assert all(torch.equal(undone[k], base[k]) for k in base)

    ExportErasureAsLoRA().export(model, loaded, "hd_lora", 0, "fp32")
    lora = load_file(str(models_dir / "loras" / "hd_lora_00001.safetensors"))
    for key in LAYER_READERS["hidream"]:
        k = f"diffusion_model.{key}"
        name = lora_key(k, "hidream")
        up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
        assert rel(base[k] + float(lora[f"{name}.alpha"]) / down.shape[0] * up @ down, got[k]) < 1e-5

    # files as written before this change: version 2 with the pooled space only, version 1 with the rows only
    for name, spaces, version in (("old_v2", {"pooled": loaded.spaces["pooled"]}, "2"), ("old_v1", {}, "1")):
        save_erasure(dataclasses.replace(loaded, spaces=spaces), str(models_dir / "rece" / f"{name}.safetensors"))
        with safe_open(str(models_dir / "rece" / f"{name}.safetensors"), "pt") as f:
            assert f.metadata()["format_version"] == version
        older = LoadErasedWeights().load(f"{name}.safetensors")["result"][0]
        assert set(older.spaces) == set(spaces)
        model2, report = ApplyErasedWeights().apply(model, older, 1.0)["result"]
        assert "holds no transform of 2 of the Llama-3 layers" in report
        assert ("holds no transform of the pooled text" in report) == (version == "1")
        after = effective_weights(model2)
        for k in LAYER_READERS["hidream"]:
            assert torch.equal(after[f"diffusion_model.{k}"], base[f"diffusion_model.{k}"])
        t5 = f"diffusion_model.{next(iter(FAMILIES['hidream'].readers))}"
        assert torch.equal(after[t5], got[t5])


def test_hidream_derive_embedding_derives_in_every_llama_space():
    """Derive Embedding on an erased HiDream derives the Llama layers the model reads too: its conditioning carries
    derived conditioning_llama3 rows on the layers read, the others as encoded."""
    model, clip = make_model("hidream"), DiTCLIP("hidream")
    out = erase(model, clip, rounds=1)[0]
    cond, reach, report = RECEDeriveEmbedding().derive(out, clip, CONCEPT, 0.1)["result"]
    assert "+ 2 Llama-3 layers" in report and 0.0 <= reach <= 1.0
    encoded = clip.conditioning(CONCEPT)[0][1]["conditioning_llama3"]
    derived = cond[0][1]["conditioning_llama3"]
    assert derived.shape == encoded.shape and torch.equal(derived[0, 1], encoded[0, 1])
    assert all(rel(derived[0, layer], encoded[0, layer]) > 1e-3 for layer in (0, 2))


def test_cancel_between_dit_prompts():
    """Prompts encoded one per encoder call (Qwen templates): Cancel is honoured between any two of them."""
    from rece_comfyui.nodes.host import encoding

    class Cancelled(Exception):
        pass

    checks = []

    def check() -> None:
        checks.append(1)
        if len(checks) == 3:
            raise Cancelled

    clip, encoded = DiTCLIP("qwen_image"), []
    encode = clip.encode_from_tokens
    clip.encode_from_tokens = lambda *a, **kw: encoded.append(1) or encode(*a, **kw)
    with pytest.raises(Cancelled):
        encoding.encode_many(clip, [f"concept {i}" for i in range(40)], architectures.by_name("qwen_image"),
                             make_model("qwen_image"), encoding.EncoderCalls(check=check))
    assert len(encoded) == 1  # checked before each prompt: stopped before the second (the first call holds four)


@pytest.mark.parametrize("family", ["flux", "wan", "chroma", "sd3"])
def test_t5_prompts_are_batched_with_the_rows_of_one_at_a_time_encoding(family):
    """T5 pads to a fixed length (Chroma's does not: one call per length): 100 prompts in a few encoder
    calls, each prompt's rows equal to encoding it alone; Cancel is checked before every call. SD3's encoder
    gives every prompt's CLIP-L+G rows, then every prompt's T5 rows: each prompt's are picked from both."""
    from rece_comfyui.nodes.host import encoding

    model, clip, encoded, checks = make_model(family), DiTCLIP(family), [], []
    encode = clip.encode_from_tokens
    clip.encode_from_tokens = lambda *a, **kw: encoded.append(1) or encode(*a, **kw)
    texts = [f"concept number {i}" for i in range(100)]
    arch = architectures.by_name(family)
    # an injected clock on which no time passes: the calls' sizes do not depend on the machine's speed
    calls = encoding.EncoderCalls(check=lambda: checks.append(1), clock=lambda: 0.0)
    batched = encoding.encode_many(clip, texts, arch, model, calls)
    alone = [encoding.encode(clip, t, torch.device("cpu"), arch, model)[0] for t in texts]
    assert all(torch.allclose(b.rows.float(), a.rows, atol=1e-5) and b.last_token == a.last_token
               for b, a in zip(batched, alone))
    if family != "chroma":
        assert len(encoded) - len(texts) <= 3  # a first call of 4, one check of it alone, then the rest
    assert len(checks) == len(calls.sizes) and sum(calls.sizes) == len(texts)


def test_an_encoder_that_batches_differently_is_encoded_one_prompt_at_a_time():
    from rece_comfyui.nodes.host import encoding

    model, clip = make_model("flux"), DiTCLIP("flux")
    encode = clip.encode_from_tokens

    def skewed(tokens, *a, **kw):  # a batch of several prompts comes back shifted
        out = encode(tokens, *a, **kw)
        return out + 0.1 if len(tokens["t5xxl"]) > 1 and not kw.get("return_dict") else out

    clip.encode_from_tokens = skewed
    texts = [f"concept number {i}" for i in range(6)]
    arch = architectures.by_name("flux")
    got = encoding.encode_many(clip, texts, arch, model)
    alone = [encoding.encode(clip, t, torch.device("cpu"), arch, model)[0] for t in texts]
    assert all(torch.equal(g.rows.float(), a.rows) for g, a in zip(got, alone))


def test_files_written_before_pooled_spaces_still_load_and_apply(models_dir):
    """A version-1 file written by the pack before #21 loads; it edits the rows' readers only (it holds no
    pooled transform) and says so, and equals the same erasure made now on those readers."""
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).parents[1] / "data" / "erasure_v1_flux.safetensors", models_dir / "rece" / "old.safetensors")
    loaded = LoadErasedWeights().load("old.safetensors")["result"][0]
    assert loaded.spaces == {} and loaded.extra["architecture"] == "flux" and loaded.dim == D
    model = make_model("flux")
    out, report = ApplyErasedWeights().apply(model, loaded, 1.0)["result"]
    assert set(out.patches) == set(reader_keys("flux")) and "holds no transform of the pooled text" in report
    base, after = effective_weights(model, reader_keys("flux")), effective_weights(out, reader_keys("flux"))
    for k in reader_keys("flux"):
        assert rel(after[k], base[k].double() @ loaded.transform.dense().double()) < 1e-5
    if not REAL:  # the file was made on the stand-in Flux: the same erasure made now gives the same transform
        now = erase(model, DiTCLIP("flux"), rounds=0, preserve="")[1]
        assert rel(now.transform.dense(), loaded.transform.dense()) < 1e-5
    assert model.patches == {}
    assert ("warning" in report) == REAL  # the real tier's Flux is another base model than the file's stand-in


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_pooled_vectors_are_encoded_with_t5_cut_to_one_token(family):
    """The pooled vector is CLIP's: encoding it does not run T5 over the whole padded prompt again, the prompts'
    pooled vectors share encoder calls, and each equals the pooled vector of the prompt's full encoding."""
    from rece_comfyui.nodes.host import encoding

    model, clip, t5_lengths = make_model(family), DiTCLIP(family), []
    encode = clip.encode_from_tokens
    clip.encode_from_tokens = lambda tokens, *a, **kw: t5_lengths.append(len(tokens["t5xxl"][0])) or encode(tokens, *a, **kw)
    out, erasure, _ = erase(model, clip, concepts="nudity\nVan Gogh", rounds=1)
    pooled_calls = [n for n in t5_lengths if n == 1]
    # nudity, Van Gogh, ' ' and '' in one call, and the last of them once alone (the CLIP's first batch is checked)
    assert len(pooled_calls) == 2
    clip.encode_from_tokens = encode
    arch = architectures.by_name(family)
    for text in ("nudity", "Van Gogh"):
        full = encoding.encode(clip, text, torch.device("cpu"), arch, model)[2]["pooled_output"]
        assert torch.equal(encoding.encode_pooled(clip, text), full)
        assert torch.allclose(encoding.pooled_many(clip, ["a cat", text], arch)[1], full, rtol=1e-5, atol=1e-6)




def test_hidream_llama_layers_streamed_in_groups_give_the_same_erasure():
    """Memory: with room for one layer's rows at a time, every layer is its own encoding pass (each prompt encoded
    once per pass, only that layer kept) and the erasures are the same as with all layers from one pass."""
    from rece_comfyui.nodes.host import weights
    from rece_comfyui.nodes.rece import layer_erasures

    model, clip = make_model("hidream"), DiTCLIP("hidream")
    arch, keys = weights.architecture(model)
    calls = []
    clip.encode_from_tokens = (lambda f: lambda *a, **k: calls.append(1) or f(*a, **k))(clip.encode_from_tokens)
    args = dict(lamb=0.1, erase_scale=1.0, preserve_scale=0.1, reg=0.1, epochs=1)
    prompts = 4  # the concept, ' ' (its guide), '' and the preserved prompt

    def run(keep):
        calls.clear()
        out, spaces, note = layer_erasures(model, clip, arch, keys, [CONCEPT], "", [PRESERVED], torch.device("cpu"),
                                           lambda: None, keep_bytes=keep, **args)
        return out, len(calls)

    together, n_together = run(2**30)
    apart, n_apart = run(1)
    assert (n_together, n_apart) == (prompts, 2 * prompts)  # one pass; then one pass per layer (two layers)
    assert set(together) == set(apart) == {"llama3.0", "llama3.2"}
    for name in together:
        assert torch.equal(together[name].transform.dense(), apart[name].transform.dense())
