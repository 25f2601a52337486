"""The pack's training loop and the denoising loss of every parameterisation (pure PyTorch).

Used by few-shot unlearning (Fuchi & Takagi, BMVC 2024: text-encoder weights) and meant for every
later fine-tuning method (LoRA adapters on the diffusion model, textual-inversion embeddings).

API (stable; later changes are additive only)
---------------------------------------------
``train(initial, loss, n_items=, batch_size=, epochs=, adam=, seed=, device=, autocast_dtype=,
callback=, shuffle=) -> TrainResult``

- ``initial``: ``name → tensor``, the starting values of what is trained (any dtype, any device).
  They are only read: the loop trains float32 *master copies* on ``device`` and never writes its
  inputs (nor anything else it is given).
- ``loss(trainables, step) -> Tensor``: the caller's closure. ``trainables`` is ``name → float32
  tensor`` (requires grad) holding the current values; the closure runs its model with them (e.g.
  ``torch.func.functional_call``, or a ComfyUI weight wrapper that adds ``trainable − initial``)
  and returns the scalar to *minimise* (few-shot unlearning returns ``−MSE``). It draws all its
  randomness from ``step.generator`` (see ``Step.randn`` / ``Step.randint``), so a seed fixes the run.
  It may raise (e.g. ComfyUI's Cancel) at any point: the loop cleans up and re-raises.
- Each epoch shuffles ``range(n_items)`` with the generator (as ``DataLoader(shuffle=True)``) and
  takes batches of ``batch_size`` (the last may be smaller); ``step.batch`` holds the indices.
- Adam (``torch.optim.Adam``) with ``AdamSettings`` (the paper's defaults: lr 1e-5, betas (0.9,
  0.98), eps 1e-6, weight decay 1e-8). Weight decay acts on the trained values themselves.
- Gradients are on even under ComfyUI's ``torch.inference_mode()`` (the loop enters
  ``inference_mode(False)`` and ``enable_grad()``); with ``autocast_dtype`` (e.g. ``torch.bfloat16``)
  the closure runs under ``torch.autocast`` while masters, gradients and Adam stay float32.
- ``callback(progress)`` after every step (``Progress``: step, total, epoch, loss); it may raise to
  cancel. Out of memory raises ``TrainingOutOfMemory`` (a ``MemoryError``) that says what to lower.
- Frozen weights the closure uses must not be inference tensors (ComfyUI creates its models under
  ``torch.inference_mode()``; autograd cannot save those for backward): pass them through
  ``autograd_safe`` once per run (copies only inference tensors, for the run's duration).
- A forward that modifies tensors in place after autograd saved them (ComfyUI's CLIP layers do
  ``x += attn(norm(x))``) runs under ``saved_copies()``: what backward needs is copied when saved.
- ``TrainResult``: ``trained`` (float32 masters, detached), ``deltas()`` (trained − initial, float32),
  ``losses`` per step, ``epoch_losses`` (mean per epoch), ``seconds``, ``steps``, ``parameters``.

Denoising loss in ComfyUI's convention (``comfy/model_sampling.py``): a denoiser ``D(x, σ, c)``
returns the clean-latent estimate, the noisy latent is ``noise_latents(...)``; ``denoising_mse``
converts ``D`` back to the model's own output (ε, v, or flow velocity) and takes the mean squared
error against that output's target, which is the loss the model was trained with.

- ``eps``:  x = x₀ + σε,            D = x − σ·out,                            target ε
- ``v``:    x = x₀ + σε,            D = x·s²/(σ²+s²) − out·σs/√(σ²+s²),       target (s²ε − σx₀)/(s√(σ²+s²))
  (s = sigma_data, 1 for SD2.x-v); the model sees x/√(σ²+s²), the DDPM x_t.
- ``flow``: x = σε + (1−σ)x₀,       D = x − σ·out,                            target ε − x₀
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import Tensor

__all__ = [
    "PARAMETERISATIONS", "AdamSettings", "Progress", "Step", "TrainResult", "TrainingOutOfMemory",
    "autograd_safe", "checkpointed", "denoising_mse", "saved_copies", "model_output", "noise_latents",
    "output_target", "sample_sigmas", "train",
]

PARAMETERISATIONS = ("eps", "v", "flow")


# --------------------------------------------------------------------------- denoising loss

def _check(parameterisation: str) -> None:
    if parameterisation not in PARAMETERISATIONS:
        raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}, got {parameterisation!r}")


def _per_sample(sigma: Tensor, like: Tensor) -> Tensor:
    """σ ``[B]`` (or a scalar) → broadcastable against ``like`` ``[B, ...]``."""
    sigma = sigma.to(like.device, like.dtype)
    return sigma.reshape(()) if sigma.numel() == 1 else sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1))


def noise_latents(parameterisation: str, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """The noisy latent ``x`` a ComfyUI denoiser takes at noise level σ (``noise_scaling``).

    x0, noise: ``[B, ...]``; sigma: ``[B]``. eps and v: ``x₀ + σε``; flow: ``σε + (1 − σ)x₀``.
    """
    _check(parameterisation)
    s = _per_sample(sigma, noise)
    if parameterisation == "flow":
        return s * noise + (1.0 - s) * x0
    return x0 + s * noise


def model_output(parameterisation: str, denoised: Tensor, x: Tensor, sigma: Tensor,
                 sigma_data: float = 1.0) -> Tensor:
    """The model's raw output recovered from ComfyUI's denoised estimate (inverts ``calculate_denoised``)."""
    _check(parameterisation)
    s = _per_sample(sigma, x)
    if parameterisation == "v":
        sd2 = sigma_data ** 2
        return (x * sd2 / (s ** 2 + sd2) - denoised) * (s ** 2 + sd2).sqrt() / (s * sigma_data)
    return (x - denoised) / s


def output_target(parameterisation: str, x0: Tensor, noise: Tensor, sigma: Tensor,
                  sigma_data: float = 1.0) -> Tensor:
    """What the model's raw output should be: ε (eps), v (v), ε − x₀ (flow). Shapes ``[B, ...]``."""
    _check(parameterisation)
    if parameterisation == "eps":
        return noise
    if parameterisation == "flow":
        return noise - x0
    s = _per_sample(sigma, noise)
    sd2 = sigma_data ** 2
    return (sd2 * noise - s * x0) / (sigma_data * (s ** 2 + sd2).sqrt())


