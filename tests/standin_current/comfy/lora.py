"""Stand-in for current ``comfy.lora``: the 0.3.64 stand-in's ``calculate_weight`` plus adapter
shapes and the dynamic-VRAM rebuild of adapters."""

import importlib.util
import os

import torch

from comfy import weight_adapter

_spec = importlib.util.spec_from_file_location(
    "_rece_standin_0364_lora", os.path.join(os.path.dirname(__file__), "..", "..", "standin", "comfy", "lora.py"))
_old = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_old)
calculate_weight = _old.calculate_weight
model_lora_keys_unet = _old.model_lora_keys_unet
load_lora = _old.load_lora

ALIGN = 256


def calculate_shape(patches, weight, key, original_weights=None):
    shape = weight.shape
    for p in patches:
        v, offset = p[1], p[3]
        if offset is None and isinstance(v, weight_adapter.WeightAdapterBase):
            shape = v.calculate_shape(key) or shape
    return shape


def _aligned(t):
    n = t.numel() * t.element_size()
    return -(-n // ALIGN) * ALIGN


def prefetch_prepared_value(value, counter, destination, stream, copy):
    """Tensors re-homed in one uint8 buffer; adapters rebuilt as ``type(a)(a.loaded_keys, a.weights)``."""
    if isinstance(value, torch.Tensor):
        size, offset = _aligned(value), counter[0]
        counter[0] += size
        if destination is None:
            return value
        raw = destination[offset:offset + value.numel() * value.element_size()]
        if copy:
            raw.copy_(value.detach().contiguous().reshape(-1).view(torch.uint8))
        return raw.view(value.dtype).view(value.shape)
    if isinstance(value, weight_adapter.WeightAdapterBase):
        return type(value)(value.loaded_keys, prefetch_prepared_value(value.weights, counter, destination, stream, copy))
    if isinstance(value, tuple):
        return tuple(prefetch_prepared_value(v, counter, destination, stream, copy) for v in value)
    if isinstance(value, list):
        return [prefetch_prepared_value(v, counter, destination, stream, copy) for v in value]
    return value
