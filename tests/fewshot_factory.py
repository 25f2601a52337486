"""Seeded CLIP, MODEL and VAE for the few-shot unlearning tests, on whichever ComfyUI tier is on the path.

CI tier: small modules of our own shaped like ComfyUI's (``comfy.sd.CLIP`` with ``cond_stage_model``
``clip_l.transformer.text_model.encoder.layers.N.{self_attn.q/k/v/out_proj, mlp.fc1/fc2}``,
``encode_token_weights``, a ``ModelPatcher``; ``comfy.model_base.BaseModel.apply_model`` with a
``model_sampling`` of ``comfy.model_sampling``'s classes; ``VAE.encode``), over the stand-in's patcher.
Real tier: ComfyUI's own ``CLIP`` (SD1 CLIP-L classes and tokenizer, small width), ``BaseModel`` of
``supported_models.SD15`` (small UNet), ``VAE``; all seeded (norms 1, linear fan-in scaled).
``make_text_sensitive`` pre-trains them on synthetic image classes (``class_images``, captions naming
``CLASS_WORDS``) so that the model reads its text; ``caption_loss`` measures how much a caption helps.
"""

from __future__ import annotations

import math
import os
import zlib

import torch
from torch import nn

REAL = bool(os.environ.get("COMFYUI_PATH"))
WIDTH = 32
TOKEN_STD = float(os.environ.get("FF_TOKEN_STD", "1.0"))


def seed_module(module: nn.Module, seed: int, token_std: float = 0.02) -> nn.Module:
    """Norm weights 1, biases 0, embeddings N(0, 0.02) (token embeddings N(0, token_std)), other weights
    N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            params = dict(m.named_parameters(recurse=False))
            name = type(m).__name__
            for pname, p in params.items():
                if pname == "bias":
                    p.zero_()
                elif "Norm" in name:
                    p.fill_(1.0)
                elif "Embedding" in name or p.ndim < 2:
                    std = token_std if "Embedding" in name and p.shape[0] > 77 else 0.02
                    p.copy_(std * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
    return module


# --------------------------------------------------------------------------- CI tier: our own small modules

class _Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        a = (q @ k.transpose(-1, -2) / math.sqrt(x.shape[-1])).masked_fill(causal, float("-inf")).softmax(-1)
        return self.out_proj(a @ v)


class _MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.layer_norm1, self.self_attn = nn.LayerNorm(d), _Attn(d)
        self.layer_norm2, self.mlp = nn.LayerNorm(d), _MLP(d)

    def forward(self, x, causal):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class ToyTextModel(nn.Module):
    """``transformer.text_model``: token + position embeddings, pre-norm causal layers, final norm."""

    def __init__(self, d: int = WIDTH, layers: int = 3, vocab: int = 128, length: int = 77) -> None:
        super().__init__()
        self.transformer = nn.Module()
        tm = self.transformer.text_model = nn.Module()
        tm.embeddings = nn.Module()
        tm.embeddings.token_embedding = nn.Embedding(vocab, d)
        tm.embeddings.position_embedding = nn.Embedding(length, d)
        tm.encoder = nn.Module()
        tm.encoder.layers = nn.ModuleList(_Layer(d) for _ in range(layers))
        tm.final_layer_norm = nn.LayerNorm(d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tm = self.transformer.text_model
        n = ids.shape[1]
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding.weight[:n]
        causal = torch.ones(n, n, dtype=torch.bool).triu(1)
        for layer in tm.encoder.layers:
            x = layer(x, causal)
        return tm.final_layer_norm(x)


class ToyClipModel(nn.Module):
    """``cond_stage_model`` of SD1: one encoder under ``clip_l``; ``encode_token_weights`` as ComfyUI's
    (every chunk encoded in one batch, chunks concatenated along the tokens; pooled = end-token row)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.clip_name, self.clip = "l", "clip_l"
        self.clip_l = seed_module(ToyTextModel(), seed, TOKEN_STD)
        self.options: dict = {}

    def set_clip_options(self, options):
        self.options.update(options)

    def reset_clip_options(self):
        self.options = {}

    def encode_token_weights(self, token_weight_pairs):
        chunks = token_weight_pairs[self.clip_name]
        ids = torch.tensor([[t[0] for t in chunk] for chunk in chunks])
        out = self.clip_l(ids)
        cond = torch.cat(list(out), dim=0).unsqueeze(0)
        return cond, out[0:1, ids[0].tolist().index(2)]


