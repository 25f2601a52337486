"""Seeded MODEL, CLIP and VAE for the task-vector node tests (CI tier), shaped like ComfyUI's:

- MODEL: a ``ModelPatcher`` around a ``BaseModel``-like module: ``apply_model(x, σ, c_crossattn=...)``
  through ``model_sampling`` (ε prediction, as ComfyUI's ``ModelSamplingDiscrete`` + ``EPS``: 1000 σ of the
  SD1 schedule), ``process_latent_in``, and a ``diffusion_model`` whose keys carry ComfyUI's names
  (``input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``...);
- CLIP: like ``comfy.sd.CLIP`` over an ``SD1ClipModel``-like ``cond_stage_model`` (``clip = "clip_l"``,
  ``encode_token_weights`` that takes embedding tensors among the tokens, residuals added in place as
  ComfyUI's CLIP does, ``transformer.get_input_embeddings()``); tokenizer ``clip_l.embedding_key``;
- VAE: ``encode(pixels [B, H, W, 3]) → [B, 4, H/8, W/8]``.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

import comfy.model_patcher

D, HIDDEN, VOCAB, TOKENS = 32, 32, 512, 77


def _seed(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


class EPS:
    def calculate_input(self, sigma, noise):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma ** 2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return noise * sigma + latent_image


class ModelSamplingDiscrete(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        alphas = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas) / alphas) ** 0.5
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    def timestep(self, sigma):
        dists = sigma.log().to(self.log_sigmas.device).view(-1, 1) - self.log_sigmas.view(1, -1)
        return dists.abs().argmin(dim=1).view(sigma.shape).to(sigma.device)


class ModelSampling(ModelSamplingDiscrete, EPS):
    pass


class Attention(nn.Module):
    def __init__(self, q_dim: int, context_dim: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(q_dim, q_dim, bias=False)
        self.to_k = nn.Linear(context_dim, q_dim, bias=False)
        self.to_v = nn.Linear(context_dim, q_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(q_dim, q_dim)])

    def forward(self, x, context):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out[0](torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1) @ v)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn2 = Attention(HIDDEN, D)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(2 * HIDDEN, HIDDEN)])
        self.ff.net[0].proj = nn.Linear(HIDDEN, 2 * HIDDEN)

    def forward(self, h, context):
        h = h + self.attn2(h, context)
        return h + self.ff.net[2](torch.nn.functional.gelu(self.ff.net[0].proj(h)))


class ToyUNet(nn.Module):
    """Per-pixel conv in, two transformer blocks reading the text, conv out (ComfyUI key names)."""

    def __init__(self) -> None:
        super().__init__()
        self.time_embed = nn.ModuleList([nn.Linear(1, HIDDEN)])
        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(4, HIDDEN, 1)]),
                                           nn.ModuleList([nn.Identity(), nn.Module()])])
        self.input_blocks[1][1].transformer_blocks = nn.ModuleList([Block()])
        self.middle_block = nn.ModuleList([nn.Identity(), nn.Module()])
        self.middle_block[1].transformer_blocks = nn.ModuleList([Block()])
        self.out = nn.ModuleList([nn.Conv2d(HIDDEN, 4, 1)])

    def forward(self, x, timesteps, context=None, **kwargs):
        b, _, hh, ww = x.shape
        h = self.input_blocks[0][0](x).flatten(2).transpose(1, 2)
        h = h + self.time_embed[0](timesteps.float().view(b, 1, 1) / 1000.0)
        for blocks in (self.input_blocks[1][1].transformer_blocks, self.middle_block[1].transformer_blocks):
            h = blocks[0](h, context)
        return self.out[0](h.transpose(1, 2).reshape(b, HIDDEN, hh, ww))


class SD15:
    """Named like ComfyUI's ``supported_models.SD15`` (what ``model_type`` reports)."""


class LatentFormat:
    latent_channels = 4
    scale_factor = 0.18215


class ToyBaseModel(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.diffusion_model = ToyUNet()
        _seed(self.diffusion_model, seed)
        self.model_sampling = ModelSampling()
        self.model_config = SD15()
        self.latent_format = LatentFormat()
        self.device = torch.device("cpu")

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        xc = self.model_sampling.calculate_input(t, x)
        out = self.diffusion_model(xc, self.model_sampling.timestep(t).float(), context=c_crossattn).float()
        return self.model_sampling.calculate_denoised(t, out, x)

    def process_latent_in(self, latent):
        return latent * self.latent_format.scale_factor


def make_model(seed: int = 0):
    model = ToyBaseModel(seed)
    model.requires_grad_(True)  # as a loaded ComfyUI model: Parameters that require grad
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


class Embedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(VOCAB + 2, D))

    def forward(self, ids, out_dtype=None):
        return self.weight[ids].to(out_dtype or self.weight.dtype)


class TextTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = Embedding()
        self.position = nn.Parameter(torch.empty(TOKENS, D))
        self.fc1 = nn.Linear(D, D)
        self.fc2 = nn.Linear(D, D)
        self.final_layer_norm = nn.LayerNorm(D)

    def get_input_embeddings(self):
        return self.embeddings

    def forward(self, x):
        x = x + self.position
        x = torch.cumsum(x, 1) / torch.arange(1, TOKENS + 1, device=x.device).view(1, -1, 1)
        x += self.fc2(torch.tanh(self.fc1(torch.nn.functional.layer_norm(x, (D,)))))  # in place, as ComfyUI's
        return self.final_layer_norm(x)


class SDClipModel(nn.Module):
    special_tokens = {"start": VOCAB, "end": VOCAB + 1, "pad": VOCAB + 1}

    def __init__(self) -> None:
        super().__init__()
        self.transformer = TextTransformer()

    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):
        pass

    def encode_token_weights(self, token_weight_pairs):
        rows = []
        for chunk in token_weight_pairs:
            ids = [t[0] if isinstance(t[0], int) else 0 for t in chunk]
            emb = self.transformer.get_input_embeddings()(torch.tensor([ids]), out_dtype=torch.float32)
            for i, t in enumerate(chunk):
                if not isinstance(t[0], int):
                    emb[0, i] = t[0].reshape(-1).to(emb)
            rows.append(self.transformer(emb))
        out = torch.cat(rows, dim=-2)
        return out, out[:, -1]


class SD1ClipModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.clip_name = "l"
        self.clip = "clip_l"
        self.clip_l = SDClipModel()

    def reset_clip_options(self):
        self.clip_l.reset_clip_options()

    def set_clip_options(self, options):
        self.clip_l.set_clip_options(options)

    def encode_token_weights(self, token_weight_pairs):
        return self.clip_l.encode_token_weights(token_weight_pairs["l"])


class SDTokenizer:
    embedding_key = "clip_l"

    def tokenize_with_weights(self, text: str):
        ids = [VOCAB]
        for word in text.lower().split():
            ids.append(int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little") % VOCAB)
        ids = ids[:TOKENS - 1] + [VOCAB + 1]
        ids += [VOCAB + 1] * (TOKENS - len(ids))
        return [[(i, 1.0) for i in ids]]


class SD1Tokenizer:
    def __init__(self) -> None:
        self.clip_name = "l"
        self.clip = "clip_l"
        self.clip_l = SDTokenizer()

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        return {"l": self.clip_l.tokenize_with_weights(text)}


class CLIP:
    def __init__(self, seed: int = 0) -> None:
        self.cond_stage_model = SD1ClipModel()
        _seed(self.cond_stage_model, seed + 1)
        with torch.no_grad():
            table = self.cond_stage_model.clip_l.transformer.embeddings.weight
            table.mul_(math.sqrt(table.shape[1]))  # token embeddings of unit scale per entry
        self.cond_stage_model.requires_grad_(True)
        self.tokenizer = SD1Tokenizer()
        self.layer_idx = None
        cpu = torch.device("cpu")  # comfy.sd.CLIP's patcher over its cond_stage_model
        self.patcher = comfy.model_patcher.ModelPatcher(self.cond_stage_model, load_device=cpu, offload_device=cpu)

    def tokenize(self, text: str, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def load_model(self):
        import comfy.model_management

        comfy.model_management.load_model_gpu(self.patcher)
        return self.patcher

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.cond_stage_model.reset_clip_options()
        cond, pooled = self.cond_stage_model.encode_token_weights(tokens)
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond


class VAE:
    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed + 2)
        self.proj = torch.randn(4, 3, generator=g)

    def encode(self, pixel_samples):
        x = torch.nn.functional.avg_pool2d(pixel_samples.movedim(-1, 1), 8)
        return torch.einsum("cd,bdhw->bchw", self.proj, 2 * x - 1) * 5.0


def concept_images(n: int = 4, seed: int = 5, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    image = (0.5 + 0.3 * torch.randn(1, size, size, 3, generator=g)).repeat(n, 1, 1, 1)
    return (image + 0.02 * torch.randn(n, size, size, 3, generator=g)).clamp(0, 1)
