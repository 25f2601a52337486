"""Stand-in for current ``comfy.model_patcher``: the 0.3.64 stand-in's ModelPatcher, with
non-tensor weights skipped by ``get_key_patches`` and the dynamic-VRAM ``LowVramPatch``."""

import importlib.util
import os

import torch

import comfy.lora

_spec = importlib.util.spec_from_file_location(
    "_rece_standin_0364_model_patcher",
    os.path.join(os.path.dirname(__file__), "..", "..", "standin", "comfy", "model_patcher.py"))
_old = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_old)
get_key_weight = _old.get_key_weight


class ModelPatcher(_old.ModelPatcher):
    def get_key_patches(self, filter_prefix=None):
        p = super().get_key_patches(filter_prefix)
        return {k: v for k, v in p.items() if isinstance(v[0][0], torch.Tensor)}


class LowVramPatch:
    """A layer's patches, prepared (adapters rebuilt into one buffer) before its weight is cast."""

    def __init__(self, key, patches, convert_func=None, set_func=None):
        self.key, self.patches = key, patches
        self.prepared_patches = None

    def memory_required(self):
        counter = [0]
        for patch in self.patches[self.key]:
            comfy.lora.prefetch_prepared_value(patch[1], counter, None, None, False)
        return counter[0]

    def prepare(self, destination, stream, copy=True, commit=True):
        counter = [0]
        prepared = [(p[0], comfy.lora.prefetch_prepared_value(p[1], counter, destination, stream, copy), p[2], p[3], p[4])
                    for p in self.patches[self.key]]
        if commit:
            self.prepared_patches = prepared
        return prepared

    def __call__(self, weight):
        patches = self.prepared_patches if self.prepared_patches is not None else self.patches[self.key]
        return comfy.lora.calculate_weight(patches, weight, self.key, intermediate_dtype=weight.dtype)
