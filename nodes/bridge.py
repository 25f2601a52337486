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
from .patch import is_erasure_patch

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
    require_readable(model, keys)
    return keys


def text_width(model, keys: list[str]) -> int:
    return int(model.model.state_dict()[keys[0]].shape[1])


def compute_device() -> torch.device:
    return comfy.model_management.get_torch_device()


def solve_device(device: torch.device) -> torch.device:
    """float64 solves run where float64 exists (not on Apple's MPS)."""
    return torch.device("cpu") if device.type == "mps" else device


def stored_format(weight) -> str | None:
    """The name of a weight storage RECE cannot read, or ``None`` for a readable one.

    Readable: floating tensors (fp32/fp16/bf16/fp8) and ComfyUI's ``QuantizedTensor`` (read
    dequantized). Not readable: ComfyUI-GGUF's ``GGMLTensor`` and bitsandbytes' NF4/FP4 (their
    torch shape and bytes are the packed storage, not the matrix), and any other integer storage.
    """
    names = {c.__name__ for c in type(weight).__mro__}
    if "GGMLTensor" in names or hasattr(weight, "tensor_type") and hasattr(weight, "tensor_shape"):
        return "GGUF (ComfyUI-GGUF GGMLTensor)"
    if "Params4bit" in names or getattr(weight, "quant_state", None) is not None:
        return "NF4/FP4 (bitsandbytes)"
    if "QuantizedTensor" in names:
        return None
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        return f"{getattr(weight, 'dtype', type(weight).__name__)} storage"
    return None


def require_readable(model, keys: list[str]) -> None:
    """Refuse, before anything is read or patched, weights stored in a format RECE cannot read."""
    patches = model.get_key_patches("diffusion_model.")
    missing = [k for k in keys if k not in patches]
    if missing:
        raise ValueError(f"this {model_type(model)} model's weight {missing[0]} cannot be read "
                         "(it is not a plain tensor)")
    fmt = stored_format(patches[keys[0]][0][0])
    if fmt is not None:
        raise ValueError(f"this {model_type(model)} model's text-reading weights are stored as {fmt}, which "
                         "RECE cannot read; load the checkpoint in fp16/bf16/fp8 (or ComfyUI's own quantized "
                         "format) instead")


def _dense(weight, device: torch.device) -> Tensor:
    """``weight`` on ``device`` in float32, moved in its stored dtype first (one transfer, cast there)."""
    w = comfy.model_management.cast_to_device(weight, device, None)
    if any(c.__name__ == "QuantizedTensor" for c in type(w).__mro__):
        w = w.dequantize()
    return w.to(torch.float32, copy=True)


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
            rest = [p for p in rest if not is_erasure_patch(p[1])]
        w = convert(_dense(weight, device), inplace=True)
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


def applied_erasures(model) -> list[tuple[LowRankTransform, float]]:
    """The erasures patched into ``model`` (first reader key) as ``(P, strength)``, in order.

    Found from the patches' weights, so an adapter ComfyUI rebuilt or moved is found as well.
    """
    keys = [k for k in model.patches if k.endswith(KEY_SUFFIXES)]
    if not keys:
        return []
    return [(p[1].transform(), float(p[0])) for p in model.patches[keys[0]] if is_erasure_patch(p[1])]


def combined_transform(erasures: list[tuple[LowRankTransform, float]], d: int,
                       device: torch.device) -> LowRankTransform:
    """``P = Π (I + tᵢ (Pᵢ − I))`` of erasures applied one after another with strengths ``tᵢ``."""
    p = LowRankTransform.identity(d, device=device)
    for transform, strength in erasures:
        t = transform.to(device=device, dtype=torch.float64)
        p = p.then(LowRankTransform(strength * t.up, t.down))
    return p


def tokenize(clip, text: str) -> tuple[dict, int]:
    """``clip.tokenize(text)`` (one chunk per encoder, or a clear error) and the last word token's index.

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
    return tokens, last_word_token(text, [t[0] for t in chunks[0]], tokenizer, name)


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


def encode(clip, text: str, device: torch.device) -> tuple[TextEmbedding, Tensor, Tensor | None]:
    """Encode ``text`` as CLIPTextEncode does; return its rows, the raw cond and the pooled output."""
    tokens, last = tokenize(clip, text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    rows = cond[0].detach().to(device=device, dtype=torch.float32)
    return TextEmbedding(rows, last), cond, pooled


def encode_many(clip, texts: list[str]) -> list[TextEmbedding]:
    """Encode prompts as CLIPTextEncode does, several in one encoder forward.

    ComfyUI's CLIP encodes every chunk of a token list in one batch and concatenates their rows
    (``encode_from_tokens``, its public API), weighting each chunk against the same empty
    sequence; so the one-chunk token lists of several prompts, put one after another, give each
    prompt's own rows. Prompts whose token lists differ in length go into separate calls. Rows stay
    as the encoder returns them (its dtype, ComfyUI's intermediate device).
    """
    tokenized = [tokenize(clip, t) for t in texts]
    groups: dict[tuple, list[int]] = {}
    for i, (tokens, _) in enumerate(tokenized):
        groups.setdefault(tuple((k, len(v[0])) for k, v in tokens.items()), []).append(i)
    out: list[TextEmbedding | None] = [None] * len(texts)
    for shape, members in groups.items():
        batch = {name: [tokenized[i][0][name][0] for i in members] for name, _ in shape}
        cond = clip.encode_from_tokens(batch).detach()
        rows = cond[0].split(cond.shape[1] // len(members))
        for i, r in zip(members, rows):
            out[i] = TextEmbedding(r, tokenized[i][1])
    return out


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
        self.at(self.done + 1)

    def at(self, done: int, total: int | None = None) -> None:
        """Cancel if asked to; else show ``done`` of ``total`` (the total may grow as work is known)."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.done = done
        self.bar.update_absolute(done, total)


def base_fingerprint(model, keys: list[str]) -> str:
    """Fingerprint of the checkpoint's own cross-attention weights (patches not applied)."""
    patches = model.get_key_patches("diffusion_model.")
    return fingerprint({k: patches[k][0][0] for k in keys})
