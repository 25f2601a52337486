"""Which layers read the text, for every text-conditioned family current ComfyUI (0.38.x) loads.

Each key set below mirrors the text path of the current ComfyUI class (``comfy/supported_models.py``
config class, ``comfy/ldm/<family>/model.py`` module names), read from upstream ComfyUI: the text
readers, the norms before them, the pooled readers, plus a few keys that tell look-alike families
apart. Families newer than 0.3.64 exist here only as these stand-ins; in the real tier the families
0.3.64 has are also built from ComfyUI's own classes (``test_real_classes_have_the_readers``).
"""

from __future__ import annotations

import pytest

from conftest import COMFYUI_PATH, load_pack

load_pack()
from rece_comfyui.nodes.host import architectures  # noqa: E402

BLOCKS = ["img_in.weight", "final_layer.linear.weight"]
FLUX_BLOCKS = ["double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mod.lin.weight",
               "single_blocks.0.linear1.weight"]

# config class → (keys, family, reader keys, pooled keys)
FAMILIES = {
    "Flux": (FLUX_BLOCKS + ["txt_in.weight", "vector_in.in_layer.weight", "guidance_in.in_layer.weight"],
             "flux", ["txt_in.weight"], ["vector_in.in_layer.weight"]),
    "Flux2": (["double_blocks.0.img_attn.qkv.weight", "double_stream_modulation_img.lin.weight",
               "single_stream_modulation.lin.weight", "txt_in.weight"], "flux2", ["txt_in.weight"], []),
    "LongCatImage": (FLUX_BLOCKS + ["txt_in.weight"], "longcat_image", ["txt_in.weight"], []),
    "QwenImage21": (["txt_in.text_norm.weight", "txt_in.in_layer.weight", "txt_in.out_layer.weight",
                     "transformer_blocks.0.attn.to_q.weight"], "qwen_image21", ["txt_in.in_layer.weight"], []),
    "Kandinsky5Image": (["text_embeddings.in_layer.weight", "pooled_text_embeddings.in_layer.weight",
                         "visual_embeddings.in_layer.weight"], "kandinsky5",
                        ["text_embeddings.in_layer.weight"], ["pooled_text_embeddings.in_layer.weight"]),
    "HunyuanVideo": (["txt_in.input_embedder.weight", "txt_in.c_embedder.in_layer.weight",
                      "txt_in.t_embedder.in_layer.weight", "vector_in.in_layer.weight", "double_blocks.0.img_mod.lin.weight"],
                     "hunyuan_video", ["txt_in.input_embedder.weight", "txt_in.c_embedder.in_layer.weight"],
                     ["vector_in.in_layer.weight"]),
    "HunyuanImage21": (["txt_in.input_embedder.weight", "txt_in.c_embedder.in_layer.weight",
                        "byt5_in.fc1.weight", "double_blocks.0.img_mod.lin.weight"],
                       "hunyuan_image", ["txt_in.input_embedder.weight", "txt_in.c_embedder.in_layer.weight"], []),
    "Ideogram4": (["llm_cond_norm.weight", "llm_cond_proj.weight", "input_proj.weight", "layers.0.attention.qkv.weight"],
                  "ideogram4", ["llm_cond_proj.weight"], []),
    "ErnieImage": (["text_proj.weight", "x_embedder.proj.weight", "layers.0.self_attention.to_k.weight"],
                   "ernie_image", ["text_proj.weight"], []),
    "JoyImage": (["condition_embedder.text_embedder.linear_1.weight", "condition_embedder.text_embedder.linear_2.weight",
                  "double_blocks.0.attn.txt_attn_qkv.weight"], "joyimage",
                 ["condition_embedder.text_embedder.linear_1.weight"], []),
    "Omnigen2": (["time_caption_embed.caption_embedder.0.weight", "time_caption_embed.caption_embedder.1.weight"],
                 "omnigen2", ["time_caption_embed.caption_embedder.1.weight"], []),
    "Anima": ([f"llm_adapter.blocks.{i}.cross_attn.{p}_proj.weight" for i in range(2) for p in "qkvo"]
              + [f"blocks.{i}.cross_attn.{p}_proj.weight" for i in range(2) for p in "qkv"],
              "anima", [f"llm_adapter.blocks.{i}.cross_attn.{p}_proj.weight" for i in range(2) for p in "kv"], []),
    "CosmosT2IPredict2": ([f"blocks.{i}.cross_attn.{p}_proj.weight" for i in range(2) for p in "qkv"],
                          "cosmos_predict2", [f"blocks.{i}.cross_attn.{p}_proj.weight" for i in range(2) for p in "kv"], []),
    "AuraFlow": (["cond_seq_linear.weight", "init_x_linear.weight"], "auraflow", ["cond_seq_linear.weight"], []),
    "PixArtSigma": (["y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc2.weight", "x_embedder.proj.weight"],
                    "pixart", ["y_embedder.y_proj.fc1.weight"], []),
    "LTXV": (["caption_projection.linear_1.weight", "caption_projection.linear_2.weight", "patchify_proj.weight"],
             "ltxv", ["caption_projection.linear_1.weight"], []),
    "GenmoMochi": (["t5_yproj.weight", "t5_y_embedder.to_kv.weight", "t5_y_embedder.to_q.weight",
                    "t5_y_embedder.to_out.weight"], "mochi",
                   ["t5_y_embedder.to_kv.weight", "t5_y_embedder.to_q.weight", "t5_yproj.weight"], []),
    "HiDream": (["caption_projection.0.linear.weight", "caption_projection.1.linear.weight",
                 "caption_projection.2.linear.weight", "p_embedder.pooled_embedder.linear_1.weight",
                 "t_embedder.timestep_embedder.linear_1.weight"], "hidream", ["caption_projection.2.linear.weight"],
                ["p_embedder.pooled_embedder.linear_1.weight"]),
    "Stable_Cascade_C": (["clip_txt_mapper.weight", "clip_txt_pooled_mapper.weight", "clip_img_mapper.weight"],
                         "stable_cascade", ["clip_txt_mapper.weight"], ["clip_txt_pooled_mapper.weight"]),
    "SDXL": (["input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", "label_emb.0.0.weight"], "unet",
             ["input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"], ["label_emb.0.0.weight"]),
    "SD15": (["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"], "unet",
             ["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"], []),
    "SD21UnclipH": (["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "label_emb.0.0.weight"], "unet",
                    ["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"], []),  # label_emb reads an image
}


def full(keys):
    return [f"diffusion_model.{k}" for k in keys + BLOCKS]


@pytest.mark.parametrize("config", list(FAMILIES))
def test_detected_by_config_class(config):
    keys, name, readers, pooled = FAMILIES[config]
    arch, found = architectures.detect(config, full(keys))
    assert arch.name == name
    assert sorted(found) == sorted(full(readers)[:len(readers)])
    assert sorted(arch.pooled_keys(config, full(keys))) == sorted(f"diffusion_model.{k}" for k in pooled)


@pytest.mark.parametrize("config", [c for c in FAMILIES if c not in ("SD15", "SD21UnclipH")])
def test_detected_by_keys_when_the_config_class_is_unknown(config):
    """A renamed or newer config class of the same model is still recognised, as the same family."""
    keys, name, readers, _ = FAMILIES[config]
    arch, found = architectures.detect(config + "Variant", full(keys))
    assert arch.name == name and sorted(found) == sorted(f"diffusion_model.{k}" for k in readers)


@pytest.mark.parametrize("config,keys,expected", [
    # a Flux-family model with txt_norm has Qwen-Image's two signature keys
    ("Flux2", ["txt_norm.weight", "txt_in.weight", "double_blocks.0.img_attn.qkv.weight",
               "double_stream_modulation_img.lin.weight"], "flux2"),
    ("SomeFluxVariant", ["txt_norm.weight", "txt_in.weight"] + FLUX_BLOCKS + ["vector_in.in_layer.weight"], "flux"),
    ("QwenImage", ["txt_norm.weight", "txt_in.weight", "transformer_blocks.0.attn.to_q.weight"], "qwen_image"),
    ("SomeQwenVariant", ["txt_norm.weight", "txt_in.weight", "transformer_blocks.0.attn.to_q.weight"], "qwen_image"),
    # Anima is a Cosmos Predict2 with an adapter: the blocks' cross-attention reads the adapter, not the text
    ("SomeAnimaVariant", FAMILIES["Anima"][0], "anima"),
    ("SomeCosmosVariant", FAMILIES["CosmosT2IPredict2"][0], "cosmos_predict2"),
    ("SomeHunyuanVariant", FAMILIES["HunyuanImage21"][0], "hunyuan_image"),
    ("Chroma", ["txt_in.weight", "distilled_guidance_layer.in_proj.weight"] + FLUX_BLOCKS, "chroma"),
])
def test_confusable_families_are_told_apart(config, keys, expected):
    assert architectures.detect(config, full(keys))[0].name == expected


def test_flux_family_txt_norm_is_the_norm_before_txt_in():
    arch = architectures.by_name("flux2")
    with_norm = full(FAMILIES["Flux2"][0] + ["txt_norm.scale"])
    assert architectures.norm_key(arch, with_norm) == "txt_norm.scale"
    assert architectures.norm_key(arch, full(FAMILIES["Flux2"][0])) is None  # most Flux checkpoints have none
    assert architectures.norm_key(architectures.by_name("qwen_image"), full(["txt_norm.weight"])) == "txt_norm.weight"


@pytest.mark.parametrize("config,what", [("HiDreamO1", "HiDream-O1"), ("SenseNovaU15", "SenseNova-U")])
def test_text_read_inside_the_diffusion_model_is_refused_with_the_reason(config, what):
    with pytest.raises(ValueError, match=f"{what} reads the prompt's tokens inside its own language model"):
        architectures.detect(config, full(["language_model.layers.0.self_attn.k_proj.weight"]))


def test_every_family_has_a_distinct_name_and_a_text_space():
    names = [a.name for a in architectures.ARCHITECTURES]
    assert len(names) == len(set(names)) and all(a.space for a in architectures.ARCHITECTURES)


REAL = {  # the families ComfyUI 0.3.64 has, built from its own classes with tiny configs (Mochi's class fixes
    # its MLP at full size, so it is checked on the stand-in keys only)
    "AuraFlow": dict(max_seq=64, cond_seq_dim=32, n_double_layers=1, n_layers=1, dim=64, n_heads=2, patch_size=2,
                     in_channels=4, out_channels=4),
    "PixArtAlpha": dict(image_model="pixart_alpha", input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1,
                        num_heads=2, caption_channels=32, pe_interpolation=1.0, model_max_length=16),
    "LTXV": dict(image_model="ltxv", num_layers=1, attention_head_dim=32, num_attention_heads=2, caption_channels=32,
                 cross_attention_dim=64, in_channels=128, out_channels=128),
    "Stable_Cascade_C": dict(stable_cascade_stage="c", c_in=4, c_out=4, c_r=16, c_cond=32, c_hidden=[32, 32],
                             nhead=[2, 2], blocks=[[1, 1], [1, 1]], block_repeat=[[1, 1], [1, 1]],
                             level_config=["CTA", "CTA"], c_clip_text=16, c_clip_text_pooled=16, c_clip_img=16,
                             c_clip_seq=2, switch_level=[False], self_attn=True, t_conds=["sca", "crp"]),
    "CosmosT2IPredict2": dict(image_model="cosmos_predict2", max_img_h=16, max_img_w=16, max_frames=1, in_channels=16,
                              out_channels=16, patch_spatial=2, patch_temporal=1, model_channels=64, num_blocks=2,
                              num_heads=2, crossattn_emb_channels=32, pos_emb_cls="rope3d"),
    "Omnigen2": dict(image_model="omnigen2", hidden_size=64, num_layers=1, num_refiner_layers=1, num_attention_heads=2,
                     num_kv_heads=2, multiple_of=16, axes_dim_rope=(8, 12, 12), axes_lens=(16, 16, 16),
                     text_feat_dim=32),
    "HiDream": dict(image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                    num_single_layers=1, attention_head_dim=16, num_attention_heads=2, caption_channels=[32, 32],
                    text_emb_dim=32, num_routed_experts=2, num_activated_experts=1, axes_dims_rope=[4, 6, 6],
                    max_resolution=[16, 16], llama_layers=[0, 1]),
    "HunyuanVideo": dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=16,
                         context_in_dim=32, hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1,
                         axes_dim=[8, 12, 12], theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True,
                         byt5=False, meanflow=False),
}


