"""Stand-in for current ``comfy.quant_ops``: comfy-kitchen's real ``QuantizedTensor`` where comfy-kitchen is
installed (as current ComfyUI imports it; ``scripts/test.sh`` installs it), otherwise a small fp8-only
stand-in with the real one's behaviour: it stays quantized through ``.to``/``clone``/``detach``/``copy_``,
presents the logical shape and dtype, reads through ``dequantize()``, and ``state_dict(prefix)`` gives
the packed storage."""

import torch

try:
    from comfy_kitchen.tensor import QuantizedLayout, QuantizedTensor, get_layout_class, register_layout_class

    KITCHEN = True
except ImportError:
    KITCHEN = False

    class QuantizedTensor(torch.Tensor):
        """A ``[out, in]`` weight stored as float8_e4m3fn ``_qdata`` with a float32 per-tensor scale."""

        @staticmethod
        def __new__(cls, qdata, layout_cls, params):
            return torch.Tensor._make_wrapper_subclass(cls, params["orig_shape"], dtype=params["orig_dtype"],
                                                       device=qdata.device, requires_grad=False)

        def __init__(self, qdata, layout_cls, params):
            self._qdata, self._layout_cls, self._params = qdata, layout_cls, params

        @classmethod
        def from_float(cls, tensor, layout_cls="TensorCoreFP8Layout", **kwargs):
            if layout_cls != "TensorCoreFP8Layout":
                raise NotImplementedError(f"the stand-in has fp8 only, not {layout_cls}; install comfy-kitchen")
            scale = tensor.abs().amax().float() / torch.finfo(torch.float8_e4m3fn).max
            qdata = (tensor.float() / scale).to(torch.float8_e4m3fn)
            return cls(qdata, layout_cls, {"scale": scale, "orig_dtype": tensor.dtype,
                                           "orig_shape": tuple(tensor.shape)})

        @property
        def storage_shape(self):
            return tuple(self._qdata.shape)

        def dequantize(self):
            return (self._qdata.float() * self._params["scale"]).to(self._params["orig_dtype"])

        def state_dict(self, prefix=""):
            return {prefix: self._qdata, f"{prefix}_scale": self._params["scale"]}

        def __repr__(self):
            return f"QuantizedTensor(shape={tuple(self.shape)}, storage={self._qdata.dtype})"

        def _with(self, qdata, **params):
            return QuantizedTensor(qdata, self._layout_cls, {**self._params, **params})

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            qt = args[0]
            aten = torch.ops.aten
            if func in (aten.detach.default, aten.alias.default):
                return qt._with(qt._qdata)
            if func is aten.clone.default:
                return qt._with(qt._qdata.clone())
            if func in (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout):
                device, dtype = kwargs.get("device"), kwargs.get("dtype")
                for a in args[1:]:
                    device = a if isinstance(a, torch.device) else device
                    dtype = a if isinstance(a, torch.dtype) else dtype
                qdata = qt._qdata.to(device) if device is not None else qt._qdata.clone()
                return qt._with(qdata, orig_dtype=dtype or qt._params["orig_dtype"])
            if func is aten.copy_.default:
                if not isinstance(args[1], QuantizedTensor):
                    raise TypeError(f"Cannot copy {type(args[1]).__name__} to QuantizedTensor")
                qt._qdata.copy_(args[1]._qdata)
                qt._params["scale"] = args[1]._params["scale"].clone()
                return qt

            def plain(a):
                return a.dequantize() if isinstance(a, QuantizedTensor) else a

            args = torch.utils._pytree.tree_map(plain, args)
            kwargs = torch.utils._pytree.tree_map(plain, kwargs)
            return func(*args, **kwargs)
