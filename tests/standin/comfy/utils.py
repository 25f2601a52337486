"""Stand-in for ``comfy.utils``: attribute access and the progress bar."""

import torch

PROGRESS_BAR_HOOK = None


def load_torch_file(ckpt, safe_load=False, device=None, return_metadata=False):
    """safetensors files only (the stand-in never unpickles)."""
    import safetensors.torch

    if not ckpt.lower().endswith((".safetensors", ".sft")):
        raise ValueError(f"stand-in load_torch_file reads safetensors only: {ckpt}")
    sd = safetensors.torch.load_file(ckpt, device=(device or torch.device("cpu")).type)
    return (sd, None) if return_metadata else sd


def set_progress_bar_global_hook(function):
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


def get_attr(obj, attr: str):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.hook = PROGRESS_BAR_HOOK
        self.node_id = node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        if value > self.total:
            value = self.total
        self.current = value
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)


def repeat_to_batch_size(tensor, batch_size, dim=0):
    if tensor.shape[dim] > batch_size:
        return tensor.narrow(dim, 0, batch_size)
    if tensor.shape[dim] < batch_size:
        reps = [1] * tensor.ndim
        reps[dim] = -(-batch_size // tensor.shape[dim])
        return tensor.repeat(reps).narrow(dim, 0, batch_size)
    return tensor


def set_attr(obj, attr: str, value):
    attrs = attr.split(".")
    for name in attrs[:-1]:
        obj = getattr(obj, name)
    prev = getattr(obj, attrs[-1])
    setattr(obj, attrs[-1], value)
    return prev


def set_attr_param(obj, attr: str, value):
    import torch

    return set_attr(obj, attr, torch.nn.Parameter(value, requires_grad=False))
