"""Reading and patching the model's weights: which keys read the text, each weight as float32 as the
model uses it (patches applied), the Gram of the readers, the erasures already applied, fingerprints."""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy
import torch
from torch import Tensor

import comfy.lora
import comfy.model_management
import comfy.utils

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


# ---------------------------------------------------------------- reading any weight as float32
# The one reading path every method uses (RECE, ConceptPrune, the training methods). Public names:
#   stored_weight(model, key)   the checkpoint's own tensor of one key (patches not applied), as it is held
#   stored_format(weight)       None when readable, else the name of a storage this pack cannot read
#   logical_shape(weight)       the matrix's shape, whatever the storage (GGUF and NVFP4 pack it)
#   require_readable(model, keys)  refuse unreadable storage by name, before anything is read or patched
#   text_width(model, keys)     in-features of the text readers, from logical shapes (nothing dequantized)
#   effective_weight(model, key, device)  one weight as the model uses it, float32
#   key_weights(model, keys, device, include_erasures=...)  each weight as the model uses it, float32
# Readable storage: float tensors (fp32/fp16/bf16/fp8), ComfyUI's QuantizedTensor (comfy-kitchen: fp8
# scaled, INT8, NVFP4, MXFP8, W4A8, AWQ... read through its own ``dequantize()``), and ComfyUI-GGUF's
# GGMLTensor (every type it loads, read through ComfyUI-GGUF's own ``dequantize_tensor``). One
# dequantization per weight read; nothing is ever written into the stored tensor.

TORCH_GGUF_TYPES = ("F32", "F16")
"""GGUF tensor types ComfyUI-GGUF keeps as plain torch tensors (its ``TORCH_COMPATIBLE_QTYPES``)."""

LOAD_INSTEAD = ("load the checkpoint in fp16/bf16/fp8 (Load Diffusion Model), a GGUF file with ComfyUI-GGUF's "
                "Unet Loader (GGUF), or one of ComfyUI's own quantized checkpoints (fp8 scaled, INT8, NVFP4) instead")


def _is(weight, name: str) -> bool:
    return any(c.__name__ == name for c in type(weight).__mro__)


def _is_gguf(weight) -> bool:
    """ComfyUI-GGUF's ``GGMLTensor`` (recognised by its contract: a tensor with ``tensor_type``/``tensor_shape``)."""
    return isinstance(weight, Tensor) and (_is(weight, "GGMLTensor") or (
        hasattr(weight, "tensor_type") and hasattr(weight, "tensor_shape")))


def _gguf_type(weight) -> str:
    qtype = getattr(weight, "tensor_type", None)
    return "F32" if qtype is None else str(getattr(qtype, "name", qtype))


def stored_weight(model, key: str):
    """``(weight, convert, layer)`` of one key: the checkpoint's own tensor as the layer holds it (ComfyUI's
    backup when the weight is patched in place), the layer's ``convert_<name>`` (or identity) and the layer.

    Looked up for this key alone, as ``ModelPatcher.get_key_patches`` would find it, without walking the
    state dict: ComfyUI-GGUF's state dict carries a fake ``<layer>.temp.weight`` and current ComfyUI's
    quantized layers ``weight_scale``/``comfy_quant`` entries that are no attributes of any layer.
    """
    path, name = key.rsplit(".", 1)
    try:
        layer = comfy.utils.get_attr(model.model, path)
        weight = getattr(layer, name)
    except AttributeError:
        raise ValueError(f"this {model_type(model)} model has no weight {key} that can be read") from None
    backup = getattr(model, "backup", {}).get(key)
    if backup is not None:
        weight = backup.weight
    hook = getattr(model, "hook_backup", {}).get(key)
    if hook is not None:
        weight = hook[0]
    convert = getattr(layer, f"convert_{name}", None) or (lambda a, **kwargs: a)
    return weight, convert, layer


def logical_shape(weight) -> torch.Size:
    """The matrix's shape: GGUF's ``tensor_shape`` (its torch shape is the packed bytes), a
    ``QuantizedTensor``'s own (logical) shape, a plain tensor's shape."""
    if _is_gguf(weight):
        shape = getattr(weight, "tensor_shape", None)
        return torch.Size(shape) if shape is not None else weight.size()
    return weight.shape


def _gguf_dequantizer(weight):
    """ComfyUI-GGUF's own ``dequantize_tensor`` (the module defining the weight's class imports it), or ``None``."""
    module = sys.modules.get(type(weight).__module__)
    fn = getattr(module, "dequantize_tensor", None)
    return fn if callable(fn) else None


def _gguf_readable(weight) -> bool:
    qtype = _gguf_type(weight)
    if qtype in TORCH_GGUF_TYPES:
        return True
    fn = _gguf_dequantizer(weight)
    known = getattr(fn, "__globals__", {}).get("dequantize_functions", {})
    if any(str(getattr(k, "name", k)) == qtype for k in known):
        return True
    try:  # the gguf package's numpy dequantizer (ComfyUI-GGUF's own fallback)
        import gguf

        gguf.quants.dequantize(numpy.zeros((1, gguf.GGML_QUANT_SIZES[weight.tensor_type][1]), numpy.uint8),
                               weight.tensor_type)
        return True
    except Exception:  # noqa: BLE001 -- any failure means: cannot dequantize this type
        return False


