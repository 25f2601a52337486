"""Small seeded DiT-family models and text encoders for both tiers (Flux, Chroma, SD3, Wan, Qwen-Image, Lumina2).

- CLIP: duck-typed like ``comfy.sd.CLIP`` (``tokenize``, ``encode_from_tokens``, ``tokenizer.<name>``) over a
  seeded bidirectional encoder. Tokenizers: ComfyUI's own in the real tier where its files are on disk
  (Flux's CLIP-L + T5, SD3's CLIP-L + G + T5, Chroma's T5, Qwen-Image's Qwen2.5), otherwise stand-ins with
  the same token layout (start/end/pad tokens, minimum length, chat template). The encoder output is shaped
  as ComfyUI's text encoder for that family shapes it (Qwen-Image drops the template head, SD3 puts the
  zero-padded CLIP rows before the T5 rows, Flux pools CLIP-L).
- MODEL: real tier: the family's ``comfy.supported_models`` class with a tiny config, seeded (norm weights
  1, linear fan-in scaled), sampled by ``comfy.sample``. CI tier: a ModelPatcher around the family's text
  readers under their real key names, sampled by a small forward that reads the text through them.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field

import torch

import comfy.model_patcher

REAL = bool(os.environ.get("COMFYUI_PATH"))
D = 256  # text width of every tiny family
# Tiny models keep the real ratio of token rows to text width (Flux: 256 rows, 4096 wide): T5 pads to
# T5_ROWS, through ComfyUI's own tokenizer_data knob ("t5xxl_min_length"), instead of 256/512/77.
T5_ROWS = 16
# pooled CLIP widths: about the real ratio to the rows' width (CLIP-L's 768 next to T5's 4096)
POOLED = {"flux": 48, "sd3": 64, "hunyuan_video": 48, "stable_cascade": 48, "hidream": 64}
HIDREAM_LLAMA_LAYERS = 3  # conditioning_llama3: [1, layers, T, D]; caption_projection.0/1 read layers 0 and 2
POOLED_FLUX, POOLED_SD3 = 48, 32
QWEN_HEAD = [151644, 8948, 198, 74785, 279, 2168, 13, 151645, 198, 151644, 872, 198]  # system …, user\n
QWEN_TAIL = [151645, 198, 151644, 77091, 198]  # <|im_end|>\n<|im_start|>assistant\n
ZIMAGE_HEAD = [151644, 872, 198]


@dataclass
class Family:
    name: str
    config: str
    unet_config: dict
    latent: tuple[int, ...]
    readers: dict[str, tuple[int, int]]
    norm: str | None = None
    pooled: str | None = None
    zero_centred: bool = False  # the stored norm weight is scale − 1 (Qwen-Image 2.1)
    extra_keys: dict[str, tuple[int, ...]] = field(default_factory=dict)


FAMILIES = {
    "flux": Family("flux", "Flux", dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=POOLED_FLUX, context_in_dim=D, hidden_size=64,
        mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000,
        patch_size=2, qkv_bias=True, guidance_embed=True), (1, 16, 8, 8),
        {"txt_in.weight": (64, D)}, pooled="vector_in.in_layer.weight"),
    "sd3": Family("sd3", "SD3", dict(
        in_channels=16, out_channels=16, patch_size=2, depth=1, adm_in_channels=2 * POOLED_SD3, pos_embed_scaling_factor=None,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": D, "out_features": 64}},
        num_patches=64, pos_embed_max_size=8, input_size=None, x_block_self_attn_layers=[]), (1, 16, 8, 8),
        {"context_embedder.weight": (64, D)}, pooled="y_embedder.mlp.0.weight"),
    "wan": Family("wan", "WAN21_T2V", dict(
        image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=64, ffn_dim=128,
        freq_dim=256, text_dim=D, out_dim=16, num_heads=2, num_layers=2, window_size=(-1, -1), qk_norm=True,
        cross_attn_norm=True, eps=1e-6), (1, 16, 1, 8, 8),
        {"text_embedding.0.weight": (64, D)}, extra_keys={"text_embedding.2.weight": (64, 64)}),
    "qwen_image": Family("qwen_image", "QwenImage", dict(
        image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=D, axes_dims_rope=(8, 12, 12)), (1, 16, 1, 8, 8),
        {"txt_in.weight": (64, D)}, norm="txt_norm.weight"),
    "chroma": Family("chroma", "Chroma", {}, (1, 16, 8, 8), {"txt_in.weight": (64, D)},
                     extra_keys={"distilled_guidance_layer.in_proj.weight": (32, 64)}),
    "lumina2": Family("lumina2", "ZImage", {}, (1, 16, 8, 8), {"cap_embedder.1.weight": (64, D)},
                      norm="cap_embedder.0.weight"),
    # newer than ComfyUI 0.3.64: stand-ins mirroring the current classes' text paths exactly
    # (comfy/ldm/qwen_image21/model.py TextProjection: text_norm, a zero-centred RMSNorm, then in_layer)
    "qwen_image21": Family("qwen_image21", "QwenImage21", {}, (1, 16, 8, 8), {"txt_in.in_layer.weight": (64, D)},
                           norm="txt_in.text_norm.weight", zero_centred=True,
                           extra_keys={"txt_in.out_layer.weight": (64, 64)}),
    # comfy/ldm/hunyuan_video/model.py: TokenRefiner's input_embedder reads the rows, its c_embedder their
    # mean (into the modulation vector, as vector_in's pooled CLIP-L)
    "hunyuan_video": Family("hunyuan_video", "HunyuanVideo", dict(
        image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=POOLED_FLUX, context_in_dim=D,
        hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=256,
        patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False), (1, 16, 1, 8, 8),
                            {"txt_in.input_embedder.weight": (64, D), "txt_in.c_embedder.in_layer.weight": (64, D)},
                            pooled="vector_in.in_layer.weight"),
    # comfy/ldm/cascade/stage_c.py: clip_txt_mapper reads CLIP-G's rows, clip_txt_pooled_mapper its pooled vector
    "stable_cascade": Family("stable_cascade", "Stable_Cascade_C", {}, (1, 16, 8, 8), {"clip_txt_mapper.weight": (64, D)},
                             pooled="clip_txt_pooled_mapper.weight"),
    # comfy/ldm/hidream/model.py: caption_projection[-1] reads T5's rows, caption_projection[i] the Llama-3 layer
    # llama_layers[i] of conditioning_llama3 (each layer its own text space), p_embedder's pooled_embedder.linear_1
    # the pooled CLIP-L+G. Real tier: ComfyUI 0.3.64's own HiDream class with this tiny config. CI tier: the
    # stand-in's forward reads the text the same ways (T5 rows through the last projection, Llama layer
    # llama_layers[i] through projection i, the pooled vector through p_embedder), with one attention over them
    "hidream": Family("hidream", "HiDream", dict(
        image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=32, num_attention_heads=2, caption_channels=[D, D], text_emb_dim=POOLED["hidream"],
        num_routed_experts=2, num_activated_experts=1, axes_dims_rope=[8, 12, 12], max_resolution=[16, 16],
        llama_layers=[0, 2]), (1, 16, 8, 8),
                      {"caption_projection.2.linear.weight": (64, D)}, pooled="p_embedder.pooled_embedder.linear_1.weight",
                      extra_keys={"caption_projection.0.linear.weight": (64, D),
                                  "caption_projection.1.linear.weight": (64, D)}),
}
REAL_FAMILIES = ("flux", "sd3", "wan", "qwen_image", "hunyuan_video", "hidream")


# ---------------------------------------------------------------- text encoders

def word_ids(text: str) -> list[int]:
    """Stand-in word pieces: one id per ≤ 5 letters, hashed into a BPE-sized vocabulary."""
    ids = []
    for word in text.lower().split():
        for i in range(0, len(word), 5):
            h = hashlib.sha256(word[i:i + 5].encode()).digest()
            ids.append(1000 + int.from_bytes(h[:4], "little") % 29000)
    return ids


class StandinTokenizer:
    """An ``SDTokenizer``-shaped tokenizer: optional start/end tokens, padding to a minimum length, a template."""

    def __init__(self, *, start=None, end=None, pad=0, min_length=1, max_length=None, head=(), tail=()):
        self.start_token, self.end_token, self.pad_token = start, end, pad
        self.min_length, self.max_length = min_length, max_length
        self.head, self.tail = list(head), list(tail)

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        words = word_ids(text)
        per_chunk = (self.max_length - 2) if self.max_length else len(words) + 1
        chunks = [words[i:i + per_chunk] for i in range(0, max(len(words), 1), max(per_chunk, 1))] or [[]]
        out = []
        for chunk in chunks:
            ids = ([self.start_token] if self.start_token is not None else []) + self.head + chunk + self.tail
            ids += [self.end_token] if self.end_token is not None else []
            length = max(self.max_length or 0, self.min_length)
            ids += [self.pad_token] * max(length - len(ids), 0)
            out.append([(i, 1.0, 0) for i in ids])
        return out


class Tokenizers:
    """Named tokenizers as ComfyUI's family tokenizers hold them (``clip_l``, ``t5xxl``, ``qwen25_7b``...)."""

    def __init__(self, parts: dict[str, tuple[str, object]]) -> None:
        self.parts = parts  # tokens-dict key → (attribute, tokenizer)
        for attr, tok in parts.values():
            setattr(self, attr, tok)

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        return {key: tok.tokenize_with_weights(text, return_word_ids) for key, (_, tok) in self.parts.items()}


