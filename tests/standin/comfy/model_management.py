"""Stand-in for ``comfy.model_management``: devices, casting, interruption."""

import os
import threading

import torch

interrupt_processing = False
interrupt_processing_mutex = threading.RLock()


class InterruptProcessingException(Exception):
    pass


def get_torch_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def cast_to(weight, dtype=None, device=None, non_blocking=False, copy=False):
    if not copy and (dtype is None or weight.dtype == dtype) and (device is None or weight.device == device):
        return weight
    return weight.to(device=device, dtype=dtype, copy=copy)


def cast_to_device(tensor, device, dtype, copy=False):
    return cast_to(tensor, dtype=dtype, device=device, copy=copy)


def get_free_memory(dev=None, torch_free_too=False):
    """Free bytes on ``dev``: MemAvailable on CPU (ComfyUI uses psutil's, the same figure), CUDA's own."""
    dev = get_torch_device() if dev is None else dev
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
        return (free, free) if torch_free_too else free
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    return (free, free) if torch_free_too else free


def interrupt_current_processing(value=True):
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()


current_loaded_models = []
"""Patchers whose patches are in their module's weights now (most recent first)."""


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    """As ComfyUI: a patcher already loaded stays; a clone of a loaded one (same module) unloads it first."""
    for m in models:
        if any(x is m and getattr(m.model, "current_weight_patches_uuid", None) == m.patches_uuid
               for x in current_loaded_models):
            continue
        for x in [x for x in current_loaded_models if x is m or m.is_clone(x)]:
            x.unpatch_model()
            current_loaded_models.remove(x)
        m.patch_model(m.load_device)
        current_loaded_models.insert(0, m)


def load_model_gpu(model):
    return load_models_gpu([model])


def free_memory(memory_required, device, keep_loaded=[]):
    """As ComfyUI: unload loaded patchers on ``device`` (least recent first), except ``keep_loaded``, until
    ``memory_required`` bytes are free; returns the unloaded ones."""
    unloaded = []
    for m in list(reversed(current_loaded_models)):
        if get_free_memory(device) > memory_required:
            break
        if m in keep_loaded or torch.device(m.load_device).type != torch.device(device).type:
            continue
        m.unpatch_model()
        current_loaded_models.remove(m)
        unloaded.append(m)
    return unloaded
