"""Stand-in for ``comfy.weight_adapter.base``."""

import torch


class WeightAdapterBase:
    name: str
    loaded_keys: set
    weights: list

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        raise NotImplementedError
