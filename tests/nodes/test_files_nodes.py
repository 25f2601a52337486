"""Save / Load Erased Weights and Export as LoRA through ComfyUI's folder_paths (stand-in or real)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import folder_paths
from conftest import load_pack
from factory import FakeCLIP, effective_weights, make_model

load_pack()
from rece_comfyui.nodes.files import ExportErasureAsLoRA, LoadErasedWeights, SaveErasedWeights  # noqa: E402
from rece_comfyui.nodes.rece import ApplyErasedWeights, RECEEraseConcept  # noqa: E402
from rece_comfyui.rece_core.files import lora_key  # noqa: E402
from rece_comfyui.rece_core.toy import layer_names  # noqa: E402
from measure import rel  # noqa: E402

KEYS = [k for k, _ in layer_names("sd15")]
ARGS = dict(concepts="nudity", guide="", preserve="", concept_kind="nudity", rounds=1, reg=0.1, lamb=0.1,
            erase_scale=1.0, preserve_scale=0.1)


@pytest.fixture(scope="module")
def erased():
    model, clip = make_model("sd15"), FakeCLIP("sd15")
    out = RECEEraseConcept().erase(model, clip, **ARGS)["result"]
    return model, out[1]


def test_save_load_apply_is_bit_identical_and_listed(models_dir, erased):
    model, erasure = erased
    SaveErasedWeights().save(erasure, "rece/erasure")
    assert (models_dir / "rece" / "rece" / "erasure_00001.safetensors").is_file()
    SaveErasedWeights().save(erasure, "rece/erasure")
    choices = LoadErasedWeights.INPUT_TYPES()["required"]["erasure_name"][0]
    assert choices == ["rece/erasure_00001.safetensors", "rece/erasure_00002.safetensors"]
    loaded, report = LoadErasedWeights().load("rece/erasure_00001.safetensors")["result"]
    assert "nudity" in report
    a = ApplyErasedWeights().apply(model, erasure, 0.7)["result"][0]
    b = ApplyErasedWeights().apply(model, loaded, 0.7)["result"][0]
    wa, wb = effective_weights(a, KEYS), effective_weights(b, KEYS)
    assert all(torch.equal(wa[k], wb[k]) for k in KEYS)


def test_fingerprint_warning_on_another_base(models_dir, erased):
    model, erasure = erased
    SaveErasedWeights().save(erasure, "e")
    loaded = LoadErasedWeights().load("e_00001.safetensors")["result"][0]
    same = ApplyErasedWeights().apply(model, loaded, 1.0)
    assert "warning" not in same["result"][1] and same["ui"]["rece_report"][0]["warning"] is None
    other = ApplyErasedWeights().apply(make_model("sd15", seed=9), loaded, 1.0)
    assert "computed on another base model" in other["result"][1]


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_names_outside_the_folder_are_refused(models_dir, name):
    with pytest.raises(ValueError, match="plain name inside the models folder"):
        LoadErasedWeights().load(name)


def test_links_pointing_outside_are_refused(models_dir, erased, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "x.safetensors"
    from rece_comfyui.rece_core.files import save_erasure

    save_erasure(erased[1], str(outside))
    os.symlink(outside, models_dir / "rece" / "link.safetensors")
    with pytest.raises(ValueError, match="links outside models/rece"):
        LoadErasedWeights().load("link.safetensors")


def test_save_prefix_outside_refused(models_dir, erased):
    with pytest.raises(ValueError, match="plain name"):
        SaveErasedWeights().save(erased[1], "../evil")
    assert not list(models_dir.parent.glob("evil*"))


def test_bad_file_refused_and_model_untouched(models_dir, erased):
    (models_dir / "rece" / "junk.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{broken}")
    with pytest.raises(ValueError, match="junk.safetensors: malformed safetensors header"):
        LoadErasedWeights().load("junk.safetensors")


def test_export_lora_reproduces_apply(models_dir, erased):
    model, erasure = erased
    report = ExportErasureAsLoRA().export(model, erasure, "rece/lora", 0, "fp32")["result"][0]
    assert "exact" in report
    lora = load_file(str(models_dir / "loras" / "rece" / "lora_00001.safetensors"))
    assert len(lora) == 3 * len(KEYS)
    base = effective_weights(model, KEYS)
    applied = effective_weights(ApplyErasedWeights().apply(model, erasure, 1.0)["result"][0], KEYS)
    for k in KEYS:
        name = lora_key(k)
        up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
        scale = float(lora[f"{name}.alpha"]) / down.shape[0]
        assert rel(base[k] + scale * up @ down, applied[k]) < 1e-5


def test_export_lower_rank_states_the_error(models_dir, erased):
    model, erasure = erased
    report = ExportErasureAsLoRA().export(model, erasure, "small", 8, "fp16")["result"][0]
    assert "at rank 8" in report and "largest relative error" in report
    lora = load_file(str(models_dir / "loras" / "small_00001.safetensors"))
    assert all(v.shape[0] == 8 for k, v in lora.items() if k.endswith("lora_down.weight"))


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="real tier: set COMFYUI_PATH")
def test_comfyuis_own_lora_loader_matches_apply(models_dir):
    import nodes as comfy_nodes

    model, clip = make_model("sd15"), FakeCLIP("sd15")
    model.model.model_config = _sd15_config()
    erasure = RECEEraseConcept().erase(model, clip, **ARGS)["result"][1]
    ExportErasureAsLoRA().export(model, erasure, "rece/lora", 0, "fp16")
    assert "rece/lora_00001.safetensors" in folder_paths.get_filename_list("loras")
    lora_model = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "rece/lora_00001.safetensors", 1.0)[0]
    applied = effective_weights(ApplyErasedWeights().apply(model, erasure, 1.0)["result"][0], KEYS)
    via_lora = effective_weights(lora_model, KEYS)
    assert set(lora_model.patches) >= set(KEYS)
    assert max(rel(via_lora[k], applied[k]) for k in KEYS) < 1e-3


def _sd15_config():
    import comfy.supported_models
    from checkpoint import SD15_UNET

    return comfy.supported_models.SD15(dict(SD15_UNET))
