"""Stand-in for current ``comfy.quant_ops.QuantizedTensor`` (comfy-kitchen's): fp8 data with a scale."""

import torch


class QuantizedTensor(torch.Tensor):
    """A ``[out, in]`` weight stored as float8_e4m3fn ``qdata`` and a float32 ``scale``.

    It presents the logical shape and dtype; any torch operation sees the dequantized tensor.
    """

    @staticmethod
    def __new__(cls, qdata, scale, orig_dtype):
        return torch.Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=orig_dtype, device=qdata.device)

    def __init__(self, qdata, scale, orig_dtype):
        self.qdata, self.scale, self.orig_dtype = qdata, scale, orig_dtype

    @classmethod
    def quantize(cls, tensor, dtype=torch.float8_e4m3fn):
        scale = tensor.abs().amax().float() / torch.finfo(dtype).max
        return cls((tensor.float() / scale).to(dtype), scale, tensor.dtype)

    def dequantize(self):
        return (self.qdata.float() * self.scale).to(self.orig_dtype)

    def __repr__(self):
        return f"QuantizedTensor(shape={tuple(self.shape)}, storage={self.qdata.dtype})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:  # parameters and state dicts keep the storage
            return QuantizedTensor(args[0].qdata, args[0].scale, args[0].orig_dtype)
        def plain(a):
            return a.dequantize() if isinstance(a, QuantizedTensor) else a
        args = torch.utils._pytree.tree_map(plain, args)
        kwargs = torch.utils._pytree.tree_map(plain, kwargs or {})
        return func(*args, **kwargs)
