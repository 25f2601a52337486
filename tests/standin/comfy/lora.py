"""Stand-in for ``comfy.lora.calculate_weight``: "diff" patches and weight adapters, in order."""

import torch

import comfy.model_management
from comfy import weight_adapter


def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):
    for strength, v, strength_model, offset, function in patches:
        if function is None:
            function = lambda a: a  # noqa: E731
        old_weight = None
        if offset is not None:
            old_weight = weight
            weight = weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(v, weight_adapter.WeightAdapterBase):
            weight = v.calculate_weight(weight, key, strength, strength_model, offset, function,
                                        intermediate_dtype, original_weights)
        else:
            patch_type, v = ("diff", v) if len(v) == 1 else v
            if patch_type != "diff":
                raise NotImplementedError(f"stand-in supports diff patches only, got {patch_type}")
            if strength != 0.0:
                weight += function(strength * comfy.model_management.cast_to_device(v[0], weight.device, weight.dtype))
        if old_weight is not None:
            weight = old_weight
    return weight