class ToyXLClipModel(ToyClipModel):
    """SDXL's ``cond_stage_model``: ``clip_l`` and ``clip_g``; rows of both concatenated, pooled = bigG's."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.clip_g = seed_module(ToyTextModel(), seed + 1, TOKEN_STD)

    def encode_token_weights(self, token_weight_pairs):
        rows, pooled = [], None
        for name in ("l", "g"):
            ids = torch.tensor([[t[0] for t in chunk] for chunk in token_weight_pairs[name]])
            out = getattr(self, f"clip_{name}")(ids)
            rows.append(torch.cat(list(out), dim=0).unsqueeze(0))
            pooled = out[0:1, ids[0].tolist().index(2)]
        return torch.cat(rows, dim=-1), pooled


class ToyTokenizer:
    """Words → ids 3..63 by CRC32 (deterministic); 1 start, 2 end and padding; one 77-token chunk."""

    def __init__(self, names: tuple[str, ...] = ("l",)) -> None:
        self.names = names

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        ids = [1] + [3 + zlib.crc32(w.lower().encode()) % 125 for w in text.split()][:75] + [2]
        ids += [2] * (77 - len(ids))
        return {name: [[(i, 1.0) for i in ids]] for name in self.names}


class ToyCLIP:
    """Shaped like ``comfy.sd.CLIP``: ``cond_stage_model``, ``tokenizer``, ``patcher``, ``layer_idx``,
    ``clone``, ``add_patches``, ``load_model``, ``tokenize``, ``encode_from_tokens``."""

    def __init__(self, seed: int = 0, no_init: bool = False, xl: bool = False) -> None:
        if no_init:
            return
        import comfy.model_patcher

        self.cond_stage_model = ToyXLClipModel(seed) if xl else ToyClipModel(seed)
        self.tokenizer = ToyTokenizer(("g", "l") if xl else ("l",))
        self.patcher = comfy.model_patcher.ModelPatcher(self.cond_stage_model, load_device=torch.device("cpu"),
                                                        offload_device=torch.device("cpu"))
        self.layer_idx = None

    def clone(self):
        n = type(self)(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        n.layer_idx = self.layer_idx
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def load_model(self):
        import comfy.model_management

        comfy.model_management.load_model_gpu(self.patcher)
        return self.patcher

    def get_key_patches(self):
        return self.patcher.get_key_patches()

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.cond_stage_model.reset_clip_options()
        if self.layer_idx is not None:
            self.cond_stage_model.set_clip_options({"layer": self.layer_idx})
        self.load_model()
        cond, pooled = self.cond_stage_model.encode_token_weights(tokens)[:2]
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond


class ToyUNet(nn.Module):
    """ε-network: conv in, one cross-attention to the text, a timestep scale, conv out: [B, 4, h, w]."""

    def __init__(self, d: int = WIDTH, ch: int = 16, adm: int = 0) -> None:
        super().__init__()
        self.label_emb = nn.Linear(adm, ch) if adm else None
        self.conv_in = nn.Conv2d(4, ch, 3, padding=1)
        self.norm = nn.GroupNorm(4, ch)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch, bias=False), nn.Linear(d, ch, bias=False), nn.Linear(d, ch, bias=False)
        self.time = nn.Linear(1, ch)
        self.conv_out = nn.Conv2d(ch, 4, 3, padding=1)

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options={}, **kwargs):
        h = self.conv_in(x)
        if self.label_emb is not None:
            h = h + self.label_emb(y)[:, :, None, None]
        b, c, hh, ww = h.shape
        q = self.to_q(self.norm(h).flatten(2).transpose(1, 2))
        k, v = self.to_k(context), self.to_v(context)
        a = (q @ k.transpose(1, 2) / math.sqrt(c)).softmax(-1) @ v
        h = h + a.transpose(1, 2).reshape(b, c, hh, ww)
        h = h * (1 + self.time(timesteps.float()[:, None] / 1000.0)[:, :, None, None])
        return self.conv_out(torch.nn.functional.silu(h))


class _LatentFormat:
    latent_channels = 4
    scale_factor = 0.18215

    def process_in(self, latent):
        return latent * self.scale_factor


SD15 = type("SD15", (), {})
SD20 = type("SD20", (), {})
SDXL = type("SDXL", (), {})
Flux = type("Flux", (), {})
SIZE_EMBED = 8  # per size value (SDXL: 256)


class ToyBaseModel(nn.Module):
    """Shaped like ``comfy.model_base.BaseModel``: ``diffusion_model``, ``model_sampling``,
    ``latent_format``, ``process_latent_in``, ``apply_model`` (ComfyUI's ``_apply_model`` steps)."""

    def __init__(self, seed: int = 0, prediction: str = "eps", config=SD15) -> None:
        import comfy.model_sampling as ms

        super().__init__()
        xl = config is SDXL
        self.diffusion_model = seed_module(ToyUNet(2 * WIDTH if xl else WIDTH, adm=WIDTH + 6 * SIZE_EMBED if xl else 0),
                                           seed + 7)
        self.adm_channels = WIDTH + 6 * SIZE_EMBED if xl else 0
        kind = {"eps": ms.EPS, "v": ms.V_PREDICTION, "flow": ms.CONST}[prediction]
        table = ms.ModelSamplingDiscreteFlow if prediction == "flow" else ms.ModelSamplingDiscrete
        self.model_sampling = type("ModelSampling", (table, kind), {})()
        if prediction == "flow":
            self.model_sampling.sigma_data = 1.0
        self.latent_format = _LatentFormat()
        self.model_config = config()
        self.device = torch.device("cpu")

    def process_latent_in(self, latent):
        return self.latent_format.process_in(latent)

    def encode_adm(self, **kwargs):
        """SDXL's: bigG's pooled output, then a sinusoidal embedding of each of the six sizes."""
        pooled = kwargs["pooled_output"]
        sizes = [kwargs.get(k, 0) for k in ("height", "width", "crop_h", "crop_w", "target_height", "target_width")]
        freqs = torch.exp(-math.log(10000) * torch.arange(SIZE_EMBED // 2) / (SIZE_EMBED // 2))
        emb = torch.cat([torch.cat([torch.cos(v * freqs), torch.sin(v * freqs)]) for v in sizes])
        return torch.cat((pooled, emb.unsqueeze(0).repeat(pooled.shape[0], 1).to(pooled.device)), dim=1)

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        timestep = self.model_sampling.timestep(t).float()
        out = self.diffusion_model(xc, timestep, context=c_crossattn, y=kwargs.get("y")).float()
        return self.model_sampling.calculate_denoised(sigma, out, x)


class ToyVAE:
    """``VAE.encode(pixels [B, H, W, 3] in [0, 1]) → [B, channels, H/8, W/8]``: 8×8 mean pool and a fixed mix."""

    def __init__(self, seed: int = 0, channels: int = 4) -> None:
        self.mix = torch.randn(channels, 3, generator=torch.Generator().manual_seed(seed + 11))

    def encode(self, pixel_samples):
        x = torch.nn.functional.avg_pool2d(pixel_samples.movedim(-1, 1)[:, :3] * 2 - 1, 8)
        return torch.einsum("oc,bchw->bohw", self.mix, x) * 5.0


# --------------------------------------------------------------------------- real tier: ComfyUI's classes

TINY_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32,
             "num_res_blocks": [1, 1], "transformer_depth": [1, 1, 1, 1], "channel_mult": [1, 2],
             "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": WIDTH,
             "num_heads": 4, "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False,
             "use_temporal_resblock": False}
TINY_CLIP = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
             "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": WIDTH, "initializer_factor": 1.0,
             "initializer_range": 0.02, "intermediate_size": 4 * WIDTH, "layer_norm_eps": 1e-05,
             "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 4,
             "num_hidden_layers": 3, "pad_token_id": 1, "projection_dim": WIDTH, "torch_dtype": "float32",
             "vocab_size": 49408}


def real_clip(seed: int = 0, width: int = WIDTH):
    """ComfyUI's SD1 ``CLIP`` (CLIP-L classes and tokenizer) with a small seeded text model (3 layers, ``width``)."""
    import functools

    import comfy.sd
    import comfy.sd1_clip

    class TinyClipL(comfy.sd1_clip.SDClipModel):  # SD1CheckpointClipModel with a small config
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, return_projected_pooled=False, dtype=dtype, model_options=model_options,
                             textmodel_json_config=dict(TINY_CLIP, hidden_size=width, intermediate_size=4 * width,
                                                        projection_dim=width))

    class Target:
        clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=TinyClipL)
        tokenizer = comfy.sd1_clip.SD1Tokenizer
        params: dict = {}

    clip = comfy.sd.CLIP(target=Target(), parameters=2_000_000)
    seed_module(clip.cond_stage_model, seed)
    return clip


