"""A tiny seeded UNet that really samples, for ConceptPrune's CI-tier tests (our own code).

Its parameters carry ComfyUI's UNet key names (``diffusion_model.input_blocks.1.1.transformer_blocks.0
.attn2.to_k.weight``, ``… .ff.net.2.weight``...), wrapped in the host's ``ModelPatcher``; its model
has ``apply_model(x, t, c_crossattn=…)`` as ComfyUI's ``BaseModel`` (an eps-prediction denoiser),
``latent_format.latent_channels`` and ``model_config``. Each transformer block is cross-attention
over the text rows then a GEGLU feed-forward (``ff.net.0.proj``, ``ff.net.1`` dropout, ``ff.net.2``),
as ComfyUI's ``BasicTransformerBlock``; norms are weightless, linears fan-in scaled.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import comfy.model_patcher

BLOCKS = (("input_blocks.1.1", 32), ("middle_block.1", 64), ("output_blocks.3.1", 32))
D = 64  # text width (FakeCLIP("tiny"))
CHANNELS = 4


def _linear(i: int, o: int, g: torch.Generator, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(i, o, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(o, i, generator=g) / math.sqrt(i))
        if bias:
            layer.bias.zero_()
    return layer.requires_grad_(False)


class GEGLU(nn.Module):
    def __init__(self, c: int, g: torch.Generator) -> None:
        super().__init__()
        self.proj = _linear(c, 8 * c, g)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class Block(nn.Module):
    def __init__(self, c: int, g: torch.Generator) -> None:
        super().__init__()
        self.attn2 = nn.Module()
        self.attn2.to_q, self.attn2.to_k, self.attn2.to_v = _linear(c, c, g), _linear(D, c, g), _linear(D, c, g)
        self.attn2.to_out = nn.Sequential(_linear(c, c, g))
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(c, g), nn.Dropout(0.0), _linear(4 * c, c, g, bias=True))

    def forward(self, x, ctx):
        h = F.layer_norm(x, x.shape[-1:])
        q, k, v = self.attn2.to_q(h), self.attn2.to_k(ctx), self.attn2.to_v(ctx)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        x = x + self.attn2.to_out(att @ v)
        return x + self.ff.net(F.layer_norm(x, x.shape[-1:]))


class Transformer(nn.Module):
    def __init__(self, c_in: int, c: int, g: torch.Generator) -> None:
        super().__init__()
        self.proj_in, self.proj_out = _linear(c_in, c, g), _linear(c, c_in, g)
        self.transformer_blocks = nn.ModuleList([Block(c, g)])

    def forward(self, x, ctx):
        return x + self.proj_out(self.transformer_blocks[0](self.proj_in(x), ctx))


class TinyUNet(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stem = _linear(CHANNELS + 1, 16, g)
        self.order = []
        for path, c in BLOCKS:
            parent = self
            *head, last = path.split(".")
            for part in head:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(last, Transformer(16, c, g))
            self.order.append(parent._modules[last])
        self.head = _linear(16, CHANNELS, g)

    def forward(self, x, sigma, ctx):
        b, ch, h, w = x.shape
        tokens = x.reshape(b, ch, h * w).transpose(1, 2)
        t = torch.log(sigma).reshape(b, 1, 1).expand(b, h * w, 1) / 4
        z = self.stem(torch.cat([tokens, t], dim=-1))
        for block in self.order:
            z = block(z, ctx)
        return self.head(z).transpose(1, 2).reshape(b, ch, h, w)


class TinyBaseModel(nn.Module):
    """Shaped like ComfyUI's ``BaseModel``: ``diffusion_model``, ``apply_model``, ``latent_format``."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.diffusion_model = TinyUNet(seed)
        self.latent_format = type("LatentFormat", (), {"latent_channels": CHANNELS})()
        self.model_config = type("SD15", (), {})()
        self.device = torch.device("cpu")

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t.reshape(-1, 1, 1, 1)
        eps = self.diffusion_model(x / torch.sqrt(sigma ** 2 + 1), t, c_crossattn)
        return x - eps * sigma


def make_sampling_model(seed: int = 0):
    """A ``ModelPatcher`` around a seeded ``TinyBaseModel`` (FakeCLIP("tiny") is its text encoder)."""
    return comfy.model_patcher.ModelPatcher(TinyBaseModel(seed), load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def real_sd15(seed: int = 0):
    """Real tier: ComfyUI's own SD1.5 model class (model_channels 32, seeded) and its own SD1 CLIP (seeded)."""
    import sys
    from pathlib import Path

    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models

    sys.path.insert(0, str(Path(__file__).parent / "real"))
    from checkpoint import SD15_UNET, seed_module

    config = comfy.supported_models.SD15(dict(SD15_UNET, model_channels=32))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    seed_module(model.diffusion_model, g)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))

    class Target:
        clip = comfy.sd1_clip.SD1ClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer
        params: dict = {}

    clip = comfy.sd.CLIP(target=Target(), parameters=123_000_000)
    seed_module(clip.cond_stage_model, g)
    return patcher, clip
