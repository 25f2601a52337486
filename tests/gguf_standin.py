"""CI-tier stand-in for what this pack touches of city96's ComfyUI-GGUF (written for this project from
reading its ``ops.py``, ``dequant.py``, ``loader.py`` and ``nodes.py``; none of its code is here).

- ``GGMLTensor``: a tensor holding a GGUF tensor's bytes. Its torch shape is the packed storage
  (``[rows, bytes]`` for quantized types); ``.shape`` answers the logical ``tensor_shape``; ``.to()``
  keeps ``tensor_type``/``tensor_shape``/``patches``; ``clone()``/``detach()`` return the tensor itself;
  ``copy_`` only logs when it fails.
- ``dequantize_tensor(tensor, dtype, dequant_dtype)``: defined next to ``GGMLTensor`` (ComfyUI-GGUF's
  ``ops`` module imports it), for F32/F16 (plain torch), BF16 and Q8_0 (the GGML block formats).
- ``GGMLLinear``: a layer like ``GGMLLayer`` + ``Linear``. Its state dict holds meta tensors for a
  quantized weight, and the layer of the largest quantized tensor adds a fake ``<layer>.temp.weight``
  (ComfyUI-GGUF's VRAM estimate); its forward dequantizes and applies the weight's patches with
  ``comfy.lora.calculate_weight``.
- ``sampled_weight``: the weight a GGUF model samples with, as ``GGUFModelPatcher.patch_weight_to_device``
  and ``GGMLLayer.get_weight`` make it (quantized: dequantized then patched; F16/F32: a float32
  GGMLTensor copy patched, rounded back to the stored dtype).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

import comfy.lora
import comfy.model_patcher
import comfy.utils

TORCH_TYPES = ("F32", "F16")
DEQUANTIZE_CALLS: list[tuple[int, ...]] = []  # the logical shape of every dequantization, for the tests


class QType(str):
    """A GGML type (``.name``, as gguf's ``GGMLQuantizationType``)."""

    @property
    def name(self) -> str:
        return str(self)


class GGMLTensor(torch.Tensor):
    def __new__(cls, data, *, tensor_type, tensor_shape, patches=None):
        return super().__new__(cls, data)

    def __init__(self, data, *, tensor_type, tensor_shape, patches=None):
        super().__init__()
        self.tensor_type, self.tensor_shape, self.patches = tensor_type, tensor_shape, list(patches or [])

    def to(self, *args, **kwargs):
        out = super().to(*args, **kwargs)
        out.tensor_type = getattr(self, "tensor_type", None)
        out.tensor_shape = getattr(self, "tensor_shape", out.data.shape)
        out.patches = list(getattr(self, "patches", []))
        return out

    def clone(self, *args, **kwargs):
        return self

    def detach(self, *args, **kwargs):
        return self

    def copy_(self, *args, **kwargs):
        try:
            return super().copy_(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- ComfyUI-GGUF logs and carries on
            logging.warning(f"ignoring 'copy_' on tensor: {exc}")

    @property
    def shape(self):
        if not hasattr(self, "tensor_shape"):
            self.tensor_shape = self.size()
        return self.tensor_shape


def _quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks of 32 along each row: float16 scale ``d = max|x| / 127`` then 32 int8 ``round(x / d)``."""
    rows, cols = w.shape
    blocks = w.float().reshape(rows, cols // 32, 32)
    d = (blocks.abs().amax(-1, keepdim=True) / 127).to(torch.float16)
    q = torch.where(d.float() > 0, blocks / d.float(), torch.zeros_like(blocks)).round().clamp(-127, 127).to(torch.int8)
    packed = torch.cat([d.view(torch.uint8).reshape(rows, cols // 32, 2), q.view(torch.uint8)], dim=-1)
    return packed.reshape(rows, cols // 32 * 34)


def _dequantize_q8_0(packed: torch.Tensor, shape) -> torch.Tensor:
    blocks = packed.reshape(-1, 34)
    d = blocks[:, :2].contiguous().view(torch.float16)
    q = blocks[:, 2:].contiguous().view(torch.int8)
    return (d * q).reshape(shape)  # float16, as ComfyUI-GGUF's default dequant_dtype (None)


def gguf_tensor(w: torch.Tensor, qtype: str) -> GGMLTensor:
    """``w`` stored as a GGUF tensor of type ``qtype`` (F32, F16, BF16, Q8_0), as ``gguf_sd_loader`` returns it."""
    shape = w.shape
    if qtype == "F32":
        data = w.float().contiguous()
    elif qtype == "F16":
        data = w.to(torch.float16).contiguous()
    elif qtype == "BF16":
        data = w.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(shape[0], -1)
    elif qtype == "Q8_0":
        data = _quantize_q8_0(w)
    else:  # bytes no dequantizer here knows (e.g. an IQ type)
        data = torch.zeros(shape[0], shape[1] // 256 * 66, dtype=torch.uint8)
    return GGMLTensor(data, tensor_type=QType(qtype), tensor_shape=torch.Size(shape))


def is_quantized(t) -> bool:
    return t is not None and str(getattr(t, "tensor_type", "F32")) not in TORCH_TYPES


def dequantize_tensor(tensor, dtype=None, dequant_dtype=None):
    """ComfyUI-GGUF's signature: F32/F16 by ``.to(dtype)`` (the GGMLTensor class stays), others from blocks."""
    qtype = str(getattr(tensor, "tensor_type", "F32"))
    shape = getattr(tensor, "tensor_shape", tensor.size())
    if qtype in TORCH_TYPES:
        return tensor.to(dtype)
    DEQUANTIZE_CALLS.append(tuple(shape))
    data = torch.Tensor(tensor)  # plain view of the bytes
    if qtype == "BF16":
        out = (data.reshape(-1, 2).view(torch.int16).to(torch.int32) << 16).view(torch.float32).reshape(shape)
    elif qtype == "Q8_0":
        out = _dequantize_q8_0(data, shape)
        if dequant_dtype is not None:
            out = out.to(dequant_dtype)
    else:
        raise NotImplementedError(f"no dequantizer for {qtype}")
    return out.to(dtype)


dequantize_functions = {QType("BF16"): None, QType("Q8_0"): None}  # the types dequantize_tensor knows


class GGMLLinear(nn.Module):
    """A Linear layer whose weight is a GGMLTensor (ComfyUI-GGUF's ``GGMLOps.Linear``): ComfyUI's cast-op
    contract (``comfy_cast_weights`` true on the class, ``weight_function``/``bias_function`` lists) decides
    between its dequantizing forward and the plain ``F.linear`` one, as ComfyUI's ``manual_cast.Linear.forward``."""

    dequant_dtype = None
    patch_dtype = None
    comfy_cast_weights = True
    weight_function: list = []
    bias_function: list = []

    def __init__(self, weight: GGMLTensor, largest: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None
        self.largest_layer = largest
        self.out_features, self.in_features = (int(n) for n in weight.tensor_shape)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not is_quantized(self.weight):
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = torch.zeros_like(self.weight, device="meta")  # for VRAM estimates
        if self.largest_layer:
            destination[prefix + "temp.weight"] = torch.empty(*self.weight.tensor_shape, device="meta",
                                                              dtype=torch.float16)

    def get_weight(self, tensor, dtype):
        patches = [p for ps, _ in getattr(tensor, "patches", []) for p in ps]
        key = next((k for _, k in getattr(tensor, "patches", [])), None)
        w = dequantize_tensor(tensor, dtype, self.dequant_dtype)
        if isinstance(w, GGMLTensor):
            w = torch.Tensor(w)
        return comfy.lora.calculate_weight(patches, w, key) if patches else w

    def forward(self, x):
        if self.comfy_cast_weights or self.weight_function or self.bias_function:
            return torch.nn.functional.linear(x, self.get_weight(self.weight, x.dtype))
        return torch.nn.functional.linear(x, self.weight, self.bias)


def make_gguf_model(types: dict[str, str] | str, arch: str = "tiny", seed: int = 0, config: str = "SD15"):
    """A ModelPatcher whose text readers (factory's tiny model's ``attn2.to_k``/``to_v``) are GGUF layers.

    ``types``: one GGUF type for every reader, or ``{key: type}``. The largest quantized weight is
    marked as ComfyUI-GGUF's loader marks it. Returns ``(model, {key: float weight as stored})``.
    """
    from rece_core.toy import cross_attention_weights

    state = cross_attention_weights(arch, seed=seed)
    types = types if isinstance(types, dict) else {k: types for k in state}
    tensors = {k: gguf_tensor(w, types[k]) for k, w in state.items()}
    quantized = [k for k, t in tensors.items() if is_quantized(t)]
    largest = max(quantized, key=lambda k: tensors[k].tensor_shape.numel(), default=None)
    root = nn.Module()
    for key, t in tensors.items():
        *path, leaf = key.split(".")
        node = root
        for part in path[:-1]:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.add_module(path[-1], GGMLLinear(t, largest=key == largest))
    g = torch.Generator().manual_seed(seed + 1000)
    root.diffusion_model.register_parameter("conv_in", nn.Parameter(torch.randn(8, 4, 3, 3, generator=g),
                                                                    requires_grad=False))
    root.model_config = type(config, (), {})()
    root.device = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(root, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    dequantized = {k: dequantize_tensor(t, torch.float32).as_subclass(torch.Tensor).float().clone()
                   for k, t in tensors.items()}
    DEQUANTIZE_CALLS.clear()
    return model, dequantized


def sampled_weight(model, key: str) -> torch.Tensor:
    """The weight the GGUF model samples with (float32), as ComfyUI-GGUF patches and dequantizes it."""
    weight = comfy.utils.get_attr(model.model, key)
    patches = model.patches.get(key, [])
    if is_quantized(weight):
        held = weight.to(weight.device)  # the stored tensor itself, as on a CPU model
        held.patches = [(patches, key)]
        layer = comfy.utils.get_attr(model.model, key.rsplit(".", 1)[0])
        try:
            return layer.get_weight(held, torch.float32).float()
        finally:
            held.patches = []
    temp = weight.to(torch.float32, copy=True)  # a GGMLTensor: what the adapter is handed
    out = comfy.lora.calculate_weight(patches, temp, key) if patches else temp
    return torch.Tensor(out.to(weight.dtype)).float()