@pytest.mark.skipif(not COMFYUI_PATH, reason="real tier: set COMFYUI_PATH")
@pytest.mark.parametrize("config", list(REAL))
def test_real_classes_have_the_readers(config):
    """ComfyUI 0.3.64's own model: its text readers (and pooled readers) are found, each as wide as the text."""
    import torch

    import comfy.supported_models

    cls = getattr(comfy.supported_models, config)
    model_config = cls(dict(REAL[config]))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    state = model.state_dict()
    keys = list(state)
    arch, found = architectures.detect(config, keys)
    expected = FAMILIES["PixArtSigma" if config == "PixArtAlpha" else config]
    assert arch.name == expected[1]
    assert sorted(found) == sorted(f"diffusion_model.{k}" for k in expected[2])
    assert {state[k].shape[1] for k in found} == {state[found[0]].shape[1]}
    pooled = arch.pooled_keys(config, keys)
    assert [k.removeprefix("diffusion_model.") for k in pooled] == expected[3]


def test_sdxl_pooled_bigg_is_erased_on_its_columns_of_label_emb_only(models_dir):
    """SDXL's label_emb reads [pooled bigG (1280) | size embeddings (1536)]: the pooled erasure edits the
    first 1280 columns as W P and leaves the size embeddings' columns exactly as they were; it survives
    Save/Load and is in the exported LoRA."""
    import math

    import torch
    from safetensors.torch import load_file

    from factory import FakeCLIP, effective_weights, make_model
    from rece_comfyui.nodes.files import ExportErasureAsLoRA, LoadErasedWeights, SaveErasedWeights
    from rece_comfyui.nodes.rece import ApplyErasedWeights, RECEEraseConcept

    class BigGPooled(FakeCLIP):
        """The tiny CLIP's rows, and a 1280-wide pooled vector carrying the prompt (SDXL's pooled bigG)."""

        def __init__(self):
            super().__init__("tiny")
            gen = torch.Generator().manual_seed(7)
            self.to_bigg = torch.randn(64, 1280, generator=gen) / 8

        def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
            cond = super().encode_from_tokens(tokens)
            ids = [t[0] for t in tokens["l"][0]]
            rows = cond[0, :len(ids)]
            pooled = ((rows[ids.index(self.parts[0].end)] + rows[1:ids.index(self.parts[0].end)].sum(0))
                      @ self.to_bigg).unsqueeze(0)
            return (cond, pooled) if return_pooled else cond

    model = make_model("tiny", config="SDXL")  # SDXL's pooled path next to tiny cross-attention (fast)
    label = torch.nn.Module()
    g = torch.Generator().manual_seed(3)
    label.register_parameter("weight", torch.nn.Parameter(torch.randn(64, 2816, generator=g) / math.sqrt(2816),
                                                          requires_grad=False))
    model.model.diffusion_model.add_module("label_emb", torch.nn.Sequential(torch.nn.Sequential(label)))
    key = "diffusion_model.label_emb.0.0.weight"
    before = model.model.state_dict()[key].clone()
    out, erasure, report = RECEEraseConcept().erase(model, BigGPooled(), "nudity", "", "", "nudity", 1, 0.1, 0.1,
                                                    1.0, 0.1)["result"]
    assert erasure.spaces["pooled"].dim == 1280 and "pooled text (label_emb.0.0.weight)" in report
    w = effective_weights(out, [key])[key]
    p = erasure.spaces["pooled"].transform.dense().double()
    assert torch.equal(w[:, 1280:], before[:, 1280:])
    assert float((w[:, :1280].double() - before[:, :1280].double() @ p).norm() / before.norm()) < 1e-5
    assert float((w[:, :1280] - before[:, :1280]).norm()) > 1e-3 * float(before.norm())
    assert torch.equal(model.model.state_dict()[key], before) and key not in model.patches
    SaveErasedWeights().save(erasure, "x")
    loaded = LoadErasedWeights().load("x_00001.safetensors")["result"][0]
    again = ApplyErasedWeights().apply(model, loaded, 1.0)["result"][0]
    assert torch.equal(effective_weights(again, [key])[key], w)
    ExportErasureAsLoRA().export(model, erasure, "l", 0, "fp32")
    lora = load_file(str(models_dir / "loras" / "l_00001.safetensors"))
    up, down = lora["lora_unet_label_emb_0_0.lora_up.weight"], lora["lora_unet_label_emb_0_0.lora_down.weight"]
    delta = float(lora["lora_unet_label_emb_0_0.alpha"]) / down.shape[0] * up @ down
    assert float((before + delta - w).norm() / w.norm()) < 1e-5 and float(delta[:, 1280:].abs().max()) == 0.0


