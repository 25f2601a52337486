"""The erasure as a ComfyUI weight patch: ``W ↦ W + strength · (W U) Vᵀ`` on the weight it is given.

The patch is computed from the weight as ComfyUI hands it over at patch time (the checkpoint's
weight with every patch added before ours, e.g. a LoRA), so it is always ``W (P − I)`` of the
weight the model really uses. It holds only the two thin factors, shared by every layer.
"""

from __future__ import annotations

import torch
from comfy.model_management import cast_to_device
from comfy.weight_adapter.base import WeightAdapterBase

from ..rece_core import Erasure


class ErasurePatch(WeightAdapterBase):
    """A weight adapter carrying one ``Erasure``; ComfyUI's ``calculate_weight`` calls it."""

    name = "rece"

    def __init__(self, erasure: Erasure) -> None:
        self.erasure = erasure
        self.loaded_keys: set[str] = set()
        self.weights = [erasure.transform.up, erasure.transform.down]
        self.dense = erasure.transform.is_dense  # down = I: W (P − I) is one product

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        if strength == 0.0:
            return weight
        up = cast_to_device(self.weights[0], weight.device, intermediate_dtype)
        w = weight.to(intermediate_dtype)
        delta = w @ up
        if not self.dense:
            delta = delta @ cast_to_device(self.weights[1], weight.device, intermediate_dtype)
        weight += function(strength * delta).type(weight.dtype)
        return weight
