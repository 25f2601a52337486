"""ComfyUI objects → rece_core inputs: the model's cross-attention weights, CLIP text rows, patches."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

import comfy.lora
import comfy.model_management
import comfy.utils

from ..rece_core import Erasure, LowRankTransform, TextEmbedding, gram
from ..rece_core.files import fingerprint
from .patch import ErasurePatch

KEY_SUFFIXES = ("attn2.to_k.weight", "attn2.to_v.weight")
# Models whose attn2 reads image (not text) embeddings.
NOT_TEXT_CROSS_ATTENTION = {"SVD_img2vid", "SV3D_u", "SV3D_p", "Stable_Zero123"}


def model_type(model) -> str:
    """A readable name of the model's architecture, e.g. ``SD15``, ``SDXL``, ``Flux``."""
    config = getattr(model.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model.model).__name__


def cross_attention_keys(model) -> list[str]:
    """Every ``attn2.to_k``/``to_v`` weight key of a text-conditioned UNet, or a clear error."""
    kind = model_type(model)
    keys = [k for k in model.model.state_dict() if k.endswith(KEY_SUFFIXES)]
    if not keys or kind in NOT_TEXT_CROSS_ATTENTION:
        raise ValueError(
            f"RECE erases concepts from UNets that read text through cross-attention (SD1.x, SD2.x, "
            f"SDXL and their fine-tunes); this model is {kind}, which has no such layers.")
    return keys


def text_width(model, keys: list[str]) -> int:
    return int(model.model.state_dict()[keys[0]].shape[1])


def compute_device() -> torch.device:
    return comfy.model_management.get_torch_device()


def solve_device(device: torch.device) -> torch.device:
    """float64 solves run where float64 exists (not on Apple's MPS)."""
    return torch.device("cpu") if device.type == "mps" else device


def key_weights(model, keys: list[str], device: torch.device, *, include_erasures: bool,
                tick: Callable[[], None] | None = None):
    """Yield ``(key, W)``: each weight as the model will use it (float32, on ``device``).

    Patches already on the model (LoRAs...) are applied with ComfyUI's own ``calculate_weight``;
    our own erasure patches are left out unless ``include_erasures``. One matrix at a time.
    """
    patches = model.get_key_patches("diffusion_model.")
    for key in keys:
        (weight, convert), *rest = patches[key]
        if not include_erasures:
            rest = [p for p in rest if not isinstance(p[1], ErasurePatch)]
        w = comfy.model_management.cast_to_device(weight, device, torch.float32, copy=True)
        w = convert(w, inplace=True)
        if rest:
            w = comfy.lora.calculate_weight(rest, w, key, intermediate_dtype=torch.float32)
        yield key, w
        if tick is not None:
            tick()


def gram_of(model, keys: list[str], device: torch.device, *, include_erasures: bool = False,
            tick: Callable[[], None] | None = None) -> Tensor:
    """``S = Σ WᵀW`` (float64 ``[d, d]``) over the model's effective cross-attention weights."""
    weights = (w for _, w in key_weights(model, keys, device, include_erasures=include_erasures, tick=tick))
    try:
        return gram(weights)
    except ValueError as exc:
        raise ValueError(f"this model's {exc}") from None


def applied_erasures(model) -> list[tuple[Erasure, float]]:
    """The erasures patched into ``model`` (first cross-attention key) with their strengths, in order."""
    keys = [k for k in model.patches if k.endswith(KEY_SUFFIXES)]
    if not keys:
        return []
    return [(p[1].erasure, float(p[0])) for p in model.patches[keys[0]] if isinstance(p[1], ErasurePatch)]


def combined_transform(erasures: list[tuple[Erasure, float]], d: int, device: torch.device) -> LowRankTransform:
    """``P = Π (I + tᵢ (Pᵢ − I))`` of erasures applied one after another with strengths ``tᵢ``."""
    p = LowRankTransform.identity(d, device=device)
    for erasure, strength in erasures:
        t = erasure.transform.to(device=device, dtype=torch.float64)
        p = p.then(LowRankTransform(strength * t.up, t.down))
    return p