def denoising_mse(parameterisation: str, denoised: Tensor, x: Tensor, x0: Tensor, noise: Tensor,
                  sigma: Tensor, sigma_data: float = 1.0) -> Tensor:
    """Mean squared error of the model's raw output against its target, float32 (scalar).

    This is ``F.mse_loss(model_pred.float(), target.float())`` of diffusers' training scripts,
    computed from a ComfyUI denoiser's output.
    """
    pred = model_output(parameterisation, denoised.float(), x.float(), sigma, sigma_data)
    target = output_target(parameterisation, x0.float(), noise.float(), sigma, sigma_data)
    return torch.nn.functional.mse_loss(pred, target, reduction="mean")


def sample_sigmas(sigmas: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Uniform random training timesteps: indices ``[n]`` into the table ``sigmas`` ``[T]`` and σ ``[n]``.

    With ComfyUI's discrete table (``model_sampling.sigmas``, T = 1000) this is diffusers'
    ``randint(0, num_train_timesteps)`` followed by ``add_noise`` at that timestep.
    """
    t = torch.randint(0, sigmas.shape[0], (n,), generator=generator, device=generator.device)
    return t, sigmas.detach().float().to(t.device)[t]


# --------------------------------------------------------------------------- the loop

def saved_copies():
    """Context: every tensor autograd saves for backward is a copy taken at that moment, so a forward
    that later modifies it in place (``x += ...``) still differentiates correctly. Costs the copies'
    memory (small for a text encoder); not needed for forwards without in-place updates."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)


def checkpointed(modules: list[torch.nn.Module], device: torch.device | None = None):
    """Context: each of ``modules`` runs under ``torch.utils.checkpoint`` (non-reentrant): its forward keeps
    no activations for backward and is run again during backward, block by block. Peak memory of the
    backward through a frozen network drops from all its activations to one block's plus the blocks'
    inputs; each step costs about one more forward of those blocks. Gradients are the same.

    The tensors each module holds *when it is called* (e.g. those ``torch.func.functional_call`` put in
    place) are the ones the recompute uses, so it works inside ``functional_call``. The modules are left
    as they were on exit (an instance ``forward`` is set for the context's duration only). Modules
    called inside another checkpointed module are not checkpointed again. Only for modules that do not
    change tensors autograd saved in place (a recompute would read them changed): ComfyUI's Flux and SD3
    blocks do (``txt += ...``), its UNet blocks do not (gradients checked against the uncheckpointed run).

    ``device``: the modules' tensors are held elsewhere (CPU memory) and moved to ``device`` for each call
    and each recompute, then dropped: only the running module's weights are on ``device`` (low-VRAM
    training). Without gradients the modules still run on moved tensors, not checkpointed."""
    import contextlib

    @contextlib.contextmanager
    def context():
        patched: list[torch.nn.Module] = []
        depth = [0]
        try:
            for module in modules:
                if "forward" in vars(module):
                    raise ValueError(f"{type(module).__name__} already has an instance forward; not checkpointed")
                module.forward = _checkpointed_forward(module, depth, device)
                patched.append(module)
            yield len(patched)
        finally:
            for module in patched:
                vars(module).pop("forward", None)

    return context()


def _checkpointed_forward(module: torch.nn.Module, depth: list[int], device: torch.device | None = None):
    forward = type(module).forward.__get__(module)  # the class's own forward, not the instance attribute
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]

    def current() -> dict[str, Tensor]:
        out = {}
        for n in names:
            owner, _, leaf = n.rpartition(".")
            out[n] = getattr(module.get_submodule(owner) if owner else module, leaf)
        return out

    class _Run(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, args, kwargs):
            depth[0] += 1
            try:
                return forward(*args, **kwargs)
            finally:
                depth[0] -= 1

    run = _Run()

    def wrapped(*args, **kwargs):
        if depth[0] or (device is None and not torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        params = {f"inner.{k}": v for k, v in current().items()}  # as they are now (functional_call's)

        def fn(*a):
            moved = params if device is None else {k: v.to(device, non_blocking=True) for k, v in params.items()}
            return torch.func.functional_call(run, moved, (a, kwargs))

        if not torch.is_grad_enabled():
            return fn(*args)
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    return wrapped


def autograd_safe(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``name → tensor`` usable in a graph that is differentiated: inference tensors are copied
    (made outside inference mode), every other tensor is passed through detached, uncopied."""
    with torch.inference_mode(False):
        return {k: v.detach().clone() if v.is_inference() else v.detach() for k, v in tensors.items()}


@dataclass(frozen=True)
class AdamSettings:
    """``torch.optim.Adam`` hyperparameters; defaults are the few-shot unlearning paper's."""

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 1e-8

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas) or len(self.betas) != 2:
            raise ValueError(f"Adam betas must be two numbers in [0, 1), got {self.betas}")
        if not (self.eps > 0 and self.weight_decay >= 0):
            raise ValueError(f"Adam eps must be > 0 and weight decay >= 0, got {self.eps}, {self.weight_decay}")


@dataclass
class Step:
    """One optimisation step, handed to the loss closure."""

    index: int            # 0-based over the whole run
    epoch: int            # 0-based
    batch: Tensor         # [b] long, indices into the items (CPU)
    generator: torch.Generator  # CPU generator: the run's only source of randomness
    device: torch.device

    def randn(self, *shape: int) -> Tensor:
        """Standard normal ``shape`` drawn on CPU from the run's generator, moved to the device."""
        return torch.randn(shape, generator=self.generator).to(self.device)

    def rand(self, *shape: int) -> Tensor:
        """Uniform [0, 1) ``shape`` from the run's generator, on the device."""
        return torch.rand(shape, generator=self.generator).to(self.device)

    def randint(self, high: int, n: int) -> Tensor:
        """``n`` integers in [0, high) from the run's generator (CPU, long)."""
        return torch.randint(0, high, (n,), generator=self.generator)


@dataclass(frozen=True)
class Progress:
    step: int      # steps done, 1-based
    total: int
    epoch: int     # 0-based
    loss: float


@dataclass
class TrainResult:
    initial: dict[str, Tensor]        # what was given (the caller's tensors, not copies)
    trained: dict[str, Tensor]        # float32 masters after training, detached, on the device
    losses: list[float]               # per step
    epoch_losses: list[float]         # mean of the steps of each epoch
    seconds: float
    steps: int
    parameters: int = field(default=0)  # number of trained scalars

    def deltas(self) -> dict[str, Tensor]:
        """``trained − initial`` in float32 on the masters' device (initial read as float32)."""
        with torch.inference_mode(False):
            return {k: (v - self.initial[k].detach().to(v.device, torch.float32)) for k, v in self.trained.items()}


class TrainingOutOfMemory(MemoryError):
    """Training ran out of memory; the message says where and what to lower."""


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def train(
    initial: Mapping[str, Tensor],
    loss: Callable[[dict[str, Tensor], Step], Tensor],
    *,
    n_items: int,
    batch_size: int,
    epochs: int,
    adam: AdamSettings = AdamSettings(),
    seed: int = 0,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    callback: Callable[[Progress], None] | None = None,
    shuffle: bool = True,
) -> TrainResult:
    """Minimise ``loss`` over float32 copies of ``initial`` with Adam; see the module docstring."""
    if not initial:
        raise ValueError("nothing to train: the set of trainable parameters is empty")
    for name, name_n in (("n_items", n_items), ("batch_size", batch_size), ("epochs", epochs)):
        if int(name_n) != name_n or name_n < 1:
            raise ValueError(f"{name} must be a positive integer, got {name_n}")
    if autocast_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast dtype must be None, bfloat16 or float16, got {autocast_dtype}")
    device = torch.device(device)
    steps_per_epoch = -(-n_items // batch_size)
    total = steps_per_epoch * epochs
    generator = torch.Generator().manual_seed(int(seed))
    losses: list[float] = []
    epoch_losses: list[float] = []
    start = time.perf_counter()
    masters: dict[str, Tensor] = {}
    optimizer = None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # clone() outside inference mode: normal tensors even when the inputs are inference tensors
            masters = {k: v.detach().to(device=device, dtype=torch.float32, copy=True).clone().requires_grad_(True)
                       for k, v in initial.items()}
            optimizer = torch.optim.Adam(list(masters.values()), lr=adam.lr, betas=adam.betas, eps=adam.eps,
                                         weight_decay=adam.weight_decay, foreach=False)
            index = 0
            for epoch in range(epochs):
                order = torch.randperm(n_items, generator=generator) if shuffle else torch.arange(n_items)
                epoch_sum = 0.0
                for b in range(steps_per_epoch):
                    step = Step(index=index, epoch=epoch, batch=order[b * batch_size:(b + 1) * batch_size],
                                generator=generator, device=device)
                    optimizer.zero_grad(set_to_none=True)
                    if autocast_dtype is not None:
                        with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                            value = loss(masters, step)
                    else:
                        value = loss(masters, step)
                    if value.numel() != 1:
                        raise ValueError(f"the loss must be a scalar, got shape {tuple(value.shape)}")
                    value = value.float().reshape(())
                    if not torch.isfinite(value):
                        raise ValueError(f"the loss is not finite at step {index + 1} ({value.item()}): "
                                         "lower the learning rate")
                    value.backward()
                    optimizer.step()
                    item = float(value.detach())
                    losses.append(item)
                    epoch_sum += item
                    index += 1
                    if callback is not None:
                        callback(Progress(step=index, total=total, epoch=epoch, loss=item))
                epoch_losses.append(epoch_sum / steps_per_epoch)
    except BaseException as e:  # free grads and Adam state before anything propagates
        optimizer = None
        for v in masters.values():
            v.grad = None
        if _is_oom(e):
            n = sum(v.numel() for v in masters.values()) or sum(v.numel() for v in initial.values())
            gib = n * 4 * 4 / 2**30  # master, gradient, two Adam moments, float32
            raise TrainingOutOfMemory(
                f"out of memory on {device} at step {len(losses) + 1} of {total} while training "
                f"{n:,} parameters ({gib:.2f} GiB of float32 masters, gradients and Adam state, plus the "
                "models' activations). Lower the batch size or the image size, train fewer parameters, "
                "or free memory (unload other models)") from e
        raise
    trained = {k: v.detach() for k, v in masters.items()}
    return TrainResult(initial=dict(initial), trained=trained, losses=losses, epoch_losses=epoch_losses,
                       seconds=time.perf_counter() - start, steps=len(losses),
                       parameters=sum(v.numel() for v in trained.values()))