def real_clip_h(seed: int = 0):
    """ComfyUI's SD2 ``CLIP`` (CLIP-H classes: penultimate layer, pad 0, SD2 tokenizer) with a small text model."""
    import functools

    import comfy.sd
    import comfy.sd1_clip
    from comfy.text_encoders import sd2_clip

    class TinyClipH(comfy.sd1_clip.SDClipModel):  # SD2ClipHModel with a small config
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, layer="hidden", layer_idx=-2, dtype=dtype, model_options=model_options,
                             textmodel_json_config=dict(TINY_CLIP, hidden_act="gelu"),
                             special_tokens={"start": 49406, "end": 49407, "pad": 0}, return_projected_pooled=True)

    class Target:
        clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_name="h", clip_model=TinyClipH)  # = SD2ClipModel
        tokenizer = sd2_clip.SD2Tokenizer
        params: dict = {}

    clip = comfy.sd.CLIP(target=Target(), parameters=2_000_000)
    seed_module(clip.cond_stage_model, seed)
    return clip


def real_sdxl_clip(seed: int = 0):
    """ComfyUI's SDXL ``CLIP`` (its CLIP-L and bigG settings: hidden layer −2, no final norm, bigG's
    projected pooled output; ComfyUI's SDXL tokenizer) with two small seeded text models."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip

    class TinySDXLClip(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     layer_norm_hidden_state=False, model_options=model_options,
                                                     textmodel_json_config=dict(TINY_CLIP))
            self.clip_g = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     textmodel_json_config=dict(TINY_CLIP, hidden_act="gelu"),
                                                     special_tokens={"start": 49406, "end": 49407, "pad": 0},
                                                     layer_norm_hidden_state=False, return_projected_pooled=True,
                                                     model_options={**model_options, "model_name": "clip_g"})
            self.dtypes = {dtype}

    class Target:
        clip = TinySDXLClip
        tokenizer = comfy.sdxl_clip.SDXLTokenizer
        params: dict = {}

    clip = comfy.sd.CLIP(target=Target(), parameters=4_000_000)
    seed_module(clip.cond_stage_model, seed)
    return clip


def real_model(seed: int = 0, prediction: str = "eps", family: str = "SD15"):
    """ComfyUI's ``BaseModel`` of ``supported_models.SD15`` (small UNet, context width 32) in a ModelPatcher."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    unet = dict(TINY_UNET, model_channels=64) if family in ("SD20", "SDXL") else dict(TINY_UNET)  # 64 a head
    if family == "SDXL":  # CLIP-L + bigG rows; y = bigG pooled (32) + six 256-wide size embeddings
        unet.update(context_dim=2 * WIDTH, adm_in_channels=WIDTH + 6 * 256, num_classes="sequential",
                    use_linear_in_transformer=True)
    config = getattr(comfy.supported_models, family)(unet)
    kind = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION,
            "flow": comfy.model_base.ModelType.FLOW}[prediction]
    cls = comfy.model_base.SDXL if family == "SDXL" else comfy.model_base.BaseModel
    base = cls(config, kind, device=torch.device("cpu"))
    seed_module(base.diffusion_model, seed + 7)
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=torch.device("cpu"))