def _clip_standin():
    return StandinTokenizer(start=49406, end=49407, pad=49407, max_length=77)


def standin_tokenizers(family: str) -> Tokenizers:
    t5 = lambda n: StandinTokenizer(end=1, pad=0, min_length=n, max_length=None)  # noqa: E731
    return {
        "flux": lambda: Tokenizers({"l": ("clip_l", _clip_standin()), "t5xxl": ("t5xxl", t5(T5_ROWS))}),
        "sd3": lambda: Tokenizers({"l": ("clip_l", _clip_standin()), "g": ("clip_g", StandinTokenizer(
            start=49406, end=49407, pad=0, max_length=77)), "t5xxl": ("t5xxl", t5(T5_ROWS))}),
        "wan": lambda: Tokenizers({"umt5xxl": ("clip_umt5xxl", t5(T5_ROWS))}),
        "chroma": lambda: Tokenizers({"t5xxl": ("clip_t5xxl", t5(1))}),
        "qwen_image": lambda: Tokenizers({"qwen25_7b": ("qwen25_7b", StandinTokenizer(
            pad=151643, head=QWEN_HEAD, tail=QWEN_TAIL))}),
        "lumina2": lambda: Tokenizers({"qwen3_4b": ("qwen3_4b", StandinTokenizer(
            pad=151643, head=ZIMAGE_HEAD, tail=QWEN_TAIL))}),
        "qwen_image21": lambda: Tokenizers({"qwen3vl_8b": ("qwen3vl_8b", StandinTokenizer(
            pad=151643, head=ZIMAGE_HEAD, tail=QWEN_TAIL))}),
        "stable_cascade": lambda: Tokenizers({"g": ("clip_g", _clip_standin())}),
        "hidream": lambda: Tokenizers({"g": ("clip_g", StandinTokenizer(start=49406, end=49407, pad=0, max_length=77)),
                                       "l": ("clip_l", _clip_standin()), "t5xxl": ("t5xxl", t5(T5_ROWS)),
                                       "llama": ("llama", StandinTokenizer(start=128000, pad=128009, min_length=T5_ROWS))}),
        "hunyuan_video": lambda: Tokenizers({"l": ("clip_l", _clip_standin()), "llama": ("llama", StandinTokenizer(
            pad=128258, head=[128000], tail=[128009]))}),
    }[family]()


