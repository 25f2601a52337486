"""Stand-in for current ``comfy.weight_adapter.base``: shape and bypass hooks of an adapter."""

import torch


class WeightAdapterBase:
    name: str
    loaded_keys: set
    weights: list

    def calculate_shape(self, key):
        return None

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        raise NotImplementedError

    def h(self, x, base_out):
        raise NotImplementedError(f"{type(self).__name__} has no bypass component")

    def g(self, y):
        return y

    def bypass_forward(self, org_forward, x, *args, **kwargs):
        base_out = org_forward(x, *args, **kwargs)
        return self.g(base_out + self.h(x, base_out))
