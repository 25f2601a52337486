"""ComfyUI objects → rece_core inputs: the model's cross-attention weights, CLIP text rows, patches."""

from __future__ import annotations

import math
import time
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
from .patch import is_erasure_patch


def model_type(model) -> str:
    """A readable name of the model's architecture, e.g. ``SD15``, ``SDXL``, ``Flux``."""
    config = getattr(model.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model.model).__name__


def architecture(model) -> tuple[Architecture, list[str]]:
    """The model's entry in ``architectures`` and the weight keys that read its text rows, or a clear error.

    Weights stored in a format RECE cannot read are refused here, before anything is read or patched.
    """
    arch, keys = architectures.detect(model_type(model), list(model.model.state_dict().keys()))
    require_readable(model, keys)
    return arch, keys


def cross_attention_keys(model) -> list[str]:
    """Every weight key that reads the text rows (``attn2.to_k``/``to_v``, ``txt_in``...), or a clear error."""
    return architecture(model)[1]


def text_width(model, keys: list[str]) -> int:
    return int(model.model.state_dict()[keys[0]].shape[1])


def effective_weight(model, key: str, device: torch.device) -> Tensor:
    """One weight as the model uses it (every patch applied), float32 on ``device``."""
    (weight, convert), *rest = model.get_key_patches("diffusion_model.")[key]
    w = convert(_dense(weight, device), inplace=True)
    return comfy.lora.calculate_weight(rest, w, key, intermediate_dtype=torch.float32) if rest else w


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
    """The erasures patched into ``model`` (first key carrying one) as ``(P, strength)``, in order.

    Found from the patches' weights, so an adapter ComfyUI rebuilt or moved is found as well.
    """
    for patches in model.patches.values():
        found = [(p[1].transform(), float(p[0])) for p in patches if is_erasure_patch(p[1])]
        if found:
            return found
    return []


def combined_transform(erasures: list[tuple[LowRankTransform, float]], d: int,
                       device: torch.device) -> LowRankTransform:
    """``P = Π (I + tᵢ (Pᵢ − I))`` of erasures applied one after another with strengths ``tᵢ``."""
    p = LowRankTransform.identity(d, device=device)
    for transform, strength in erasures:
        t = transform.to(device=device, dtype=torch.float64)
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