def real_tokenizers(family: str):
    """ComfyUI's own tokenizer for the family where its files ship with ComfyUI (else ``None``)."""
    short = {"t5xxl_min_length": T5_ROWS}
    if family == "flux":
        from comfy.text_encoders.flux import FluxTokenizer
        return FluxTokenizer(tokenizer_data=short)
    if family == "sd3":
        from comfy.text_encoders.sd3_clip import SD3Tokenizer
        return SD3Tokenizer(tokenizer_data=short)
    if family == "qwen_image":
        from comfy.text_encoders.qwen_image import QwenImageTokenizer
        return QwenImageTokenizer()
    if family == "chroma":
        from comfy.text_encoders.pixart_t5 import PixArtTokenizer
        return PixArtTokenizer()
    return None  # Wan's UMT5 tokenizer is stored in the text encoder's weights; Z-Image's is newer than 0.3.64


class SeededEncoder:
    """Bidirectional seeded encoder ``ids → [T, d]``: every row depends on the whole prompt (as T5's)."""

    def __init__(self, d: int, seed: int, positions: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(8191, d, generator=g)
        # positions vary smoothly along a few directions: padding rows are alike, as a real encoder's
        steps = torch.arange(1024, dtype=torch.float32).unsqueeze(1) * torch.tensor([[0.01, 0.03, 0.1, 0.3]])
        self.position = 0.3 * torch.sin(steps) @ torch.randn(4, d, generator=g) / 2
        if not positions:  # T5 has no absolute positions (relative attention bias): its padding rows are alike
            self.position.zero_()
        self.mix = torch.randn(d, d, generator=g) / math.sqrt(d)

    def rows(self, ids: list[int]) -> torch.Tensor:
        x = self.table[torch.tensor(ids) % 8191] + self.position[: len(ids)]
        # every row (padding too) attends to the prompt's tokens: T5's padding rows carry the prompt
        words = torch.tensor([i not in (0, 151643) for i in ids])
        return x + 2 * torch.tanh(x[words].mean(0, keepdim=True) @ self.mix)

    def causal_rows(self, ids: list[int], pad: int) -> torch.Tensor:
        """As ``rows``, but each row sees only the tokens up to it, padding not counted (a decoder such as
        Llama: the start token's row is the same for every prompt, a word's row does not see the words after it)."""
        x = self.table[torch.tensor(ids) % 8191] + self.position[: len(ids)]
        words = torch.tensor([float(i != pad) for i in ids]).unsqueeze(1)
        mean = (x * words).cumsum(0) / words.cumsum(0).clamp_min(1.0)
        return x + 2 * torch.tanh(mean @ self.mix)


def _pool(enc: SeededEncoder, ids: list[int]) -> torch.Tensor:
    """CLIP's pooled vector ``[w]``: the end token's row, which (as in CLIP) carries the prompt's words."""
    rows = enc.rows(ids)
    words = [i for i, t in enumerate(ids) if t not in (49406, 49407, 0)]
    return (rows[ids.index(49407)] + (rows[words].mean(0) if words else rows[ids.index(49407)])) / 2


class StandinClipEncoder:
    """Shaped like ComfyUI's ``SDClipModel`` (with ``ClipTokenWeightEncoder``): ``encode`` takes a batch of token
    id lists and returns their rows ``[n, T, w]`` and pooled vectors ``[n, w']``; ``encode_token_weights`` encodes
    every chunk in one batch through ``self.encode`` and returns the rows concatenated ``[1, n·T, w]`` and the
    first chunk's pooled vector ``[1, w']`` only, as ComfyUI's does."""

    def __init__(self, rows: SeededEncoder, pool: SeededEncoder) -> None:
        self.rows_enc, self.pool_enc = rows, pool

    def encode(self, tokens: list[list[int]]):
        return (torch.stack([self.rows_enc.rows(ids) for ids in tokens]),
                torch.stack([_pool(self.pool_enc, ids) for ids in tokens]))

    def encode_token_weights(self, token_weight_pairs):
        z, pooled = self.encode([[t[0] for t in chunk] for chunk in token_weight_pairs])
        return z.reshape(1, -1, z.shape[-1]), pooled[0:1]


class StandinTextEncoders(torch.nn.Module):
    """``CLIP.cond_stage_model``: the family's sub-encoders as attributes ``clip_l`` / ``clip_g``."""


class DiTCLIP:
    """Duck-typed ``comfy.sd.CLIP`` whose output is shaped as the family's ComfyUI text encoder shapes it.

    Its CLIP parts go through ``cond_stage_model.clip_l`` / ``clip_g`` (``StandinClipEncoder``), as ComfyUI's
    family text encoders call their sub-encoders' ``encode_token_weights``."""

    def __init__(self, family: str, seed: int = 0, real_tokenizer: bool = REAL) -> None:
        self.family = family
        self.tokenizer = (real_tokenizers(family) if real_tokenizer else None) or standin_tokenizers(family)
        self.enc = SeededEncoder(D, seed, positions=family in ("qwen_image", "lumina2", "qwen_image21", "hunyuan_video"))
        width = POOLED.get(family, 32) // (2 if family in ("sd3", "hidream") else 1)  # CLIP-L and G side by side
        self.clip_l, self.clip_g = SeededEncoder(width, seed + 1), SeededEncoder(width, seed + 2)
        g = torch.Generator().manual_seed(seed + 3)  # HiDream's Llama-3 layers: each its own (nonlinear) space
        self.llama_mix = [torch.randn(D, D, generator=g) / math.sqrt(D) for _ in range(HIDREAM_LLAMA_LAYERS)]
        if family == "stable_cascade":  # CLIP-G's rows (D wide) and its pooled vector
            self.subs = {"clip_g": StandinClipEncoder(self.enc, self.clip_l)}
        else:
            self.subs = {"clip_l": StandinClipEncoder(self.clip_l, self.clip_l),
                         "clip_g": StandinClipEncoder(self.clip_g, self.clip_g)}
        self.cond_stage_model = StandinTextEncoders()  # exposes the sub-encoders (a test may hide them)
        for name, sub in self.subs.items():
            setattr(self.cond_stage_model, name, sub)

    def tokenize(self, text: str, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    @staticmethod
    def _ids(tokens, key):
        return [t[0] for t in tokens[key][0]]

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        extra = {}
        pooled = None
        te = type("TE", (), self.subs)
        if self.family in ("flux", "chroma", "wan"):
            # ComfyUI's T5 (and Flux's CLIP-L + T5) encodes every chunk of a token list in one batch and
            # concatenates their rows; the pooled vector is the first chunk's
            key = "umt5xxl" if self.family == "wan" else "t5xxl"
            cond = torch.cat([self.enc.rows([t[0] for t in chunk]) for chunk in tokens[key]])
            if self.family == "flux":
                pooled = te.clip_l.encode_token_weights(tokens["l"])[1]
        elif self.family == "sd3":
            (l_rows, l_pooled), (g_rows, g_pooled) = (te.clip_l.encode_token_weights(tokens["l"]),
                                                      te.clip_g.encode_token_weights(tokens["g"]))
            lg = torch.cat([l_rows[0], g_rows[0]], dim=-1)
            lg = torch.nn.functional.pad(lg, (0, D - lg.shape[-1]))
            # comfy/text_encoders/sd3_clip.py: every chunk's CLIP-L+G rows, then every chunk's T5 rows
            cond = torch.cat([lg] + [self.enc.rows([t[0] for t in chunk]) for chunk in tokens["t5xxl"]])
            pooled = torch.cat([l_pooled, g_pooled], dim=-1)
        elif self.family == "qwen_image":
            ids = self._ids(tokens, "qwen25_7b")
            cond = self.enc.rows(ids)
            starts = [i for i, t in enumerate(ids) if t == 151644][:2]  # the template head ComfyUI drops
            cut = starts[-1] + 3 if ids[starts[-1] + 1: starts[-1] + 3] == [872, 198] else starts[-1]
            cond = cond[cut:]
        elif self.family == "stable_cascade":  # CLIP-G's rows and its pooled vector
            cond, pooled = te.clip_g.encode_token_weights(tokens["g"])
            cond = cond[0]
        elif self.family == "hidream":  # T5's rows, pooled CLIP-L+G, every Llama-3 layer (its start token dropped)
            cond = self.enc.rows(self._ids(tokens, "t5xxl"))
            pooled = torch.cat([te.clip_l.encode_token_weights(tokens["l"])[1],
                                te.clip_g.encode_token_weights(tokens["g"])[1]], dim=-1)
            # comfy/text_encoders/hidream.py: every layer's rows ([1, 32, T, 4096]), the start token's row included
            # (ComfyUI drops the first of the 33 hidden states, the embeddings, not a token)
            llama = self.enc.causal_rows(self._ids(tokens, "llama"), pad=128009)
            extra["conditioning_llama3"] = torch.stack([llama + (1 + k) * torch.tanh(llama @ m)
                                                        for k, m in enumerate(self.llama_mix)])[None]
        elif self.family == "hunyuan_video":
            cond = self.enc.rows(self._ids(tokens, "llama"))
            pooled = te.clip_l.encode_token_weights(tokens["l"])[1]
        else:  # lumina2 / Z-Image, Qwen-Image 2.1: the whole templated sequence
            cond = self.enc.rows(self._ids(tokens, next(iter(tokens))))
        cond = cond.unsqueeze(0)
        if return_dict:
            out = {"cond": cond, "pooled_output": pooled}
            out.update(extra)
            return out
        return (cond, pooled) if return_pooled else cond

    def conditioning(self, text: str) -> list:
        """What CLIPTextEncode (+ FluxGuidance on Flux) gives for ``text``."""
        out = self.encode_from_tokens(self.tokenize(text), return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        if out.get("pooled_output") is None:
            out.pop("pooled_output")
        if self.family == "flux":
            out["guidance"] = 3.5
        return [[cond, out]]


# ---------------------------------------------------------------- models

def _config(name: str, unet_config: dict):
    return type(name, (), {"unet_config": dict(unet_config)})()


@torch.no_grad()
def make_model(family: str, seed: int = 0):
    """A ModelPatcher of the family: ComfyUI's own model (real tier for REAL_FAMILIES) or a stand-in."""
    fam = FAMILIES[family]
    if REAL and family in REAL_FAMILIES:
        return _real_model(fam, seed)
    from factory import _module_tree

    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, (out, d) in fam.readers.items():
        state[f"diffusion_model.{key}"] = torch.randn(out, d, generator=g) / math.sqrt(d)
        state[f"diffusion_model.{key[:-len('weight')]}bias"] = 0.1 * torch.randn(out, generator=g)
    if fam.norm:
        state[f"diffusion_model.{fam.norm}"] = (0.0 if fam.zero_centred else 1.0) + 0.3 * torch.rand(D, generator=g)
    if fam.pooled:
        state[f"diffusion_model.{fam.pooled}"] = torch.randn(64, POOLED[family], generator=g) / math.sqrt(POOLED[family])
    for key, shape in {"img_in.weight": (64, 16), "attn.q.weight": (64, 64), "attn.k.weight": (64, 64),
                       "attn.v.weight": (64, 64), "final.weight": (16, 64), **fam.extra_keys}.items():
        state[f"diffusion_model.{key}"] = torch.randn(*shape, generator=g) / math.sqrt(shape[-1])
    model = _module_tree(state)
    model.model_config = _config(fam.config, fam.unet_config)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def _real_model(fam: Family, seed: int):
    import sys
    from pathlib import Path

    import comfy.supported_models

    sys.path.insert(0, str(Path(__file__).parent / "real"))
    from checkpoint import seed_module

    config = getattr(comfy.supported_models, fam.config)(dict(fam.unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    seed_module(model.diffusion_model, g)
    for name, buffer in model.diffusion_model.named_buffers():
        if name.endswith("pos_embed"):  # SD3's is allocated empty (a checkpoint fills it)
            buffer.copy_(0.02 * torch.randn(buffer.shape, generator=g))
    if fam.norm:  # a norm weight that is not all ones, so the normed space differs from the encoder's
        dict(model.named_parameters())[f"diffusion_model.{fam.norm}"].copy_(1 + 0.3 * torch.rand(D, generator=g))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def _weights(model) -> dict[str, torch.Tensor]:
    from factory import effective_weights

    return {k.removeprefix("diffusion_model."): v for k, v in effective_weights(model).items()}


@torch.no_grad()
def sample(model, family: str, positive: list, negative: list, seed: int = 42) -> torch.Tensor:
    """A few sampling steps: ComfyUI's ``comfy.sample`` (real tier) or the stand-in's forward (CI tier)."""
    fam = FAMILIES[family]
    noise = torch.randn(fam.latent, generator=torch.Generator().manual_seed(seed))
    if REAL and family in REAL_FAMILIES:
        import comfy.sample

        latent = torch.zeros(fam.latent)
        return comfy.sample.sample(model, noise, 4, 2.0, "euler", "simple", positive, negative, latent,
                                   denoise=1.0, seed=seed, disable_pbar=True).float()
    w = _weights(model)
    reader, *mean_readers = fam.readers

    def text(cond):
        rows, extra = cond[0][0][0].float(), cond[0][1]
        if fam.norm:
            eps = 1e-5 if family == "lumina2" else 1e-6
            scale = w[fam.norm] + 1.0 if fam.zero_centred else w[fam.norm]
            rows = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps) * scale
        txt = rows @ w[reader].T + w[reader[:-len("weight")] + "bias"]
        vec = extra["pooled_output"][0].float() @ w[fam.pooled].T if fam.pooled else 0.0
        for r in mean_readers:  # HunyuanVideo's c_embedder: the mean of the rows, into the modulation vector
            vec = vec + rows.mean(0) @ w[r].T
        if family == "hidream":  # caption_projection[i] reads Llama-3 layer llama_layers[i]
            llama = extra["conditioning_llama3"][0].float()
            txt = torch.cat([txt] + [llama[layer] @ w[f"caption_projection.{i}.linear.weight"].T
                                     for i, layer in enumerate(fam.unet_config["llama_layers"])])
        return txt, vec

    x = noise.reshape(16, -1).T @ w["img_in.weight"].T  # [tokens, 64]
    conds = [text(positive), text(negative)]
    for _ in range(4):
        outs = []
        for txt, vec in conds:
            att = torch.softmax((x @ w["attn.q.weight"].T) @ (txt @ w["attn.k.weight"].T).T / 8.0, dim=-1)
            outs.append(torch.tanh(att @ (txt @ w["attn.v.weight"].T) + vec))
        x = x + 0.5 * (outs[1] + 2.0 * (outs[0] - outs[1]))
    return x @ w["final.weight"].T
