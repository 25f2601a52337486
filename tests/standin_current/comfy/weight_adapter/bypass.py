"""Stand-in for current ``comfy.weight_adapter.bypass``: run an adapter inside a layer's forward."""

import torch

import comfy.model_management
from .base import WeightAdapterBase


class BypassForwardHook:
    """Wraps ``module.forward``; the module's weight is never modified."""

    def __init__(self, module, adapter, multiplier=1.0):
        self.module, self.adapter = module, adapter
        self.original_forward = None
        adapter.multiplier = multiplier
        adapter.is_conv = isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))

    def _bypass_forward(self, x, *args, **kwargs):
        if type(self.adapter).bypass_forward is not WeightAdapterBase.bypass_forward:
            return self.adapter.bypass_forward(self.original_forward, x, *args, **kwargs)
        base_out = self.original_forward(x, *args, **kwargs)
        return self.adapter.g(base_out + self.adapter.h(x, base_out))

    def inject(self):
        if self.original_forward is not None:
            return
        dtype = getattr(getattr(self.module, "weight", None), "dtype", None)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dtype = None  # quantized layers keep the adapter's own dtype
        device = comfy.model_management.get_torch_device()
        self.adapter.weights = type(self.adapter.weights)(
            w.to(device=device, dtype=dtype) if isinstance(w, torch.Tensor) and dtype is not None
            else w.to(device=device) if isinstance(w, torch.Tensor) else w
            for w in self.adapter.weights)
        self.original_forward = self.module.forward
        self.module.forward = self._bypass_forward

    def eject(self):
        if self.original_forward is not None:
            self.module.forward = self.original_forward
            self.original_forward = None
