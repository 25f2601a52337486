"""A tiny SD1.5-shaped MODEL (ComfyUI's own BaseModel and UNet, 32 channels), ComfyUI's SD1 CLIP and a
tiny VAE, seeded by module kind (real tier only: needs COMFYUI_PATH)."""

from __future__ import annotations

import torch

from checkpoint import SD15_UNET, seed_module

TINY_UNET = SD15_UNET | {"model_channels": 32, "num_heads": 2, "channel_mult": [1, 2], "num_res_blocks": [1, 1],
                         "transformer_depth": [1, 1, 1, 1], "transformer_depth_output": [1, 1, 1, 1, 1, 1],
                         "transformer_depth_middle": 1}
TINY_VAE = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def tiny_model(seed: int = 0):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(TINY_UNET))
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(config, device="cpu")
    seed_module(model.diffusion_model, torch.Generator().manual_seed(seed))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def sd1_clip(seed: int = 0, embedding_directory: str | None = None):
    import comfy.sd
    import comfy.sd1_clip

    class Target:
        clip = comfy.sd1_clip.SD1ClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer
        params: dict = {}

    clip = comfy.sd.CLIP(target=Target(), embedding_directory=embedding_directory, parameters=123_000_000)
    with torch.no_grad():
        seed_module(clip.cond_stage_model, torch.Generator().manual_seed(seed + 1))
    return clip


def tiny_vae(seed: int = 0):
    import comfy.ldm.models.autoencoder
    import comfy.sd

    ae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=TINY_VAE, embed_dim=4)
    seed_module(ae, torch.Generator().manual_seed(seed + 2))
    return comfy.sd.VAE(sd=ae.state_dict(), config={"params": {"ddconfig": dict(TINY_VAE), "embed_dim": 4}})