def stored_format(weight) -> str | None:
    """``None`` for a weight this pack reads, else the name of its storage (for the refusal).

    Readable: floating tensors (fp32/fp16/bf16/fp8), ComfyUI's ``QuantizedTensor`` and ComfyUI-GGUF's
    ``GGMLTensor`` of a type ComfyUI-GGUF (or the gguf package) dequantizes. Not readable: bitsandbytes
    NF4/FP4 (``Params4bit``) and LLM.int8 (``Int8Params``), torchao/optimum-quanto tensors, other
    integer storage, weights not loaded (meta device).
    """
    names = {c.__name__ for c in type(weight).__mro__}
    if not isinstance(weight, Tensor):
        return f"{type(weight).__name__} (not a tensor)"
    if _is_gguf(weight):
        return None if _gguf_readable(weight) else f"GGUF {_gguf_type(weight)} (which ComfyUI-GGUF cannot dequantize)"
    if "QuantizedTensor" in names:
        return None
    if "Params4bit" in names or getattr(weight, "quant_state", None) is not None:
        return "bitsandbytes NF4/FP4 (4-bit)"
    if "Int8Params" in names or hasattr(weight, "SCB"):
        return "bitsandbytes LLM.int8 (8-bit)"
    if "AffineQuantizedTensor" in names:
        return f"torchao quantized tensor ({type(weight).__name__})"
    if any(n.startswith("QTensor") or n.endswith(("QBytesTensor", "QBitsTensor")) for n in names):
        return f"optimum-quanto quantized tensor ({type(weight).__name__})"
    if weight.is_meta:
        return "meta tensor (the weights were never loaded)"
    if not weight.is_floating_point():
        return f"{weight.dtype} storage"
    return None


def require_readable(model, keys: list[str]) -> None:
    """Refuse, before anything is read or patched, weights stored in a format this pack cannot read:
    a ``ValueError`` naming the weight, its format and what to load instead. Reads no weight."""
    for key in keys:
        fmt = stored_format(stored_weight(model, key)[0])
        if fmt is not None:
            raise ValueError(f"this {model_type(model)} model's text-reading weight {key.removeprefix('diffusion_model.')} "
                             f"is stored as {fmt}, which this pack cannot read; {LOAD_INSTEAD}")


def text_width(model, keys: list[str]) -> int:
    """The text width ``d`` the readers take (in-features of the first), from its logical shape:
    nothing is dequantized, and packed storage (GGUF blocks, NVFP4 nibbles) is not mistaken for it."""
    return int(logical_shape(stored_weight(model, keys[0])[0])[1])


def _plain(t: Tensor) -> Tensor:
    """``t`` as a plain ``torch.Tensor`` (a view: GGMLTensor's class would follow every result)."""
    return t.as_subclass(Tensor) if type(t) not in (Tensor, torch.nn.Parameter) else t


def _gguf_float(weight, device: torch.device, layer=None) -> Tensor:
    """A GGMLTensor dequantized to a fresh float32 tensor on ``device``: the packed bytes are moved, then
    ComfyUI-GGUF's own ``dequantize_tensor`` (the gguf package's if that pack is not importable)."""
    shape = logical_shape(weight)
    if _gguf_type(weight) in TORCH_GGUF_TYPES:
        w = _plain(weight)
        return comfy.model_management.cast_to_device(w, device, None).to(torch.float32, copy=True).reshape(shape)
    moved = weight.to(device)  # GGMLTensor.to keeps tensor_type / tensor_shape
    fn = _gguf_dequantizer(weight)
    if fn is not None:
        dequant_dtype = getattr(layer, "dequant_dtype", None)  # what the layer's forward uses
        out = fn(moved, torch.float32, torch.float32 if dequant_dtype == "target" else dequant_dtype)
    else:
        import gguf

        out = torch.from_numpy(gguf.quants.dequantize(_plain(moved).cpu().numpy(), weight.tensor_type))
    out = _plain(out).to(device=device, dtype=torch.float32).reshape(shape)
    if out.data_ptr() == _plain(weight).data_ptr():  # never hand out the stored tensor itself
        out = out.clone()
    return out


def to_float(weight, device: torch.device, layer=None) -> Tensor:
    """A stored weight as a fresh float32 ``torch.Tensor`` on ``device`` (never the stored tensor):
    dequantized once if it is quantized, moved in its stored form first (one transfer, cast there)."""
    fmt = stored_format(weight)
    if fmt is not None:
        raise ValueError(f"a weight stored as {fmt} cannot be read; {LOAD_INSTEAD}")
    if _is_gguf(weight):
        return _gguf_float(weight, device, layer)
    w = comfy.model_management.cast_to_device(weight, device, None)
    if _is(w, "QuantizedTensor"):  # .to() keeps it quantized: read through its own dequantize
        w = w.dequantize()
    return _plain(w).to(torch.float32, copy=True)