def last_word_token(text: str, ids: list, tokenizer, name: str) -> int:
    """CLIP: index of the prompt's last word token, found by position: the end token the tokenizer
    appends follows it (with end-token padding, the first of the trailing run of end tokens).

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


def tokenize(clip, text: str, arch: Architecture | None = None) -> tuple[dict, int, int]:
    """``clip.tokenize(text)`` checked for ``arch``, the index (in the reader's token ids) of the
    prompt's last word token, and the number of those ids."""
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
    ids = [t[0] for t in chunks[0]]
    if arch.name == "unet":
        return tokens, last_word_token(text, ids, tokenizer, name), len(ids)
    end = _end_index(arch, tokenizer, [i if isinstance(i, int) else -1 for i in ids])
    if end is None:
        raise ValueError(f"cannot find the end token of the {name!r} tokenizer to align token rows")
    return tokens, end - 1, len(ids)


def _embedding(rows: Tensor, last: int, n_ids: int, arch: Architecture, model,
               device: torch.device | None) -> TextEmbedding:
    """The rows the readers see (normed first where ``arch`` norms them), the last word token among them.

    ``device=None`` keeps the rows as the encoder returned them (dtype and device)."""
    rows = rows.detach() if device is None else rows.detach().to(device=device, dtype=torch.float32)
    offset = max(n_ids - rows.shape[0], 0)  # a template head the encoder strips (Qwen-Image)
    if arch.norm is not None:
        at = rows.device if device is None else device
        rows = architectures.rms_norm(rows.float(), effective_weight(model, f"diffusion_model.{arch.norm}", at),
                                      norm_eps(model, arch))
    return TextEmbedding(rows, min(max(last - offset, 0), rows.shape[0] - 1))


def encode(clip, text: str, device: torch.device, arch: Architecture | None = None,
           model=None) -> tuple[TextEmbedding, Tensor, dict]:
    """Encode ``text`` as CLIPTextEncode does; return the rows the model's readers see, the raw
    cond and the rest of the conditioning (``pooled_output``, ``conditioning_llama3``...).

    ``last_token`` is the index of the last word token (one before the end token) in those rows.
    Where ``arch`` has a norm before its readers, the rows are normed with ``model``'s norm weight.
    """
    arch = arch or architectures.by_name("unet")
    tokens, last, n_ids = tokenize(clip, text, arch)
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    if isinstance(out, dict):
        extra = dict(out)
        cond = extra.pop("cond")
    else:
        cond, pooled = out
        extra = {"pooled_output": pooled}
    if extra.get("pooled_output") is None:
        extra.pop("pooled_output", None)
    return _embedding(cond[0], last, n_ids, arch, model, device), cond, extra


class EncoderCalls:
    """Sizes the encoder calls of a batched encoding so each takes about ``seconds``.

    Cancel (``check``) is honoured between calls, so within about ``seconds`` even where one chunk of
    prompts takes minutes (CPU, bigG); where the encoder is fast (a GPU) the calls grow to whole chunks
    after the first. Each call's time per prompt sizes the next (``clock``: injectable for tests); the
    first is small (``first``), since its cost is not yet known.
    """

    def __init__(self, seconds: float = 1.0, first: int = 4, check: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.seconds, self.size, self.check, self.clock = seconds, max(1, first), check or (lambda: None), clock
        self.sizes: list[int] = []  # every call's number of prompts, in order

    def run(self, n: int, call: Callable[[int, int], None]) -> None:
        """``call(start, stop)`` over ``range(n)`` in calls of the current size, ``check()`` before each."""
        start = 0
        while start < n:
            self.check()
            stop = min(n, start + self.size)
            t0 = self.clock()
            call(start, stop)
            per_prompt = max(self.clock() - t0, 1e-9) / (stop - start)
            self.sizes.append(stop - start)
            self.size = max(1, int(min(self.seconds / per_prompt, 2**31)))
            start = stop


def encode_many(clip, texts: list[str], arch: Architecture | None = None, model=None,
                calls: EncoderCalls | None = None) -> list[TextEmbedding]:
    """Encode prompts as CLIPTextEncode does, several in one encoder forward (CLIP families).

    ComfyUI's CLIP encodes every chunk of a token list in one batch and concatenates their rows
    (``encode_from_tokens``, its public API), weighting each chunk against the same empty
    sequence; so the one-chunk token lists of several prompts, put one after another, give each
    prompt's own rows. Prompts whose token lists differ in length go into separate calls, and
    ``calls`` (default: one call per length) bounds how long each call takes. Rows stay as the
    encoder returns them (its dtype, ComfyUI's intermediate device). Encoders that combine several
    kinds of rows (SD3's CLIP + T5) or strip a template are encoded one prompt at a time.
    """
    arch = arch or architectures.by_name("unet")
    if arch.name != "unet":
        out = [None] * len(texts)
        calls = calls or EncoderCalls(seconds=math.inf)

        def one(start: int, stop: int) -> None:
            for i in range(start, stop):
                calls.check()  # one prompt per encoder call here: Cancel between any two
                out[i] = encode(clip, texts[i], None, arch, model)[0]

        calls.run(len(texts), one)
        return out
    tokenized = [tokenize(clip, t, arch) for t in texts]
    groups: dict[tuple, list[int]] = {}
    for i, (tokens, _, _) in enumerate(tokenized):
        groups.setdefault(tuple((k, len(v[0])) for k, v in tokens.items()), []).append(i)
    out: list[TextEmbedding | None] = [None] * len(texts)
    for shape, members in groups.items():

        def batch(start: int, stop: int) -> None:
            part = members[start:stop]
            cond = clip.encode_from_tokens({name: [tokenized[i][0][name][0] for i in part] for name, _ in shape})
            for i, r in zip(part, cond[0].split(cond.shape[1] // len(part))):
                out[i] = _embedding(r, tokenized[i][1], tokenized[i][2], arch, model, None)

        (calls or EncoderCalls(seconds=math.inf, first=len(members))).run(len(members), batch)
    return out


def norm_eps(model, arch: Architecture) -> float:
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    return float(config.get("norm_eps", arch.norm_eps)) if arch.name == "lumina2" else arch.norm_eps


def encode_checked(clip, text: str, model, d: int, device: torch.device, arch: Architecture | None = None):
    """``encode`` plus a clear error when the CLIP's width is not the width the model's text readers read."""
    emb, cond, extra = encode(clip, text, device, arch, model)
    check_width(emb.rows.shape[-1], d, model, arch)
    return emb, cond, extra


def check_width(width: int, d: int, model, arch: Architecture | None = None) -> None:
    """A clear error when the CLIP's width is not the width the model's text readers read."""
    if width != d:
        raise ValueError(f"the CLIP gives {width}-wide text embeddings but this {model_type(model)} "
                         f"model's {'cross-attention' if arch is None or arch.name == 'unet' else 'text input'} "
                         f"reads {d}; use the CLIP that belongs to the model")


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
