"""The diffusion model and the text encoder as differentiable functions of our own tensors.

ComfyUI runs every node under ``torch.inference_mode()``, so the weights it loaded are inference
tensors that autograd cannot save. Here every weight a forward reads is a *copy* (float32, on the
compute device, patches applied) passed in with ``torch.func.functional_call``: gradients reach
trained tensors (LoRA factors, embeddings) and the loaded MODEL and CLIP are never written.

- ``Denoiser``: ``model.model.apply_model`` (ComfyUI's own call: ``model_sampling`` input scaling and
  denoised output) with the diffusion model's weights as we give them; ``loss(...)`` the denoising loss
  in the model's own parameterisation (ε, v, flow) per sample.
- ``TokenEncoder``: the CLIP's ``encode_token_weights`` on a prompt whose one word is a vector we
  give (what ComfyUI's ``embedding:`` syntax feeds the same encoder).
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Callable, Collection

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ...rece_core.train import checkpointed, saved_copies

import comfy.model_management

from . import architectures
from . import weights as host_weights


def _check() -> None:
    """ComfyUI's Cancel, checked before every model call: within a training step, not only between steps."""
    comfy.model_management.throw_exception_if_processing_interrupted()


class _Call(nn.Module):
    """A module holding ``inner`` whose forward is ``fn(inner, *args)`` (for ``functional_call``)."""

    def __init__(self, inner: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.m = inner
        self.fn = fn

    def forward(self, *args):
        return self.fn(self.m, *args)


REFUSED_SAMPLING = ("EDM", "X0", "IMG_TO_IMG", "COSMOS_RFLOW")
"""ComfyUI sampling classes that subclass EPS / V_PREDICTION / CONST but predict something else."""


def parameterisation(model_sampling) -> str:
    """``eps``, ``v`` or ``flow`` from ComfyUI's model-sampling classes, or a clear error (every training
    method computes its denoising loss in one of these three)."""
    names = [c.__name__ for c in type(model_sampling).__mro__]
    for refused in REFUSED_SAMPLING:
        if refused in names:
            raise ValueError(f"this model predicts with {refused} sampling, which the training loss does not "
                             "cover yet (eps, v and flow are)")
    for name, kind in (("V_PREDICTION", "v"), ("CONST", "flow"), ("EPS", "eps")):
        if name in names:
            return kind
    raise ValueError(f"this model's sampling ({type(model_sampling).__name__}) is not ε, v or flow prediction; "
                     "the training methods cannot compute its denoising loss")


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _cast(t: Tensor | None, x: Tensor) -> Tensor | None:
    """``t`` in ``x``'s dtype and device (a no-op when they match), as ComfyUI's cast layers compute."""
    return None if t is None else t.to(device=x.device, dtype=x.dtype)


def _linear(module: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    """A ComfyUI linear layer's forward on the tensors it holds, as plain torch (AWQ input scale kept)."""
    scale = getattr(module, "pre_quant_scale", None)
    if scale is not None:
        x = x * scale.to(x.device, x.dtype)
    return torch.nn.functional.linear(x, _cast(module.weight, x), _cast(module.bias, x))


def _conv(module: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    extra = {"autopad": kwargs["autopad"]} if "autopad" in kwargs else {}  # ComfyUI's Conv3d (video models)
    return module._conv_forward(x, _cast(module.weight, x), _cast(module.bias, x), **extra)


def _group_norm(module: nn.Module, x: Tensor) -> Tensor:
    return torch.nn.functional.group_norm(x, module.num_groups, _cast(module.weight, x), _cast(module.bias, x),
                                          module.eps)


def _layer_norm(module: nn.Module, x: Tensor) -> Tensor:
    return torch.nn.functional.layer_norm(x, module.normalized_shape, _cast(module.weight, x),
                                          _cast(module.bias, x), module.eps)


def _rms_norm(module: nn.Module, x: Tensor) -> Tensor:
    return torch.nn.functional.rms_norm(x, module.normalized_shape, _cast(module.weight, x), module.eps)


def _embedding(module: nn.Module, ids: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    out = torch.nn.functional.embedding(ids, module.weight, module.padding_idx, module.max_norm, module.norm_type,
                                        module.scale_grad_by_freq, module.sparse)
    return out if out_dtype is None else out.to(out_dtype)


def _plain_forward(module: nn.Module):
    """The forward of one of ComfyUI's cast layers as plain torch on the tensors the layer holds, weights cast
    to the input's dtype as ComfyUI's ``manual_cast`` layers do (so frozen copies may stay in a smaller dtype);
    ``None`` for other layers (their own forward's plain path is used)."""
    if isinstance(module, nn.Embedding):
        return _embedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _conv
    if isinstance(module, nn.GroupNorm):
        return _group_norm
    if isinstance(module, nn.LayerNorm):
        return _layer_norm
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        return _rms_norm
    if hasattr(module, "in_features") and hasattr(module, "out_features") and "weight" in module._parameters:
        return _linear  # nn.Linear, and current ComfyUI's quantized Linear (not an nn.Linear)
    return None


def shadow(module: nn.Module) -> nn.Module:
    """A module tree of ``module``'s own classes and configuration that shares none of its tensor slots.

    Each module is a shallow copy with its own ``_parameters`` / ``_buffers`` / ``_modules`` dicts (still
    pointing at the loaded tensors until the caller puts others in) and its own hook dicts. ComfyUI's
    per-layer loading state is switched off on the copies: ``comfy_cast_weights`` false, no
    ``weight_function``/``bias_function`` (the patches of a partial load, which would be applied a second
    time on weights we already patched), and linear, convolution, norm and embedding layers compute plain
    torch on the tensors they hold (``_plain_forward``; current ComfyUI's quantized and dynamic-VRAM layers
    otherwise read their own resident copies). So the copy computes on the tensors we give it, and nothing
    is ever set on the loaded module.
    """
    new = copy.copy(module)
    d = vars(new)
    d["_parameters"] = dict(module._parameters)
    d["_buffers"] = dict(module._buffers)
    d["_modules"] = {n: None if c is None else shadow(c) for n, c in module._modules.items()}
    for name in _HOOK_DICTS:
        if isinstance(d.get(name), dict):
            d[name] = type(d[name])(d[name])
    if hasattr(module, "comfy_cast_weights"):  # one of ComfyUI's (or ComfyUI-GGUF's) cast-aware layers
        d["comfy_cast_weights"] = False
        d["weight_function"], d["bias_function"] = [], []
        forward = _plain_forward(module)
        if forward is not None:
            d["forward"] = types.MethodType(forward, new)
    return new


def _module_of(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, leaf = name.rpartition(".")
    return (root.get_submodule(owner) if owner else root), leaf


def _block_classes(diffusion_model: nn.Module) -> tuple[tuple[str, ...], bool]:
    """The block class names of the family this diffusion model's modules are (``architectures``), and whether
    they can be recomputed in the backward pass (checkpoint blocks) or only have their weights streamed
    (offload blocks: the DiTs, whose blocks add into saved tensors in place)."""
    names = {type(m).__name__ for m in diffusion_model.modules()}
    for a in architectures.ARCHITECTURES:
        if a.checkpoint_blocks and names.intersection(a.checkpoint_blocks):
            return a.checkpoint_blocks, True
    for a in architectures.ARCHITECTURES:
        if a.offload_blocks and names.intersection(a.offload_blocks):
            return a.offload_blocks, False
    return (), False


_STREAMED = object()


class _SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """What autograd saves for the backward pass: a weight streamed to the device (``moved``: its storage →
    the CPU copy it came from) is kept as a reference to that copy and moved again when the backward pass
    needs it, so the device does not hold every block's weights until then; with ``copy`` every other tensor
    is saved as a copy (a block that adds into a saved tensor in place cannot change it)."""

    def __init__(self, moved: dict[int, Tensor], copy: bool, device: torch.device) -> None:
        def pack(t: Tensor):
            src = moved.get(_storage(t)) if moved else None
            if src is not None:
                return (_STREAMED, src, t.size(), t.stride(), t.storage_offset())
            return t.clone() if copy else t

        def unpack(p):
            if isinstance(p, tuple) and len(p) == 5 and p[0] is _STREAMED:
                return p[1].to(device, non_blocking=True).as_strided(p[2], p[3], p[4])
            return p

        super().__init__(pack, unpack)


def _storage(t: Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without plain storage
        return None


@contextlib.contextmanager
def _streamed(blocks: list[nn.Module], device: torch.device, moved: dict[int, Tensor]):
    """Context: each block's weights are moved to ``device`` when it runs (a forward pre-hook on our shadow) and
    put back after it (post-hook); ``moved`` maps each moved weight's storage to its CPU copy meanwhile."""

    def pre(block, _args):
        for owner in block.modules():
            for leaf, t in list(owner._parameters.items()):
                if t is not None and t.device.type == "cpu" and not t.requires_grad:  # (trained tensors stay)
                    on = t.to(device, non_blocking=True)
                    owner._parameters[leaf] = on
                    vars(owner).setdefault("_rece_cpu", {})[leaf] = t
                    moved[_storage(on)] = t

    def post(block, _args, _out):
        for owner in block.modules():
            for leaf, t in vars(owner).pop("_rece_cpu", {}).items():
                moved.pop(_storage(owner._parameters[leaf]), None)
                owner._parameters[leaf] = t

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for b in blocks:
            post(b, None, None)


class Denoiser:
    """The model's ``apply_model`` with weights from ``params`` (copies), on a :func:`shadow` of the model.

    ``params``: ``m.diffusion_model.*`` weights as the model uses them (patches applied, GGUF / quantized
    weights dequantized: ``weights.key_weights``), plus every other parameter and buffer of ``model.model``
    (copied); the ``model_sampling`` is the MODEL's own (object patches respected). The loaded module is only
    read, and it need not be loaded: a model ComfyUI holds partially on the GPU, or not at all, is read
    where it is.

    ``offload``: the weights of the family's blocks (``architectures.checkpoint_blocks`` / ``offload_blocks``)
    stay in CPU memory and each block's are moved to ``device`` when it runs (again when the backward pass
    needs them, see :meth:`checkpointing`), so the GPU holds one block's weights at a time, as ComfyUI's
    low-VRAM mode does; ``None`` chooses it when the copies would not fit in half of the device's free memory.
    """

    def __init__(self, model, device: torch.device, tick: Callable[[], None] | None = None, *,
                 offload: bool | None = None) -> None:
        self.module = shadow(model.model)
        self.family = host_weights.model_type(model)
        self.device = device
        sampling = model.get_model_object("model_sampling") if hasattr(model, "get_model_object") \
            else model.model.model_sampling
        self.module.model_sampling = self.sampling = shadow(sampling)  # the MODEL's own (object patches)
        self.kind = parameterisation(self.sampling)
        # SDXL's UNet reads the pooled text through y (label_emb): a call without it is refused
        self.needs_pooled = bool(getattr(model.model, "adm_channels", 0)) and hasattr(model.model, "encode_adm")
        try:
            arch = architectures.detect(self.family, list(model.model.state_dict().keys()))[0]
        except ValueError:  # no text reader this pack knows: trained through as a plain text-rows model
            arch = None
        self.guidance = arch.guidance if arch is not None else None  # Flux's distilled guidance (ComfyUI's default)
        self.recomputed = False
        block_classes, self.recomputable = _block_classes(self.module.diffusion_model)
        # blocks that cannot be recomputed add into tensors autograd saved (Flux's, SD3's): saved as copies
        self.in_place = bool(block_classes) and not self.recomputable
        self.moved: dict[int, Tensor] = {}
        self.streaming = False
        self.blocks = [m for m in self.module.diffusion_model.modules() if type(m).__name__ in block_classes]
        in_blocks = {".".join(filter(None, ("m.diffusion_model", n, p)))
                     for n, m in self.module.diffusion_model.named_modules()
                     if type(m).__name__ in block_classes for p, _ in m.named_parameters()}
        # A half-precision model on a GPU computes in its own dtype (ComfyUI casts the inputs to it): the
        # copies are kept in that dtype and every call runs under autocast; float32 otherwise.
        dtype = getattr(model.model, "manual_cast_dtype", None) or (
            model.model.get_dtype() if hasattr(model.model, "get_dtype") else torch.float32)
        self.autocast = dtype if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) else None
        store = self.autocast or torch.float32
        keys = [f"diffusion_model.{n}" for n, _ in model.model.diffusion_model.named_parameters()]
        if device.type != "cpu":  # make room as ComfyUI does before a load: unload what it holds there
            size = sum(host_weights.logical_shape(host_weights.stored_weight(model, k)[0]).numel() for k in keys)
            need = size * torch.finfo(store).bits // 8
            comfy.model_management.free_memory(need * 2, device)
            if offload is None:
                offload = bool(in_blocks) and need > comfy.model_management.get_free_memory(device) / 2
        self.offload = bool(offload) and bool(in_blocks)
        self.params: dict[str, Tensor] = {}
        with torch.inference_mode(False), torch.no_grad():  # copies: no graph back to the loaded weights
            for k, w in host_weights.key_weights(model, keys, device if not self.offload else torch.device("cpu"),
                                                 include_erasures=True, tick=tick):
                name = f"m.{k}"
                on = torch.device("cpu") if self.offload and name in in_blocks else device
                self.params[name] = w.detach().to(device=on, dtype=store)
                if on.type == "cpu" and device.type == "cuda":
                    self.params[name] = self.params[name].pin_memory()
            # the MODEL's own sampling first (object patches), then every other tensor of model.model
            copies = [(f"model_sampling.{n}", t) for n, t in self.sampling.named_buffers()] + \
                list(model.model.named_parameters()) + list(model.model.named_buffers())
            for name, t in copies:
                if f"m.{name}" not in self.params:
                    self.params[f"m.{name}"] = t.detach().to(device=device, dtype=torch.float32 if t.is_floating_point()
                                                             else t.dtype, copy=True)
        for name, t in self.params.items():  # the shadow holds the copies: nothing points at the loaded tensors
            owner, leaf = _module_of(self.module, name.removeprefix("m."))
            (owner._parameters if leaf in owner._parameters else owner._buffers)[leaf] = t
        self.sigmas = self.params.get("m.model_sampling.sigmas", self.sampling.sigmas.detach().float().to(device))
        self.call = _Call(self.module, self._apply)

    def _apply(self, m: nn.Module, x: Tensor, sigma: Tensor, cond: Tensor, pooled: Tensor | None) -> Tensor:
        """ComfyUI's sampling call: ``y`` from the model's own ``encode_adm`` (SDXL: pooled bigG + the image size
        as a plain generation's conditioning gives it; Flux, SD3: the pooled vector; SD1.x: none), Flux's
        distilled guidance at ComfyUI's default."""
        kwargs = {}
        if pooled is not None:
            h, w = x.shape[-2] * 8, x.shape[-1] * 8
            y = m.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0, target_width=w,
                             target_height=h)
            if y is not None:
                kwargs["y"] = y
        elif self.needs_pooled:
            raise ValueError(f"this {self.family} model also reads the pooled text (SDXL's y); none was given")
        if self.guidance is not None:
            kwargs["guidance"] = torch.full((x.shape[0],), float(self.guidance), device=x.device)
        return m.apply_model(x, sigma, c_crossattn=cond, **kwargs)

    @contextlib.contextmanager
    def checkpointing(self, enabled: bool = True):
        """Context for training through the model; yields how many blocks are checkpointed.

        UNet families: the blocks run under gradient checkpointing (``rece_core.train.checkpointed``) when
        ``enabled`` or offloaded, their weights moved to the device per call when offloaded. DiT families
        (Flux, SD3): their blocks add into tensors autograd saved (``txt += ...``), which a recompute would
        read changed (measured: gradients 2% off finite differences), so they are never recomputed: what
        autograd saves is copied, and when offloaded each block's weights are moved to the device as it runs
        and saved for the backward pass as references to their CPU copies (:class:`_SavedTensors`)."""
        if not self.recomputable:
            with _streamed(self.blocks, self.device, self.moved) if self.offload else contextlib.nullcontext():
                self.streaming = self.offload
                try:
                    yield 0
                finally:
                    self.streaming = False
            return
        blocks = self.blocks if enabled or self.offload else []
        with checkpointed(blocks, device=self.device if self.offload else None) as n:
            self.recomputed = n > 0
            try:
                yield n
            finally:
                self.recomputed = False

    def weight(self, key: str) -> Tensor:
        """``diffusion_model.*`` weight as the model uses it (the copy), float32, on the device."""
        return self.params[f"m.{key}"].to(self.device, torch.float32)

    def denoised(self, x: Tensor, sigma: Tensor, cond: Tensor, override: dict[str, Tensor] | None = None,
                 pooled: Tensor | None = None) -> Tensor:
        """``D(x, σ)`` ``[B, C, h, w]`` under the text rows ``cond`` ``[B, T, d]`` (and SDXL's pooled text
        ``[B, d_pooled]``), with ``override`` (``diffusion_model.*`` → tensor) in place of those weights."""
        params = self.params if not override else {**self.params, **{f"m.{k}": v for k, v in override.items()}}
        copy = self.in_place and not self.recomputed
        saved = _SavedTensors(self.moved, copy, self.device) if copy or self.streaming else contextlib.nullcontext()
        with saved:
            if self.autocast is None:
                return functional_call(self.call, params, (x, sigma, cond, pooled), strict=False)
            with torch.autocast(self.device.type, dtype=self.autocast):
                return functional_call(self.call, params, (x, sigma, cond, pooled), strict=False).float()

    def loss(self, override: dict[str, Tensor] | None = None,
             overrides: Callable[[], dict[str, Tensor]] | None = None) -> Callable[..., Tensor]:
        """``loss(cond [B,T,d], x0 [B,...], noise, t [B] ∈ [0,1)) → [B]``: the squared error of the model's
        own output (ε, v or flow velocity) against its target at ``σ = sigmas[⌊t·len⌋]``, as the model was
        trained; written on the denoised estimate ``D``: ε and flow ``‖D − x₀‖²/σ²``, v ``‖D − x₀‖²(σ²+1)/σ²``
        (``sigma_data`` 1). ``overrides()``: weights computed per call (trained LoRA factors)."""

        def fn(cond: Tensor, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
            _check()
            idx = (t.float() * self.sigmas.shape[0]).long().clamp(0, self.sigmas.shape[0] - 1)
            sigma = self.sigmas[idx.to(self.sigmas.device)].to(self.device)
            x0, noise = x0.to(self.device, torch.float32), noise.to(self.device, torch.float32)
            x = self.sampling.noise_scaling(sigma.view(-1, *([1] * (x0.ndim - 1))), noise, x0)
            extra = overrides() if overrides is not None else {}
            d = self.denoised(x, sigma, cond.to(self.device, torch.float32), {**(override or {}), **extra})
            s2 = sigma.view(-1, *([1] * (x0.ndim - 1))).pow(2)
            w = (s2 + 1.0) / s2 if self.kind == "v" else 1.0 / s2
            return ((d.float() - x0).pow(2) * w).flatten(1).mean(1)

        return fn


def _stored_dtype(patcher, key: str) -> torch.dtype:
    """The floating dtype a plain stored weight has (fp32/fp16/bf16/fp8); float32 for packed storage."""
    w = host_weights.stored_weight(patcher, key)[0]
    return w.dtype if type(w) in (Tensor, nn.Parameter) and w.is_floating_point() else torch.float32


class TextEncoder:
    """A CLIP's ``encode_token_weights`` (what ``CLIP.encode_from_tokens`` runs) on a :func:`shadow` of its
    ``cond_stage_model`` whose weights are float32 copies on ``device`` as the CLIP uses them (its patches
    applied: a LoRA, an earlier unlearning); ``encode(tokens, override)`` puts ``override`` (state-dict key
    → tensor, e.g. trained weights) in their place. Gradients reach ``override``; the loaded CLIP is only read.
    ``float32``: the keys copied in float32 (default every one); the others keep the CLIP's stored dtype.
    """

    def __init__(self, clip, device: torch.device, float32: Collection[str] | None = None,
                 tick: Callable[[], None] | None = None) -> None:
        self.clip, self.device = clip, device
        loaded = clip.cond_stage_model
        self.module = shadow(loaded)
        keys = [n for n, _ in loaded.named_parameters()]
        exact = set(keys if float32 is None else float32)
        with torch.inference_mode(False), torch.no_grad():
            # weights not trained keep the dtype the CLIP stores them in (T5-XXL in fp16/fp8 is 9.5/4.8 GB,
            # 19 GB in float32); the shadow's layers cast them to the input's dtype as ComfyUI's do
            self.params = {k: w.detach() if k in exact else w.detach().to(_stored_dtype(clip.patcher, k))
                           for k, w in host_weights.key_weights(clip.patcher, keys, device, include_erasures=True,
                                                                tick=tick)}
            for n, t in loaded.named_buffers():
                self.params.setdefault(n, t.detach().to(device=device, copy=True))
        for name, t in self.params.items():
            owner, leaf = _module_of(self.module, name)
            (owner._parameters if leaf in owner._parameters else owner._buffers)[leaf] = t
        self.call = _Call(self.module, self._encode)

    def _encode(self, m: nn.Module, tokens) -> tuple[Tensor, Tensor | None]:
        """As ``CLIP.encode_from_tokens`` once loaded: clip options reset, the clip-skip layer, the execution
        device (current ComfyUI also encodes inside ``cuda_device_context``; 0.3.64 has neither)."""
        m.reset_clip_options()
        if getattr(self.clip, "layer_idx", None) is not None:
            m.set_clip_options({"layer": self.clip.layer_idx})
        m.set_clip_options({"execution_device": self.device})
        context = getattr(comfy.model_management, "cuda_device_context", None)
        if context is None:
            out = m.encode_token_weights(tokens)
        else:
            with context(self.device):
                out = m.encode_token_weights(tokens)
        return out[0], out[1]

    def encode(self, tokens, override: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
        """``(rows [1, T, d], pooled [1, d_p] or None)`` of one tokenized prompt."""
        params = self.params if not override else {**self.params, **override}
        # ComfyUI's CLIP adds its residuals in place (x += ...): tensors saved for backward are copies
        with saved_copies():
            return functional_call(self.call, {f"m.{k}": v for k, v in params.items()}, (tokens,), strict=False)


def require_text_rows_unet(model, what: str) -> None:
    """Refuse, for methods that condition on the text rows alone, models that also need pooled text or
    more (SDXL's y) and the DiT families."""
    arch, _ = host_weights.architecture(model)  # refuses unreadable weights, models without text
    if arch.name != "unet" or getattr(model.model.diffusion_model, "num_classes", None) is not None:
        raise ValueError(f"training on this {host_weights.model_type(model)} model is not supported yet: {what} "
                         "SD1.x / SD2.x UNets (text rows only); SDXL also needs pooled-text and size conditioning, "
                         "the DiT families their own inputs. A LoRA at a given alpha works on any model")


def _clip_part(clip):
    """The one CLIP text model of an SD1.x/SD2.x CLIP (``clip_l`` / ``clip_h``), or a clear error."""
    cond = getattr(clip, "cond_stage_model", None)
    name = getattr(cond, "clip", None)
    part = getattr(cond, name, None) if isinstance(name, str) else None
    if part is None or not hasattr(part, "transformer"):
        raise ValueError("Diverse Inversion learns word embeddings of a single CLIP text encoder (SD1.x, SD2.x); "
                         "this CLIP has several encoders or another kind (SDXL, Flux, SD3 and the DiT families "
                         "are not supported yet)")
    return cond, name, part


class TokenEncoder:
    """``V [B, d_tok] → cond [B, 77, d]``: the CLIP's rows of a one-word prompt whose word is ``V[b]``.

    The prompt is a one-word prompt tokenized as ComfyUI tokenizes it, its word token replaced by the
    vector: exactly what the prompt ``embedding:<file>`` gives the same encoder. ``init``: the token
    embedding of the first token of ``word`` (the concept).
    """

    def __init__(self, clip, word: str, device: torch.device) -> None:
        cond, name, part = _clip_part(clip)
        self.clip, self.cond = clip, cond
        self.clip_name = getattr(cond, "clip_name", name)
        words = clip.tokenize(word)
        if self.clip_name not in words or len(words[self.clip_name]) != 1:
            raise ValueError(f"Diverse Inversion: the concept {word[:60]!r} must fit in one 77-token chunk")
        ids = [t[0] for t in words[self.clip_name][0]]
        self.tokens = clip.tokenize("x")  # a one-token prompt: its token becomes the vector
        self.position = 1  # after the start token
        table = part.transformer.get_input_embeddings()
        tokenizer = getattr(clip.tokenizer, getattr(clip.tokenizer, "clip", f"clip_{self.clip_name}"), None)
        self.embedding_key = getattr(tokenizer, "embedding_key", f"clip_{self.clip_name}")
        self.width = int(table.weight.shape[1])
        with torch.inference_mode(False):
            self.init = table.weight[ids[self.position]].detach().to(device=device, dtype=torch.float32, copy=True)
        self.encoder = TextEncoder(clip, device)

    def _rows(self, toks) -> Tensor:
        return self.encoder.encode(toks)[0]

    def tokens_with(self, v: Tensor) -> dict:
        toks = copy.copy(self.tokens)
        chunk = list(toks[self.clip_name][0])
        chunk[self.position] = (v, 1.0) + tuple(chunk[self.position][2:])
        toks[self.clip_name] = [chunk]
        return toks

    def __call__(self, v: Tensor) -> Tensor:
        rows = []
        for row in v:
            _check()
            rows.append(self._rows(self.tokens_with(row)).float())
        return torch.cat(rows)

    def text(self, text: str) -> Tensor:
        """``[1, 77, d]`` rows of a plain prompt (the neutral one: ``""``), no graph."""
        with torch.no_grad():
            return self._rows(self.clip.tokenize(text)).float()
