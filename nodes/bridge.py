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
from . import architectures
from .architectures import Architecture
from .patch import ErasurePatch


def model_type(model) -> str:
    """A readable name of the model's architecture, e.g. ``SD15``, ``SDXL``, ``Flux``."""
    config = getattr(model.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model.model).__name__


def architecture(model) -> tuple[Architecture, list[str]]:
    """The model's entry in ``architectures`` and the weight keys that read its text rows, or a clear error."""
    return architectures.detect(model_type(model), list(model.model.state_dict().keys()))


def cross_attention_keys(model) -> list[str]:
    """Every weight key that reads the text rows (``attn2.to_k``/``to_v``, ``txt_in``...), or a clear error."""
    return architecture(model)[1]


def text_width(model, keys: list[str]) -> int:
    return int(model.model.state_dict()[keys[0]].shape[1])


def effective_weight(model, key: str, device: torch.device) -> Tensor:
    """One weight as the model uses it (every patch applied), float32 on ``device``."""
    (weight, convert), *rest = model.get_key_patches("diffusion_model.")[key]
    w = convert(comfy.model_management.cast_to_device(weight, device, torch.float32, copy=True), inplace=True)
    return comfy.lora.calculate_weight(rest, w, key, intermediate_dtype=torch.float32) if rest else w


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
    """The erasures patched into ``model`` (first key carrying one) with their strengths, in order."""
    for patches in model.patches.values():
        found = [(p[1].erasure, float(p[0])) for p in patches if isinstance(p[1], ErasurePatch)]
        if found:
            return found
    return []


def combined_transform(erasures: list[tuple[Erasure, float]], d: int, device: torch.device) -> LowRankTransform:
    """``P = Π (I + tᵢ (Pᵢ − I))`` of erasures applied one after another with strengths ``tᵢ``."""
    p = LowRankTransform.identity(d, device=device)
    for erasure, strength in erasures:
        t = erasure.transform.to(device=device, dtype=torch.float64)
        p = p.then(LowRankTransform(strength * t.up, t.down))
    return p


def _end_index(arch: Architecture, tokenizer, ids: list[int]) -> int | None:
    """Index (in the token ids) of the token after the prompt's last word; ``None`` if not found."""
    if arch.template_end is not None and arch.template_end in ids:
        return len(ids) - 1 - ids[::-1].index(arch.template_end)
    end = getattr(tokenizer, "end_token", None)
    if end is not None and end in ids:
        return ids.index(end)
    if arch.name != "unet" and getattr(tokenizer, "end_token", 0) is None:
        return len(ids)  # no end token (Gemma): the last token is the last word
    return None


def encode(clip, text: str, device: torch.device, arch: Architecture | None = None,
           model=None) -> tuple[TextEmbedding, Tensor, dict]:
    """Encode ``text`` as CLIPTextEncode does; return the rows the model's readers see, the raw
    cond and the rest of the conditioning (``pooled_output``, ``conditioning_llama3``...).

    ``last_token`` is the index of the last word token (one before the end token) in those rows.
    Where ``arch`` has a norm before its readers, the rows are normed with ``model``'s norm weight.
    """
    arch = arch or architectures.by_name("unet")
    if clip is None:
        raise ValueError("clip input is invalid: None. If it comes from a checkpoint loader, the "
                         "checkpoint has no text encoder.")
    text = text if text.strip() else ""  # blank = the empty prompt, every family's unconditional
    tokens = clip.tokenize(text)
    name = arch.encoder or next(iter(tokens))
    if name not in tokens:
        raise ValueError(f"this CLIP gives no {name!r} text; the {arch.title} model reads it; use the text "
                         f"encoder that belongs to the model (this one gives {', '.join(tokens)})")
    chunks = tokens[name]
    for value in (tokens.values() if arch.name == "unet" else [chunks]):
        if len(value) != 1:
            raise ValueError(
                f"the prompt {text[:60]!r} is longer than one 77-token chunk ({len(value)} chunks); "
                "RECE aligns token rows within one chunk, so shorten it")
    tokenizer = getattr(clip.tokenizer, f"clip_{name}", None) or getattr(clip.tokenizer, name, None)
    ids = [t[0] if isinstance(t[0], int) else -1 for t in chunks[0]]
    end = _end_index(arch, tokenizer, ids)
    if end is None:
        raise ValueError(f"cannot find the end token of the {name!r} tokenizer to align token rows")
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    if isinstance(out, dict):
        extra = dict(out)
        cond = extra.pop("cond")
    else:
        cond, pooled = out
        extra = {"pooled_output": pooled}
    if extra.get("pooled_output") is None:
        extra.pop("pooled_output", None)
    rows = cond[0].detach().to(device=device, dtype=torch.float32)
    offset = max(len(ids) - rows.shape[0], 0)  # a template head the encoder strips (Qwen-Image)
    if arch.norm is not None:
        rows = architectures.rms_norm(rows, effective_weight(model, f"diffusion_model.{arch.norm}", device),
                                      norm_eps(model, arch))
    return TextEmbedding(rows, min(max(end - 1 - offset, 0), rows.shape[0] - 1)), cond, extra


def norm_eps(model, arch: Architecture) -> float:
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    return float(config.get("norm_eps", arch.norm_eps)) if arch.name == "lumina2" else arch.norm_eps


def encode_checked(clip, text: str, model, d: int, device: torch.device, arch: Architecture | None = None):
    """``encode`` plus a clear error when the CLIP's width is not the width the model's text readers read."""
    emb, cond, extra = encode(clip, text, device, arch, model)
    if emb.rows.shape[-1] != d:
        raise ValueError(f"the CLIP gives {emb.rows.shape[-1]}-wide text embeddings but this {model_type(model)} "
                         f"model's {'cross-attention' if arch is None or arch.name == 'unet' else 'text input'} "
                         f"reads {d}; use the CLIP that belongs to the model")
    return emb, cond, extra


def conditioning(arch: Architecture, rows: Tensor, model, cond: Tensor, extra: dict) -> list:
    """ComfyUI ``CONDITIONING`` carrying ``rows`` (in the space the readers see) for ``model``."""
    if arch.norm is not None:  # back to the encoder's space: the model norms it again
        rows = architectures.rms_norm_preimage(
            rows, effective_weight(model, f"diffusion_model.{arch.norm}", rows.device))
    out = dict(extra)
    if arch.guidance is not None:
        out.setdefault("guidance", arch.guidance)
    out.pop("attention_mask", None)  # the derived rows attend everywhere
    return [[rows.to(device=cond.device, dtype=cond.dtype).unsqueeze(0), out]]


def require_erasure(erasure, node: str, model=None, keys: list[str] | None = None) -> None:
    """A RECE erasure (and, given a model, one made for the model's text space and width), or a clear error."""
    if not isinstance(erasure, Erasure):
        raise ValueError(f"{node}: the erasure input is not a RECE erasure")
    if model is None:
        return
    arch, found = architecture(model)
    keys = keys or found
    made_for = architectures.by_name(erasure.extra.get("architecture", "unet"))
    if made_for.space != arch.space:
        raise ValueError(f"{node}: this erasure was made for {made_for.title}, but this {model_type(model)} model "
                         f"is {arch.title}: another text space, so it cannot apply here")
    if erasure.dim != text_width(model, keys):
        raise ValueError(f"this erasure was made for {erasure.dim}-wide text embeddings but this "
                         f"{model_type(model)} model's {'cross-attention' if arch.name == 'unet' else 'text input'} "
                         f"reads {text_width(model, keys)}")


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
