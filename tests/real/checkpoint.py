"""A real-format SD1.5 single-file checkpoint, and ComfyUI's SDXL CLIP, from seeded weights (ComfyUI's own modules).

Real tier only (needs COMFYUI_PATH). Seeded by module kind: norm weights 1 and biases 0,
linear/conv weights fan-in scaled normal, embeddings N(0, 0.02); a UNet whose norms are zero
would ignore its prompt.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

SD15_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
             "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False}
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


@torch.no_grad()
def seed_module(module: nn.Module, generator: torch.Generator) -> None:
    for m in module.modules():
        params = dict(m.named_parameters(recurse=False))
        if not params:
            continue
        name = type(m).__name__
        w = params.get("weight")
        if "Norm" in name:
            if w is not None:
                w.fill_(1.0)
        elif "Embedding" in name:
            w.copy_(0.02 * torch.randn(w.shape, generator=generator))
        elif w is not None and w.ndim >= 2:
            fan_in = math.prod(w.shape[1:])
            w.copy_(torch.randn(w.shape, generator=generator) / math.sqrt(fan_in))
        for pname, p in params.items():
            if pname == "bias":
                p.zero_()
            elif pname != "weight":  # e.g. positional parameters
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))


def make_sd15_checkpoint(path: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``model.diffusion_model.*``, ``cond_stage_model.*``, ``first_stage_model.*`` like SD1.5."""
    import comfy.ldm.models.autoencoder
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    unet = UNetModel(**SD15_UNET, operations=comfy.ops.disable_weight_init)
    seed_module(unet, g)
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    del unet
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    seed_module(clip, g)
    for k, v in clip.state_dict().items():
        if k.startswith("transformer.text_model."):
            sd[f"cond_stage_model.{k}"] = v
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    del clip
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    seed_module(vae, g)
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    del vae
    out = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    save_file(out, str(path))
    return path


@torch.no_grad()
def sdxl_clip(seed: int = 0):
    """ComfyUI's SDXL CLIP (CLIP-L + OpenCLIP bigG, its own classes at their real size, ComfyUI's own
    tokenizers), seeded by module kind as a checkpoint would give it: what an SDXL checkpoint loads."""
    import comfy.sd
    import comfy.sdxl_clip

    class Target:
        clip = comfy.sdxl_clip.SDXLClipModel
        tokenizer = comfy.sdxl_clip.SDXLTokenizer
        params: dict = {}

    clip = comfy.sd.CLIP(target=Target(), parameters=817_000_000)
    seed_module(clip.cond_stage_model, torch.Generator().manual_seed(seed))
    return clip


def sd15_model_and_clip(seed: int = 0):
    """ComfyUI's MODEL and CLIP of a seeded real-format SD1.5 checkpoint, loaded by ComfyUI itself."""
    import tempfile

    import comfy.sd

    with tempfile.TemporaryDirectory() as tmp:
        path = make_sd15_checkpoint(Path(tmp) / "sd15.safetensors", seed=seed)
        return tuple(comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False)[:2])
