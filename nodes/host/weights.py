"""Reading and patching the model's weights: which keys read the text, each weight as float32 as the
model uses it (patches applied), the Gram of the readers, the erasures already applied, fingerprints."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

import comfy.lora
import comfy.model_management

from ...rece_core import Erasure, LowRankTransform, gram
from ...rece_core.files import fingerprint
from ..patch import is_erasure_patch
from . import architectures
from .architectures import Architecture


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


def applied_erasures(model, keys: list[str] | None = None) -> list[tuple[LowRankTransform, float]]:
    """The erasures patched into ``model`` (first key carrying one, among ``keys`` if given) as
    ``(P, strength)``, in order.

    Found from the patches' weights, so an adapter ComfyUI rebuilt or moved is found as well.
    """
    for key, patches in model.patches.items():
        if keys is not None and key not in keys:
            continue
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


def norm_eps(model, arch: Architecture) -> float:
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    return float(config.get("norm_eps", arch.norm_eps)) if arch.name in ("lumina2", "omnigen2") else arch.norm_eps


def norm_scale(model, arch: Architecture, device: torch.device) -> Tensor | None:
    """The per-feature scale of ``arch``'s RMSNorm before the readers as the model applies it (float32
    ``[d]``; a zero-centred norm stores ``scale − 1``), ``None`` where this model has no such norm."""
    if arch.norm is None:
        return None
    key = architectures.norm_key(arch, model.model.state_dict().keys() if arch.norm.startswith("^") else ())
    if key is None:
        return None
    w = effective_weight(model, f"diffusion_model.{key}", device)
    return w + 1.0 if arch.norm_zero_centred else w


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
    pooled = erasure.spaces.get("pooled")
    readers = arch.pooled_keys(model_type(model), list(model.model.state_dict().keys())) if pooled else []
    if readers and pooled.dim != pooled_width(model, arch, readers):
        raise ValueError(f"{node}: this erasure's pooled-text transform is {pooled.dim} wide but this "
                         f"{model_type(model)} model's pooled text path reads {pooled_width(model, arch, readers)}")


def base_fingerprint(model, keys: list[str]) -> str:
    """Fingerprint of the checkpoint's own cross-attention weights (patches not applied)."""
    patches = model.get_key_patches("diffusion_model.")
    return fingerprint({k: patches[k][0][0] for k in keys})


def pooled_keys(model, arch: Architecture | None = None) -> list[str]:
    """The weight keys reading the pooled text vector (Flux's ``vector_in``, SD3's ``y_embedder``, SDXL's
    ``label_emb``...), ``[]`` where the model has no pooled path."""
    arch = arch or architecture(model)[0]
    return arch.pooled_keys(model_type(model), list(model.model.state_dict().keys()))


def pooled_width(model, arch: Architecture, keys: list[str]) -> int:
    """Width of the pooled vector the pooled readers read (SDXL: the bigG columns of ``label_emb``)."""
    return arch.pooled_columns or int(model.model.state_dict()[keys[0]].shape[1])


def widened(transform: LowRankTransform, width: int) -> LowRankTransform:
    """``transform`` acting on the first ``transform.dim`` of ``width`` columns, the identity on the rest:
    ``W P`` then changes only those columns (SDXL's size embeddings stay exactly as they were)."""
    pad = width - transform.dim
    if pad <= 0:
        return transform
    up, down = transform.up, transform.down
    if transform.is_dense:  # keep the factors thin in the padded width too
        down = torch.eye(transform.dim, dtype=up.dtype, device=up.device)
    return LowRankTransform(torch.cat([up, up.new_zeros(pad, up.shape[1])]),
                            torch.cat([down, down.new_zeros(down.shape[0], pad)], dim=1))


def narrowed(transform: LowRankTransform, width: int) -> LowRankTransform:
    """The inverse of ``widened``: ``transform`` on its first ``width`` columns."""
    if transform.dim == width:
        return transform
    return LowRankTransform(transform.up[:width], transform.down[:, :width])


def pooled_gram(model, arch: Architecture, keys: list[str], device: torch.device, *,
                include_erasures: bool) -> Tensor:
    """``S = Σ WᵀW`` over the pooled readers, on the pooled vector's columns only (float64)."""
    width = pooled_width(model, arch, keys)
    weights = (w[:, :width] for _, w in key_weights(model, keys, device, include_erasures=include_erasures))
    try:
        return gram(weights)
    except ValueError as exc:
        raise ValueError(f"this model's {exc}") from None