def effective_weight(model, key: str, device: torch.device, *, include_erasures: bool = True) -> Tensor:
    """One weight as the model uses it (every patch applied; our erasures only if ``include_erasures``),
    float32 ``[out, in]`` (logical shape) on ``device``."""
    weight, convert, layer = stored_weight(model, key)
    w = convert(to_float(weight, device, layer), inplace=True)
    rest = list(model.patches.get(key, []))
    if not include_erasures:
        rest = [p for p in rest if not is_erasure_patch(p[1])]
    return comfy.lora.calculate_weight(rest, w, key, intermediate_dtype=torch.float32) if rest else w


def key_weights(model, keys: list[str], device: torch.device, *, include_erasures: bool,
                tick: Callable[[], None] | None = None):
    """Yield ``(key, W)``: each weight as the model will use it (float32 ``[out, in]``, on ``device``).

    Patches already on the model (LoRAs...) are applied with ComfyUI's own ``calculate_weight``;
    our own erasure patches are left out unless ``include_erasures``. One matrix at a time, each
    dequantized once; the stored weights are never written.
    """
    for key in keys:
        yield key, effective_weight(model, key, device, include_erasures=include_erasures)
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
    for name, readers in space_keys(model, arch, keys).items():
        space = erasure.spaces.get(name)
        width = space_width(model, arch, name, readers)
        if space is not None and space.dim != width:
            what = "pooled-text" if name == "pooled" else f"{name} (text space)"
            reads = "pooled text path" if name == "pooled" else f"{name} readers"
            raise ValueError(f"{node}: this erasure's {what} transform is {space.dim} wide but this "
                             f"{model_type(model)} model's {reads} read {width}")


class _Rows:
    """What ``fingerprint`` reads of a stored weight: its logical shape and a few rows as float, dequantizing
    only those rows where the storage allows it (GGUF blocks run along a row)."""

    def __init__(self, weight) -> None:
        self.weight, self.shape = weight, logical_shape(weight)

    def __getitem__(self, rows: list[int]) -> Tensor:
        w = self.weight
        if _is_gguf(w) and len(self.shape) == 2 and _gguf_type(w) not in TORCH_GGUF_TYPES:
            packed = _plain(w).reshape(self.shape[0], -1)[rows]
            try:
                part = type(w)(packed, tensor_type=w.tensor_type, tensor_shape=torch.Size([len(rows), self.shape[1]]))
            except TypeError:  # a GGMLTensor-like class with another constructor: read it whole
                return to_float(w, torch.device("cpu"))[rows]
            return _gguf_float(part, packed.device)
        if _is_gguf(w):
            return _plain(w).reshape(self.shape)[rows]
        return w[rows]


def base_fingerprint(model, keys: list[str]) -> str:
    """Fingerprint of the checkpoint's own text-reader weights (patches not applied; GGUF rows dequantized)."""
    return fingerprint({k: _Rows(stored_weight(model, k)[0]) for k in keys})


def pooled_keys(model, arch: Architecture | None = None) -> list[str]:
    """The weight keys reading the pooled text vector (Flux's ``vector_in``, SD3's ``y_embedder``, SDXL's
    ``label_emb``...), ``[]`` where the model has no pooled path."""
    arch = arch or architecture(model)[0]
    return arch.pooled_keys(model_type(model), list(model.model.state_dict().keys()))


def pooled_width(model, arch: Architecture, keys: list[str]) -> int:
    """Width of the pooled vector the pooled readers read (SDXL: the bigG columns of ``label_emb``)."""
    return arch.pooled_columns or in_features(model, keys[0])


def in_features(model, key: str) -> int:
    """The in-features of one weight, from its logical shape (packed storage is not mistaken for it)."""
    return int(logical_shape(stored_weight(model, key)[0])[1])


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


def layer_keys(model, arch: Architecture, edited: list[str] | None = None) -> dict[str, list[str]]:
    """Space name → reader keys of each encoder layer that is its own text space (HiDream's ``llama3.<layer>``:
    the ``caption_projection``s reading Llama-3 layer ``<layer>``), the rows' own readers ``edited`` left out;
    ``{}`` where the family has none or the config does not list the layers."""
    if arch.layers is None:
        return {}
    if edited is None:
        edited = architecture(model)[1]
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None)
    found = arch.layers.readers(list(model.model.state_dict().keys()), config)
    skip = set(edited)
    return {name: [k for k in keys if k not in skip] for name, keys in found.items() if any(k not in skip for k in keys)}


def space_keys(model, arch: Architecture, edited: list[str] | None = None) -> dict[str, list[str]]:
    """Every other text space of the model and its reader keys: ``pooled`` (where there is a pooled path) and
    each encoder layer that is its own space (``layer_keys``)."""
    pooled = arch.pooled_keys(model_type(model), list(model.model.state_dict().keys()))
    return ({"pooled": pooled} if pooled else {}) | layer_keys(model, arch, edited)


def space_width(model, arch: Architecture, name: str, keys: list[str]) -> int:
    """The width of text space ``name`` as its readers read it (the pooled columns only, for ``pooled``)."""
    return pooled_width(model, arch, keys) if name == "pooled" else in_features(model, keys[0])
