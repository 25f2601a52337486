"""Seeded Flux-family CLIP, MODEL and VAE for the few-shot unlearning tests, on whichever tier is on the path.

Real tier: ComfyUI's own ``FluxClipModel`` (its CLIP-L ``SDClipModel`` and its ``T5`` classes, small configs)
with ComfyUI's ``FluxTokenizer`` (T5 padded to 16 rows through its ``t5xxl_min_length`` knob), and ComfyUI's
``Flux`` model (``supported_models.Flux``, tiny config of ``tests/dit_factory.py``), seeded.
CI tier: small modules of our own with the same text path and key names: ``clip_l`` a CLIP text model
(``fewshot_factory.ToyTextModel``), ``t5xxl`` a T5 encoder stack (``transformer.encoder.block.N.layer.0.
SelfAttention.{q,k,v,o}``, ``layer.1.DenseReluDense.{wi_0,wi_1,wo}``), ``encode_token_weights`` returning T5's rows
and CLIP-L's pooled vector as ``FluxClipModel`` does; a ``BaseModel``-shaped Flux whose ``encode_adm`` returns the
pooled vector (ComfyUI's ``Flux.encode_adm``) and whose network reads the T5 rows (``txt_in``), the pooled vector
(``vector_in``) and the distilled guidance (``guidance_in``).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from fewshot_factory import REAL, TINY_CLIP, ToyCLIP, ToyClipModel, ToyTextModel, ToyVAE, seed_module

T5_WIDTH = 256  # dit_factory's Flux: context_in_dim
CLIP_WIDTH = 48  # dit_factory's Flux: vec_in_dim
T5_ROWS = 16
TINY_T5 = {"d_ff": 128, "d_kv": 32, "d_model": T5_WIDTH, "num_heads": 4, "num_layers": 2, "dense_act_fn": "gelu_pytorch_tanh",
           "is_gated_act": True, "layer_norm_epsilon": 1e-6, "model_type": "t5", "relative_attention_num_buckets": 32,
           "vocab_size": 32128, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
           "is_encoder_decoder": True, "tie_word_embeddings": False}


# --------------------------------------------------------------------------- CI tier

class _T5Attention(nn.Module):
    def __init__(self, d: int, inner: int, heads: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, d, bias=False)
        self.heads = heads

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = (q @ k.transpose(-1, -2)).softmax(-1) @ v  # T5: no 1/√d scaling
        return self.o(a.transpose(1, 2).reshape(b, t, -1))


class _T5Norm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class _T5Layer0(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.layer_norm, self.SelfAttention = _T5Norm(d), _T5Attention(d, 2 * d, 2)

    def forward(self, x):
        return x + self.SelfAttention(self.layer_norm(x))


class _GatedFF(nn.Module):
    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.wi_0, self.wi_1, self.wo = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False), nn.Linear(ff, d, bias=False)

    def forward(self, x):
        return self.wo(torch.nn.functional.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class _T5Layer1(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.layer_norm, self.DenseReluDense = _T5Norm(d), _GatedFF(d, 2 * d)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class _T5Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_T5Layer0(d), _T5Layer1(d)])

    def forward(self, x):
        return self.layer[1](self.layer[0](x))


class ToyT5(nn.Module):
    """``t5xxl``: ``transformer.shared`` embedding, ``transformer.encoder.block.N``, final RMS norm (ComfyUI's T5)."""

    def __init__(self, d: int = 32, layers: int = 2, vocab: int = 128) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.shared = nn.Embedding(vocab, d)
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.block = nn.ModuleList(_T5Block(d) for _ in range(layers))
        self.transformer.encoder.final_layer_norm = _T5Norm(d)

    def forward(self, ids):
        x = self.transformer.shared(ids)
        for block in self.transformer.encoder.block:
            x = block(x)
        return self.transformer.encoder.final_layer_norm(x)


class ToyFluxClipModel(ToyClipModel):
    """``FluxClipModel``: ``clip_l`` and ``t5xxl``; ``encode_token_weights`` → (T5's rows, CLIP-L's pooled)
    (clip options as ``fewshot_factory.ToyClipModel``)."""

    def __init__(self, seed: int = 0) -> None:
        nn.Module.__init__(self)
        self.clip_l = seed_module(ToyTextModel(d=CLIP_WIDTH // 2), seed, 1.0)
        self.t5xxl = seed_module(ToyT5(d=32), seed + 1, 1.0)
        self.options: dict = {}

    def encode_token_weights(self, token_weight_pairs):
        t5 = torch.tensor([[t[0] for t in chunk] for chunk in token_weight_pairs["t5xxl"]])
        rows = torch.cat(list(self.t5xxl(t5)), dim=0).unsqueeze(0)
        ids = torch.tensor([[t[0] for t in chunk] for chunk in token_weight_pairs["l"]])
        out = self.clip_l(ids)
        return rows, out[0:1, ids[0].tolist().index(2)]


SD3_PAD = 64  # the stand-in SD3's row width (ComfyUI pads CLIP-L+G's rows to T5-XXL's 4096)


class ToySD3ClipModel(ToyFluxClipModel):
    """``SD3ClipModel``: ``clip_l``, ``clip_g``, ``t5xxl``; rows = CLIP-L+G side by side, zero-padded to the T5
    width, then T5's rows; pooled = CLIP-L's and G's pooled vectors side by side."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.clip_g = seed_module(ToyTextModel(d=CLIP_WIDTH // 2), seed + 2, 1.0)
        self.t5xxl = seed_module(ToyT5(d=SD3_PAD), seed + 1, 1.0)

    def encode_token_weights(self, token_weight_pairs):
        pooled, rows = [], []
        for name in ("l", "g"):
            ids = torch.tensor([[t[0] for t in chunk] for chunk in token_weight_pairs[name]])
            out = getattr(self, f"clip_{name}")(ids)
            rows.append(out[0])
            pooled.append(out[0:1, ids[0].tolist().index(2)])
        lg = torch.nn.functional.pad(torch.cat(rows, dim=-1), (0, SD3_PAD - 2 * rows[0].shape[-1]))
        t5 = self.t5xxl(torch.tensor([[t[0] for t in chunk] for chunk in token_weight_pairs["t5xxl"]]))[0]
        return torch.cat([lg, t5]).unsqueeze(0), torch.cat(pooled, dim=-1)


class ToyFluxTokenizer:
    """CLIP-L: 77 tokens (1 start, 2 end/pad); T5: words then 1 (end), padded with 0 to ``T5_ROWS``."""

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        words = [3 + zlib.crc32(w.lower().encode()) % 125 for w in text.split()]
        ids = [1] + words[:75] + [2]
        ids += [2] * (77 - len(ids))
        t5 = words + [1]
        t5 += [0] * max(0, T5_ROWS - len(t5))
        out = {"l": [[(i, 1.0) for i in ids]], "t5xxl": [[(i, 1.0) for i in t5]]}
        if self.sd3:
            out["g"] = out["l"]
        return out

    def __init__(self, sd3: bool = False) -> None:
        self.sd3 = sd3


class ToyFluxNet(nn.Module):
    """Flux-shaped network: image in, txt_in over the T5 rows, vector_in over the pooled vector, guidance_in,
    one joint attention, image out: ``[B, 16, h, w]``."""

    def __init__(self, ch: int = 32, context: int = 32, pooled: int = CLIP_WIDTH // 2, guidance: bool = True) -> None:
        super().__init__()
        self.img_in = nn.Conv2d(16, ch, 1)
        self.txt_in = nn.Linear(context, ch)
        self.vector_in = nn.Linear(pooled, ch)
        self.guidance_in = nn.Linear(1, ch) if guidance else None
        self.time_in = nn.Linear(1, ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.final = nn.Conv2d(ch, 16, 1)

    def forward(self, x, timesteps, context=None, y=None, guidance=None, control=None, transformer_options={},
                **kwargs):
        b, _, h, w = x.shape
        img = self.img_in(x).flatten(2).transpose(1, 2)
        txt = self.txt_in(context)
        vec = self.vector_in(y) + self.time_in(timesteps.float()[:, None] / 1000)
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(guidance.float()[:, None] / 10)
        seq = torch.cat([txt, img], dim=1) * (1 + torch.tanh(vec))[:, None]
        q, k, v = self.qkv(seq).chunk(3, dim=-1)
        seq = seq + (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1) @ v
        out = seq[:, txt.shape[1]:].transpose(1, 2).reshape(b, -1, h, w)
        return self.final(torch.nn.functional.silu(out))


class _FluxLatent:
    latent_channels = 16

    def process_in(self, latent):
        return (latent - 0.1159) * 0.3611  # Flux's shift and scale


class ToyFluxModel(nn.Module):
    """``comfy.model_base.Flux``-shaped: flow (CONST) sampling with Flux's shifted sigmas, ``encode_adm`` = the
    pooled vector, ``apply_model(x, σ, c_crossattn, y, guidance)``."""

    def __init__(self, seed: int = 0, family: str = "Flux") -> None:
        import comfy.model_sampling as ms

        super().__init__()
        net = ToyFluxNet() if family == "Flux" else ToyFluxNet(context=SD3_PAD, pooled=CLIP_WIDTH, guidance=False)
        self.diffusion_model = seed_module(net, seed + 7)
        self.model_sampling = type("ModelSampling", (ms.ModelSamplingDiscreteFlow, ms.CONST), {})()
        self.latent_format = _FluxLatent()
        self.model_config = type(family, (), {"unet_config": {}})()
        self.adm_channels = 0
        self.device = torch.device("cpu")

    def process_latent_in(self, latent):
        return self.latent_format.process_in(latent)

    def encode_adm(self, **kwargs):
        return kwargs["pooled_output"]

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        xc = self.model_sampling.calculate_input(t, x)
        timestep = self.model_sampling.timestep(t).float()
        out = self.diffusion_model(xc, timestep, context=c_crossattn, y=kwargs.get("y"),
                                   guidance=kwargs.get("guidance")).float()
        return self.model_sampling.calculate_denoised(t, out, x)


def ToyVAE16(seed: int = 0) -> ToyVAE:
    """``fewshot_factory.ToyVAE`` for a 16-channel latent space (Flux, SD3)."""
    return ToyVAE(seed, channels=16)


# --------------------------------------------------------------------------- real tier

def _t5(config: dict, device, dtype, model_options: dict):
    """ComfyUI's ``T5XXLModel`` (comfy/text_encoders/sd3_clip.py) with a small config."""
    import comfy.sd1_clip
    import comfy.text_encoders.t5

    return comfy.sd1_clip.SDClipModel(device=device, layer="last", textmodel_json_config=dict(config), dtype=dtype,
                                      special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                                      enable_attention_masks=False, return_attention_masks=False,
                                      model_options={**model_options, "model_name": "t5xxl"})


def _seeded_clip(model_class, tokenizer_class, parameters: int, seed: int):
    """``comfy.sd.CLIP`` of ``model_class`` and ``tokenizer_class`` (T5 padded to ``T5_ROWS``), seeded."""
    import comfy.sd

    class Target:
        clip = model_class
        tokenizer = tokenizer_class
        params: dict = {}

    clip = comfy.sd.CLIP(target=Target(), tokenizer_data={"t5xxl_min_length": T5_ROWS}, parameters=parameters)
    seed_module(clip.cond_stage_model, seed)
    return clip


def real_flux_clip(seed: int = 0):
    """ComfyUI's ``CLIP`` of ``FluxClipModel`` (CLIP-L 48 wide, T5 256 wide, 2 layers) and ``FluxTokenizer``."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.text_encoders.flux
    import comfy.text_encoders.t5

    class TinyFluxClip(comfy.text_encoders.flux.FluxClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(
                device=device, dtype=dtype, return_projected_pooled=False, model_options=model_options,
                textmodel_json_config=dict(TINY_CLIP, hidden_size=CLIP_WIDTH, intermediate_size=4 * CLIP_WIDTH,
                                           projection_dim=CLIP_WIDTH))
            self.t5xxl = _t5(TINY_T5, device, dtype, model_options)
            self.dtypes = {dtype}

    return _seeded_clip(TinyFluxClip, comfy.text_encoders.flux.FluxTokenizer, 12_000_000, seed)


def real_flux_model(seed: int = 0):
    """ComfyUI's ``Flux`` (``supported_models.Flux``, dit_factory's tiny config) in a ModelPatcher."""
    from dit_factory import FAMILIES, _real_model

    return _real_model(FAMILIES["flux"], seed)


def make_flux(seed: int = 0, family: str = "Flux"):
    """(clip, model, vae) of the Flux family (or ``family="SD3"``) for the tier in use."""
    import comfy.model_patcher

    if REAL:
        if family == "SD3":
            return real_sd3_clip(seed), real_sd3_model(seed), ToyVAE16(seed)
        return real_flux_clip(seed), real_flux_model(seed), ToyVAE16(seed)
    clip = ToyFluxCLIP(seed, family=family)
    model = comfy.model_patcher.ModelPatcher(ToyFluxModel(seed, family), load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    return clip, model, ToyVAE16(seed)


SD3_T5 = dict(TINY_T5, d_model=4096, d_kv=16, num_heads=2, d_ff=32, num_layers=2)
"""ComfyUI's SD3 encoder pads CLIP-L+G's rows to 4096 (T5-XXL's width) in its own code: the tiny T5 is 4096 wide."""


def real_sd3_clip(seed: int = 0):
    """ComfyUI's ``CLIP`` of ``SD3ClipModel`` (CLIP-L and G 24 wide each, T5 4096 wide, 2 layers) and
    ``SD3Tokenizer`` (T5 padded to 16 rows)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.text_encoders.sd3_clip
    import comfy.text_encoders.t5

    half = CLIP_WIDTH // 2

    class TinySD3Clip(comfy.text_encoders.sd3_clip.SD3ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            nn.Module.__init__(self)
            tiny = dict(TINY_CLIP, hidden_size=half, intermediate_size=4 * half, projection_dim=half, num_attention_heads=2)
            # as SD3ClipModel's CLIP-L (hidden layer -2, no final norm) and SDXLClipG (projected pooled output)
            self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     layer_norm_hidden_state=False, return_projected_pooled=False,
                                                     model_options=model_options, textmodel_json_config=tiny)
            self.clip_g = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     textmodel_json_config=dict(tiny, hidden_act="gelu"),
                                                     special_tokens={"start": 49406, "end": 49407, "pad": 0},
                                                     layer_norm_hidden_state=False, return_projected_pooled=True,
                                                     model_options={**model_options, "model_name": "clip_g"})
            self.t5_attention_mask = False
            self.t5xxl = _t5(SD3_T5, device, dtype, model_options)
            self.dtypes = {dtype}

    return _seeded_clip(TinySD3Clip, comfy.text_encoders.sd3_clip.SD3Tokenizer, 140_000_000, seed)


def real_sd3_model(seed: int = 0):
    """ComfyUI's ``SD3`` (dit_factory's tiny config, its context embedder 4096 wide, pooled CLIP-L+G 48 wide)."""
    from dit_factory import FAMILIES, Family, _real_model

    fam = FAMILIES["sd3"]
    config = dict(fam.unet_config, adm_in_channels=CLIP_WIDTH, context_embedder_config={
        "target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 64}})
    return _real_model(Family("sd3", "SD3", config, fam.latent, {}), seed)


class ToyFluxCLIP(ToyCLIP):
    """``comfy.sd.CLIP``-shaped around ``ToyFluxClipModel`` / ``ToySD3ClipModel`` (``fewshot_factory.ToyCLIP``'s
    patcher, clone, tokenize and encode)."""

    def __init__(self, seed: int = 0, no_init: bool = False, family: str = "Flux") -> None:
        if no_init:
            return
        import comfy.model_patcher

        self.cond_stage_model = ToyFluxClipModel(seed) if family == "Flux" else ToySD3ClipModel(seed)
        self.tokenizer = ToyFluxTokenizer(sd3=family == "SD3")
        self.patcher = comfy.model_patcher.ModelPatcher(self.cond_stage_model, load_device=torch.device("cpu"),
                                                        offload_device=torch.device("cpu"))
        self.layer_idx = None
