"""Stand-in for ``comfy.weight_adapter.lora.LoRAAdapter``: regular ``lora_up``/``lora_down`` LoRAs only."""

import torch

import comfy.model_management
from comfy.weight_adapter.base import WeightAdapterBase


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        if loaded_keys is None:
            loaded_keys = set()
        up_name, down_name = f"{x}.lora_up.weight", f"{x}.lora_down.weight"
        if up_name not in lora:
            return None
        loaded_keys.update({up_name, down_name})
        return cls(loaded_keys, (lora[up_name], lora[down_name], alpha, None, dora_scale, None))

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        v = self.weights
        mat1 = comfy.model_management.cast_to_device(v[0], weight.device, intermediate_dtype)
        mat2 = comfy.model_management.cast_to_device(v[1], weight.device, intermediate_dtype)
        alpha = v[2] / mat2.shape[0] if v[2] is not None else 1.0
        lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
        weight += function(((strength * alpha) * lora_diff).type(weight.dtype))
        return weight
