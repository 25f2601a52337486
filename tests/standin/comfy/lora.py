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


def model_lora_keys_unet(model, key_map={}):
    """Generic names only: ``lora_unet_<key with _>`` and ``diffusion_model.<key>`` for every weight."""
    for k in model.state_dict().keys():
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_lora = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
                key_map["lora_unet_{}".format(key_lora)] = k
                key_map["{}".format(k[:-len(".weight")])] = k
            else:
                key_map["{}".format(k)] = k
    return key_map


def load_lora(lora, to_load, log_missing=True):
    """Weight adapters (and ``.diff`` full differences) of ``lora`` for the keys of ``to_load``."""
    patch_dict = {}
    loaded_keys = set()
    for x in to_load:
        alpha_name = "{}.alpha".format(x)
        alpha = None
        if alpha_name in lora.keys():
            alpha = lora[alpha_name].item()
            loaded_keys.add(alpha_name)
        for adapter_cls in weight_adapter.adapters:
            adapter = adapter_cls.load(x, lora, alpha, None, loaded_keys)
            if adapter is not None:
                patch_dict[to_load[x]] = adapter
                loaded_keys.update(adapter.loaded_keys)
                continue
        diff_name = "{}.diff".format(x)
        if lora.get(diff_name) is not None:
            patch_dict[to_load[x]] = ("diff", (lora[diff_name],))
            loaded_keys.add(diff_name)
    return patch_dict
