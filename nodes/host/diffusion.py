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

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ...rece_core.train import saved_copies

import comfy.model_management

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


class Denoiser:
    """The model's ``apply_model`` with weights from ``params`` (float32 copies on ``device``).

    ``params``: ``diffusion_model.*`` weights as the model uses them (patches applied), plus every other
    parameter and buffer of ``model.model`` (copied), so the loaded module is only read.
    """

    def __init__(self, model, device: torch.device, tick: Callable[[], None] | None = None) -> None:
        self.module = model.model
        arch, readers = host_weights.architecture(model)  # refuses GGUF / NF4 weights, models without text
        if arch.name != "unet" or getattr(self.module.diffusion_model, "num_classes", None) is not None:
            raise ValueError(f"training on this {host_weights.model_type(model)} model is not supported yet: the task-"
                             "vector fine-tune and Diverse Inversion call SD1.x / SD2.x UNets (text rows only); "
                             "SDXL also needs pooled-text and size conditioning, the DiT families their own inputs. "
                             "A LoRA at a given alpha works on any model")
        self.device = device
        self.sampling = self.module.model_sampling
        self.kind = parameterisation(self.sampling)
        keys = [k for k, v in self.module.state_dict().items() if k.startswith("diffusion_model.")]
        # A half-precision model on a GPU computes in its own dtype (ComfyUI casts the inputs to it): the
        # copies are kept in that dtype and every call runs under autocast; float32 otherwise.
        dtype = getattr(self.module, "manual_cast_dtype", None) or (
            self.module.get_dtype() if hasattr(self.module, "get_dtype") else torch.float32)
        self.autocast = dtype if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) else None
        store = self.autocast or torch.float32
        with torch.inference_mode(False), torch.no_grad():  # copies: no graph back to the loaded weights
            self.params = {f"m.{k}": w.detach().to(store) for k, w in host_weights.key_weights(
                model, keys, device, include_erasures=True, tick=tick)}
            for name, t in list(self.module.named_parameters()) + list(self.module.named_buffers()):
                if not name.startswith("diffusion_model.") and f"m.{name}" not in self.params:
                    self.params[f"m.{name}"] = t.detach().to(device=device, dtype=torch.float32 if t.is_floating_point()
                                                             else t.dtype, copy=True)
        self.sigmas = self.params.get("m.model_sampling.sigmas", self.sampling.sigmas.detach().float().to(device))
        self.call = _Call(self.module, lambda m, x, s, c: m.apply_model(x, s, c_crossattn=c))

    def weight(self, key: str) -> Tensor:
        """``diffusion_model.*`` weight as the model uses it (the copy), float32."""
        return self.params[f"m.{key}"].float()

    def denoised(self, x: Tensor, sigma: Tensor, cond: Tensor, override: dict[str, Tensor] | None = None) -> Tensor:
        params = self.params if not override else {**self.params, **{f"m.{k}": v for k, v in override.items()}}
        if self.autocast is None:
            return functional_call(self.call, params, (x, sigma, cond), strict=False)
        with torch.autocast(self.device.type, dtype=self.autocast):
            return functional_call(self.call, params, (x, sigma, cond), strict=False).float()

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
        if hasattr(clip, "load_model"):
            clip.load_model()
        self.params = None
        self.call = _Call(cond, lambda m, toks: m.encode_token_weights(toks))

    def _params(self) -> dict[str, Tensor]:
        if self.params is None:
            with torch.inference_mode(False):
                self.params = {f"m.{k}": v.detach().clone() for k, v in
                               list(self.cond.named_parameters()) + list(self.cond.named_buffers())}
        return self.params

    def _rows(self, toks) -> Tensor:
        self.cond.reset_clip_options()
        if getattr(self.clip, "layer_idx", None) is not None:
            self.cond.set_clip_options({"layer": self.clip.layer_idx})
        # ComfyUI's CLIP adds its residuals in place (x += ...), which autograd refuses for tensors it
        # saved: every tensor saved for backward is saved as a copy (the CLIP's activations, twice)
        with saved_copies():
            out = functional_call(self.call, self._params(), (toks,), strict=False)
        return out[0] if isinstance(out, (tuple, list)) else out

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