def test_a_flux_checkpoint_with_txt_norm_is_read_through_it():
    """A Flux-family checkpoint carrying ``txt_norm`` (ComfyUI's flux model has it as an option): the rows
    RECE reads, and the rows Derive returns, are in the normed space the reader sees."""
    import torch

    from dit_factory import D, DiTCLIP, make_model
    from rece_comfyui.nodes.host import encoding, weights
    from rece_comfyui.nodes.rece import RECEDeriveEmbedding, RECEEraseConcept

    model, clip = make_model("flux"), DiTCLIP("flux")
    norm = torch.nn.Module()
    norm.register_parameter("scale", torch.nn.Parameter(0.5 + torch.rand(D, generator=torch.Generator().manual_seed(2)),
                                                        requires_grad=False))
    model.model.diffusion_model.add_module("txt_norm", norm)
    arch, _ = weights.architecture(model)
    raw = clip.encode_from_tokens(clip.tokenize("nudity"))[0].float()
    seen = encoding.encode(clip, "nudity", torch.device("cpu"), arch, model)[0].rows
    assert torch.allclose(seen, architectures.rms_norm(raw, norm.scale, 1e-6), atol=1e-5)
    out = RECEEraseConcept().erase(model, clip, "nudity", "", "", "nudity", 1, 0.1, 0.1, 1.0, 0.1)["result"][0]
    cond = RECEDeriveEmbedding().derive(out, clip, "nudity", 0.1)["result"][0][0][0][0].float()
    again = architectures.rms_norm(cond, norm.scale, 1e-6)  # what txt_in reads from the returned rows
    emb = encoding.encode(clip, "nudity", torch.device("cpu"), arch, out)[0]
    assert again.shape == emb.rows.shape and torch.isfinite(again).all()
    assert "diffusion_model.txt_norm.scale" not in out.patches