def encode(clip, text: str, device: torch.device) -> tuple[TextEmbedding, Tensor, Tensor | None]:
    """Encode ``text`` as CLIPTextEncode does; return its rows, the raw cond and the pooled output.

    ``last_token`` is the index of the last word token (one before the first end token).
    """
    if clip is None:
        raise ValueError("clip input is invalid: None. If it comes from a checkpoint loader, the "
                         "checkpoint has no text encoder.")
    tokens = clip.tokenize(text)
    name, chunks = next(iter(tokens.items()))
    for value in tokens.values():
        if len(value) != 1:
            raise ValueError(
                f"the prompt {text[:60]!r} is longer than one 77-token chunk ({len(value)} chunks); "
                "RECE aligns token rows within one chunk, so shorten it")
    tokenizer = getattr(clip.tokenizer, f"clip_{name}", None) or getattr(clip.tokenizer, name, None)
    last = last_word_token(text, [t[0] for t in chunks[0]], tokenizer, name)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    rows = cond[0].detach().to(device=device, dtype=torch.float32)
    return TextEmbedding(rows, last), cond, pooled


def last_word_token(text: str, ids: list, tokenizer, name: str) -> int:
    """Index of the prompt's last word token, found by position: the end token the tokenizer appends
    follows it (with end-token padding, the first of the trailing run of end tokens).

    A start or end token among the word tokens (a literal ``<|endoftext|>`` in the prompt, which CLIP's
    tokenizer reads as the special token) is refused: it would move the alignment. Entries that are not
    token ids (textual-inversion embeddings) count as words.
    """
    end, start = getattr(tokenizer, "end_token", None), getattr(tokenizer, "start_token", None)
    ids = [i if isinstance(i, int) else None for i in ids]
    if end is None or end not in ids:
        raise ValueError(f"cannot find the end token of the {name!r} tokenizer to align token rows")
    j = len(ids) - 1 - ids[::-1].index(end)
    if getattr(tokenizer, "pad_token", end) == end:
        while j > 1 and ids[j - 1] == end:
            j -= 1
    first = 1 if ids[0] is not None and ids[0] == start else 0
    if any(i is not None and i in (start, end) for i in ids[first:j]):
        raise ValueError(f"the prompt {text[:60]!r} contains the tokenizer's start or end token (e.g. a literal "
                         "<|endoftext|>); remove it, RECE aligns token rows on the end token")
    return max(j - 1, 0)


def encode_checked(clip, text: str, model, d: int, device: torch.device):
    """``encode`` plus a clear error when the CLIP's width is not the model's cross-attention width."""
    emb, cond, pooled = encode(clip, text, device)
    if emb.rows.shape[-1] != d:
        raise ValueError(f"the CLIP gives {emb.rows.shape[-1]}-wide text embeddings but this {model_type(model)} "
                         f"model's cross-attention reads {d}; use the CLIP that belongs to the model")
    return emb, cond, pooled


def require_erasure(erasure, node: str, model=None, keys: list[str] | None = None) -> None:
    """A RECE erasure (and, given a model, one made for the model's text width), or a clear error."""
    if not isinstance(erasure, Erasure):
        raise ValueError(f"{node}: the erasure input is not a RECE erasure")
    if model is not None and erasure.dim != text_width(model, keys):
        raise ValueError(f"this erasure was made for {erasure.dim}-wide text embeddings but this "
                         f"{model_type(model)} model's cross-attention reads {text_width(model, keys)}")


class Progress:
    """ComfyUI's ProgressBar plus a cancel check at every step."""

    def __init__(self, total: int) -> None:
        self.bar = comfy.utils.ProgressBar(total)
        self.done = 0

    def tick(self) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.done += 1
        self.bar.update_absolute(self.done)


def base_fingerprint(model, keys: list[str]) -> str:
    """Fingerprint of the checkpoint's own cross-attention weights (patches not applied)."""
    patches = model.get_key_patches("diffusion_model.")
    return fingerprint({k: patches[k][0][0] for k in keys})
