"""The erasure as a ComfyUI weight adapter: ``W ↦ W + strength · (W U) Vᵀ`` on the weight it is given.

The patch is computed from the weight as ComfyUI hands it over at patch time (the checkpoint's
weight with every patch added before ours, e.g. a LoRA), so it is always ``W (P − I)`` of the
weight the model really uses. It holds only the two thin factors, shared by every layer.

It follows the adapter contract of ComfyUI from 0.3.64 to current releases:
- all state is in ``weights = (up [d, r], down [r, d] or None)`` (``None``: ``P − I = up`` is dense),
  so ComfyUI's dynamic-VRAM path can rebuild it as ``type(a)(a.loaded_keys, a.weights)`` with the
  tensors moved or cast;
- ``calculate_shape`` (the weight's shape is unchanged);
- ``bypass_forward``: with the weight left alone (quantized, offloaded), the layer's own forward is
  applied to ``x Pᵀ``: ``W (x Pᵀ)ᵀ + b = W' x + b``, exact, the bias untouched.
Arithmetic is float32 (float64 for float64 weights) whatever the weight's dtype, with one cast back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from comfy.model_management import cast_to_device
from comfy.weight_adapter.base import WeightAdapterBase

from ..rece_core import LowRankTransform

NAME = "rece"


def is_erasure_patch(value: object) -> bool:
    """A RECE erasure adapter (recognised by its contract, not by object identity)."""
    return isinstance(value, WeightAdapterBase) and getattr(value, "name", None) == NAME


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class ErasurePatch(WeightAdapterBase):
    """A weight adapter carrying one erasure ``P = I + up @ down``; ComfyUI's ``calculate_weight`` calls it."""

    name = NAME
    multiplier = 1.0  # bypass strength; ComfyUI's bypass hook sets it per adapter

    def __init__(self, loaded_keys: set[str], weights: tuple[Tensor, Tensor | None]) -> None:
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def of(cls, transform: LowRankTransform) -> "ErasurePatch":
        """The adapter of ``transform`` (float32 factors; a dense ``P − I`` keeps ``down = None``)."""
        t = transform.to(dtype=torch.float32)
        return cls(set(), (t.up.contiguous(), None if t.is_dense else t.down.contiguous()))

    def transform(self) -> LowRankTransform:
        """``P`` as a ``LowRankTransform`` (float32, on the factors' device)."""
        up, down = self.weights[0], self.weights[1]
        if down is None:
            down = torch.eye(up.shape[0], dtype=up.dtype, device=up.device)
        return LowRankTransform(up.float(), down.float())

    def calculate_shape(self, key: str) -> None:
        return None  # the weight keeps its shape

    def _factors(self, like: Tensor) -> tuple[Tensor, Tensor | None]:
        """``up``, ``down`` on ``like``'s device and in its dtype."""
        up, down = self.weights[0], self.weights[1]
        up = cast_to_device(up, like.device, like.dtype)
        return up, None if down is None else cast_to_device(down, like.device, like.dtype)

    def weight_delta(self, w: Tensor) -> Tensor:
        """``W (P − I) = (W up) down`` for ``w: [out, d]`` (``W up`` when dense)."""
        up, down = self._factors(w)
        wu = w @ up
        return wu if down is None else wu @ down

    def row_delta(self, x: Tensor) -> Tensor:
        """``x (P − I)ᵀ = (x downᵀ) upᵀ`` for rows ``x: [..., d]`` (``x upᵀ`` when dense)."""
        up, down = self._factors(x)
        return (x if down is None else x @ down.T) @ up.T

    def calculate_weight(self, weight: Tensor, key: str, strength: float, strength_model: float, offset,
                         function: Callable[[Tensor], Tensor] | None,
                         intermediate_dtype: torch.dtype = torch.float32, original_weight=None) -> Tensor:
        """``W + strength · W (P − I)`` written into ``weight`` (views from ``offset`` stay valid); returned as a
        plain tensor. The factors are moved to the weight's device here (ComfyUI-GGUF does not move adapters)."""
        if strength == 0.0:
            return weight
        function = function or (lambda a: a)
        # A tensor subclass is written through a plain view of its memory: ComfyUI-GGUF's GGMLTensor
        # (F16/F32 weights) only warns when its copy_ fails, and its clone()/detach() return itself.
        target = weight if type(weight) in (Tensor, torch.nn.Parameter) else weight.as_subclass(Tensor)
        w = target.to(_compute_dtype(target.dtype))
        target.copy_(w + function(strength * self.weight_delta(w)))
        return target

    def bypass_forward(self, org_forward: Callable[..., Tensor], x: Tensor, *args, **kwargs) -> Tensor:
        """The layer's own forward on ``x + t · x (P − I)ᵀ``: exactly ``W' x + b``."""
        t = getattr(self, "multiplier", 1.0)
        if t == 0.0:
            return org_forward(x, *args, **kwargs)
        x32 = x.to(_compute_dtype(x.dtype))
        moved = x32 + t * self.row_delta(x32)
        return org_forward(moved.to(x.dtype), *args, **kwargs)

