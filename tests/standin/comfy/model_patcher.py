"""Stand-in for ``comfy.model_patcher.ModelPatcher``: clone, weight patches, patching for use."""

import collections
import copy
import uuid

import torch

import comfy.lora
import comfy.model_management
import comfy.utils


def get_key_weight(model, key):
    op_keys = key.rsplit(".", 1)
    op = comfy.utils.get_attr(model, op_keys[0])
    return getattr(op, op_keys[1]), None, getattr(op, f"convert_{op_keys[1]}", None)


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size
        self.weight_inplace_update = weight_inplace_update
        self.patches = {}
        self.backup = {}
        self.hook_backup = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        self.patches_uuid = uuid.uuid4()
        self.parent = None

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size,
                           weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.backup = self.backup
        n.parent = self
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        p = set()
        model_sd = self.model.state_dict()
        for k in patches:
            offset = function = None
            if isinstance(k, str):
                key = k
            else:
                offset, key = k[1], k[0]
                if len(k) > 2:
                    function = k[2]
            if key in model_sd:
                p.add(k)
                self.patches.setdefault(key, []).append((strength_patch, patches[k], strength_model, offset, function))
        self.patches_uuid = uuid.uuid4()
        return list(p)

    def model_state_dict(self, filter_prefix=None):
        sd = self.model.state_dict()
        if filter_prefix is not None:
            sd = {k: v for k, v in sd.items() if k.startswith(filter_prefix)}
        return sd

    def get_key_patches(self, filter_prefix=None):
        p = {}
        for k in self.model_state_dict(filter_prefix):
            weight, _, convert_func = get_key_weight(self.model, k)
            if k in self.backup:
                weight = self.backup[k].weight
            if convert_func is None:
                convert_func = lambda a, **kwargs: a  # noqa: E731
            p[k] = [(weight, convert_func)] + self.patches.get(k, [])
        return p

    # loading: patches written into the weights (originals backed up), as ModelPatcher.patch_model does
    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        return comfy.utils.get_attr(self.model, name)

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return
        weight, _, convert_func = get_key_weight(self.model, key)
        if key not in self.backup:
            self.backup[key] = _Backup(weight.to(device=self.offload_device, copy=inplace_update), inplace_update)
        temp = weight.to(torch.float32, copy=True)
        if convert_func is not None:
            temp = convert_func(temp, inplace=True)
        out = comfy.lora.calculate_weight(self.patches[key], temp, key)
        comfy.utils.set_attr_param(self.model, key, out.to(weight.dtype))

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        for key in self.patches:
            self.patch_weight_to_device(key, device_to)
        self.model.current_weight_patches_uuid = self.patches_uuid
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for key in list(self.backup.keys()):
                comfy.utils.set_attr_param(self.model, key, self.backup[key].weight)
            self.backup.clear()
            self.model.current_weight_patches_uuid = None

    def detach(self, unpatch_all=True):
        self.unpatch_model(self.offload_device, unpatch_weights=unpatch_all)
        return self.model


_Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])