def make(seed: int = 0, prediction: str = "eps", config=SD15):
    """(clip, model, vae) for the tier in use."""
    import comfy.model_patcher

    if REAL:
        if config is SDXL:
            return real_sdxl_clip(seed), real_model(seed, prediction, "SDXL"), ToyVAE(seed)
        return real_clip(seed), real_model(seed, prediction), ToyVAE(seed)
    base = ToyBaseModel(seed, prediction, config)
    model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    return ToyCLIP(seed, xl=config is SDXL), model, ToyVAE(seed)


def images(n: int = 4, size: int = 64, seed: int = 3) -> torch.Tensor:
    """``n`` ComfyUI IMAGEs ``[n, size, size, 3]`` in [0, 1]: a bright blob (the "concept") on noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    blob = torch.exp(-((xx - 0.2) ** 2 + yy ** 2) * 6)[None, :, :, None]
    return (0.6 * blob * torch.tensor([1.0, 0.4, 0.1]) + 0.2 * torch.rand(n, size, size, 3, generator=g)).clamp(0, 1)


# --------------------------------------------------------------------------- a tiny model that reads its text

CLASS_WORDS = ("zorblat", "quintaveer", "velthorn")  # one made-up name per synthetic image class


def class_images(k: int, n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``n`` IMAGEs ``[n, size, size, 3]`` of synthetic class ``k``: 0 a warm blob on the left, 1 blue
    horizontal stripes, 2 a green checkerboard; each image shifted at random and with a little noise."""
    g = torch.Generator().manual_seed(1000 * k + seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        dx, dy = (0.3 * (torch.rand(2, generator=g) - 0.5)).tolist()
        if k == 0:
            pattern = torch.exp(-((xx + 0.4 - dx) ** 2 + (yy - dy) ** 2) * 4)[..., None] * torch.tensor([1.0, 0.5, 0.1])
        elif k == 1:
            pattern = (torch.sin((yy - dy) * 3 * math.pi) > 0).float()[..., None] * torch.tensor([0.1, 0.3, 1.0])
        else:
            checker = ((torch.sin((xx - dx) * 2 * math.pi) > 0) ^ (torch.sin((yy - dy) * 2 * math.pi) > 0)).float()
            pattern = checker[..., None] * torch.tensor([0.1, 0.9, 0.2])
        out.append(0.8 * pattern + 0.1 + 0.1 * torch.rand(size, size, 3, generator=g))
    return torch.stack(out).clamp(0, 1)


def encode_batch(clip, texts: list[str]) -> torch.Tensor:
    """``[len(texts), L, d]`` float32: each text's conditioning (one chunk each), in one call of the encoder
    (``encode_token_weights`` encodes a prompt's chunks as one batch; here each chunk is one text).
    Differentiable with respect to the encoder's weights when gradients are on."""
    tokens = [clip.tokenize(t) for t in texts]
    batch = {name: [chunk for tk in tokens for chunk in tk[name]] for name in tokens[0]}
    cond = clip.cond_stage_model.encode_token_weights(batch)[0]
    return cond.float().reshape(len(texts), -1, cond.shape[-1])


def caption_conditioning(clip, texts: list[str]) -> torch.Tensor:
    """``[len(texts), L, d]`` float32: the CLIP's conditioning of each text (no gradients)."""
    with torch.no_grad():
        return torch.cat([clip.encode_from_tokens(clip.tokenize(t)).float() for t in texts])


def make_text_sensitive(clip, model, vae, classes: int = 2, steps: int = 150, lr: float = 3e-3, seed: int = 0,
                        size: int = 64, per_class: int = 8, templates: int = 8, clip_lr: float = 0.0,
                        t_min: float = 0.0) -> None:
    """Pre-train ``model``'s diffusion model (in place; nothing else) to read its text: images of each of
    ``classes`` synthetic classes paired with captions naming the class's own word (the first
    ``templates`` object templates), the model's ordinary denoising loss at timesteps drawn uniformly from
    the top ``1 - t_min`` of the schedule, Adam. SD1-style models only."""
    from rece_core.fewshot import OBJECT_TEMPLATES
    from rece_core.train import denoising_mse, noise_latents, saved_copies

    kind = {"EPS": "eps", "V_PREDICTION": "v", "CONST": "flow"}
    ms = model.get_model_object("model_sampling")
    param = next((v for k, v in kind.items() if any(c.__name__ == k for c in type(ms).__mro__)), "eps")
    base = model.model
    with torch.no_grad():
        x0 = torch.cat([base.process_latent_in(vae.encode(class_images(k, per_class, size, seed))).float()
                        for k in range(classes)])
    labels = torch.arange(classes).repeat_interleave(per_class)
    conds = caption_conditioning(clip, [t.format(CLASS_WORDS[k]) for k in range(classes)
                                        for t in OBJECT_TEMPLATES[:templates]]).unflatten(0, (classes, templates))
    g = torch.Generator().manual_seed(seed)
    net = base.diffusion_model
    params = [p for p in net.parameters() if p.dtype.is_floating_point]
    te = [p for p in clip.cond_stage_model.parameters() if p.dtype.is_floating_point] if clip_lr else []
    flags = [p.requires_grad for p in params + te]
    for p in params + te:
        p.requires_grad_(True)
    # eps 1e-4 for the encoder: ComfyUI keeps it in float16 on the CPU, where Adam's 1e-8 is 0 (0/0 = NaN)
    opt = torch.optim.Adam([{"params": params, "lr": lr}] + ([{"params": te, "lr": clip_lr, "eps": 1e-4}] if te else []))
    texts = [[t.format(CLASS_WORDS[k]) for t in OBJECT_TEMPLATES[:templates]] for k in range(classes)]
    sigmas = ms.sigmas.float()
    with torch.enable_grad():
        for _ in range(steps):
            t = torch.randint(0, templates, (x0.shape[0],), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            sigma = sigmas[torch.randint(int(t_min * sigmas.shape[0]), sigmas.shape[0], (x0.shape[0],), generator=g)]
            x = noise_latents(param, x0, noise, sigma)
            if te:  # the text encoder trained too: encode with gradients
                with saved_copies():  # ComfyUI's CLIP layers add in place
                    context = encode_batch(clip, [c for row in texts for c in row]).unflatten(0, (classes, templates))
                context = context[labels, t]
            else:
                context = conds[labels, t]
            d = base.apply_model(x, sigma, c_crossattn=context)
            loss = denoising_mse(param, d, x, x0, noise, sigma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p, flag in zip(params + te, flags):
        p.grad = None
        p.requires_grad_(flag)


def caption_loss(clip, model, vae, imgs: torch.Tensor, text: str, draws: int = 8, seed: int = 123,
                 t_min: float = 0.0) -> float:
    """Mean denoising MSE of ``imgs`` under ``text`` (SD1-style model), over ``draws`` fixed draws of noise
    and timestep (from the top ``1 - t_min`` of the schedule; the same for every call with the same seed):
    lower = the caption helps more."""
    from rece_core.train import denoising_mse, noise_latents

    ms = model.get_model_object("model_sampling")
    param = "v" if any(c.__name__ == "V_PREDICTION" for c in type(ms).__mro__) else \
        "flow" if any(c.__name__ == "CONST" for c in type(ms).__mro__) else "eps"
    base = model.model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x0 = base.process_latent_in(vae.encode(imgs)).float()
        context = caption_conditioning(clip, [text]).expand(x0.shape[0], -1, -1)
        total = 0.0
        for _ in range(draws):
            noise = torch.randn(x0.shape, generator=g)
            n = ms.sigmas.shape[0]
            sigma = ms.sigmas.float()[torch.randint(int(t_min * n), n, (x0.shape[0],), generator=g)]
            x = noise_latents(param, x0, noise, sigma)
            total += float(denoising_mse(param, base.apply_model(x, sigma, c_crossattn=context), x, x0, noise, sigma))
    return total / draws
