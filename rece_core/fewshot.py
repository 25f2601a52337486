"""Few-shot unlearning of the text encoder (Fuchi & Takagi, BMVC 2024, arXiv 2405.07288), pure PyTorch.

A few images of the concept (VAE latents, encoded once) and captions drawn from textual-inversion
templates that name it; the text encoder's chosen weights are trained to *raise* the frozen
diffusion model's denoising loss on those images: loss ``−MSE(ε_θ(x_t, t, TE(caption)), ε)`` (or the
v / flow target of the model), Adam (lr 1e-5, betas (0.9, 0.98), eps 1e-6, weight decay 1e-8),
batch 2, a few epochs. Zero-shot variant: uniform random latents in place of images.

Facts from the authors' code (``fmp453/few-shot-erasing``): images resized to 512×512 (bicubic, no
crop), flipped horizontally with p = 0.5, encoded once; ``randint(0, 1000)`` timesteps; the
caption template drawn uniformly per item; zero-shot latents ``torch.rand`` (uniform [0, 1)), as
many as the batch size. Their parameter selection sets ``param.require_grad`` (a typo for
``requires_grad``), so their code in fact trains *every* text-encoder weight; the paper's stated
default, and ours, is ``mlp-final-attn``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from dataclasses import dataclass

import torch
from torch import Tensor

from .train import AdamSettings, Progress, TrainResult, denoising_mse, noise_latents, sample_sigmas, train

__all__ = ["CONCEPT_TYPES", "OBJECT_TEMPLATES", "PARAMETER_SETS", "STYLE_TEMPLATES", "Denoiser", "Unlearning",
           "captions_for", "load_unlearning", "prepare_images", "save_unlearning", "trainable_keys", "unlearn",
           "zero_shot_latents"]

# textual-inversion templates (Gal et al. 2022, as diffusers' textual_inversion example ships them)
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}",
    "a dirty painting in the style of {}", "a dark painting in the style of {}", "a picture in the style of {}",
    "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a cropped painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style of {}",
    "a weird painting in the style of {}", "a large painting in the style of {}",
)
CONCEPT_TYPES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}

# which weights of a CLIP text encoder are trained (the paper's names; its default first)
PARAMETER_SETS = ("mlp-final-attn", "mlp-only", "mlp-attn", "attn-only")
_CLIP_LAYER = (r"(?P<prefix>.*\.encoder\.layers\.)(?P<i>\d+)\.(?P<part>mlp\.fc[12]|self_attn\.(?:q|k|v|out)_proj)"
               r"\.(?:weight|bias)")
# T5 (ComfyUI's comfy/text_encoders/t5.py): block N = layer.0 self-attention (q, k, v, o), layer.1 the MLP
# (DenseReluDense: wi, or the gated wi_0 / wi_1, then wo); no biases
_T5_LAYER = (r"(?P<t5prefix>.*\.encoder\.block\.)(?P<j>\d+)\.layer\.(?P<t5part>0\.SelfAttention\.[qkvo]"
             r"|1\.DenseReluDense\.(?:wi|wi_0|wi_1|wo))\.weight")
_LAYER = re.compile(f"^(?:{_CLIP_LAYER}|{_T5_LAYER})$")


def trainable_keys(keys: Sequence[str], parameter_set: str) -> list[str]:
    """The keys (weights and biases) of a CLIP text encoder's state dict that ``parameter_set`` trains.

    ``mlp-final-attn``: every layer's MLP (``mlp.fc1``, ``mlp.fc2``) and the last layer's
    self-attention (``q/k/v/out_proj``); ``mlp-only``; ``mlp-attn`` (every MLP and attention);
    ``attn-only``. The last layer is the highest index under each encoder's prefix. T5 blocks (Flux's and
    SD3's ``t5xxl``) by the same rule: MLP = ``layer.1.DenseReluDense.*``, attention = ``layer.0.SelfAttention.*``.
    """
    if parameter_set not in PARAMETER_SETS:
        raise ValueError(f"parameters to train must be one of {', '.join(PARAMETER_SETS)}, got {parameter_set!r}")
    found = [(k, m) for k in keys if (m := _LAYER.match(k))]
    if not found:
        raise ValueError("this text encoder has no CLIP or T5 layers (encoder.layers.N.mlp.fc1, encoder.block.N.layer"
                         ".1.DenseReluDense); few-shot unlearning trains CLIP and T5 text encoders")
    last: dict[str, int] = {}

    def where(m: re.Match) -> tuple[str, int, bool]:  # (encoder prefix, layer index, is the MLP)
        if m["prefix"] is not None:
            return m["prefix"], int(m["i"]), m["part"].startswith("mlp.")
        return m["t5prefix"], int(m["j"]), m["t5part"].startswith("1.")

    for _, m in found:
        prefix, i, _ = where(m)
        last[prefix] = max(last.get(prefix, -1), i)
    out = []
    for k, m in found:
        prefix, i, mlp = where(m)
        final = i == last[prefix]
        if (parameter_set == "mlp-final-attn" and (mlp or final)) or (parameter_set == "mlp-only" and mlp) \
                or parameter_set == "mlp-attn" or (parameter_set == "attn-only" and not mlp):
            out.append(k)
    return out


def captions_for(concept: str, concept_type: str, indices: Tensor) -> list[str]:
    """The template ``indices[i]`` of ``concept_type``'s set, filled with ``concept``."""
    templates = CONCEPT_TYPES[concept_type]
    return [templates[int(i) % len(templates)].format(concept) for i in indices]


def prepare_images(images: Tensor, size: int, generator: torch.Generator, flip: bool = True) -> Tensor:
    """ComfyUI IMAGE ``[B, H, W, 3]`` in [0, 1] → ``[B, size, size, 3]``: bicubic resize (no crop, as the
    authors' code), each image flipped left-right with probability 0.5 (drawn from ``generator``)."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"images must be a ComfyUI IMAGE batch [B, H, W, 3], got shape {tuple(images.shape)}")
    x = images[..., :3].float().movedim(-1, 1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                                        antialias=True).clamp(0.0, 1.0)
    if flip:
        flips = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    return x.movedim(1, -1).contiguous()


def zero_shot_latents(n: int, shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """The zero-shot variant's stand-in for image latents: ``torch.rand`` ``[n, *shape]`` (uniform [0, 1))."""
    return torch.rand((n, *shape), generator=generator)


@dataclass(frozen=True)
class Denoiser:
    """The frozen diffusion model as the loop needs it (ComfyUI convention, see ``rece_core.train``)."""

    call: Callable[[Tensor, Tensor, Any], Tensor]  # (x [B,C,H,W], σ [B], what encode returned) → denoised
    sigmas: Tensor                                    # [T] the model's training noise levels
    parameterisation: str                            # "eps" | "v" | "flow"
    sigma_data: float = 1.0


def unlearn(
    initial: Mapping[str, Tensor],
    encode: Callable[[dict[str, Tensor], list[str]], Any],
    denoiser: Denoiser,
    latents: Tensor,
    concept: str,
    concept_type: str = "object",
    *,
    epochs: int = 5,
    batch_size: int = 2,
    adam: AdamSettings = AdamSettings(),
    seed: int = 0,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    callback: Callable[[Progress], None] | None = None,
) -> TrainResult:
    """Train ``initial`` (text-encoder weights, ``name → tensor``) to raise the denoising loss of
    ``latents`` ``[N, C, H, W]`` (the model's own latent space) under captions naming ``concept``.

    ``encode(trainables, captions)`` runs the text encoder with the trainables in place of its weights
    and returns what ``denoiser.call`` takes as context (e.g. ``[len(captions), L, d]``, or with
    SDXL the pair (rows, pooled)). Each step: a template per item, noise, a uniform timestep
    (in that order from the run's generator), loss ``−denoising_mse``.
    """
    if concept_type not in CONCEPT_TYPES:
        raise ValueError(f"concept type must be one of {', '.join(CONCEPT_TYPES)}, got {concept_type!r}")
    if not concept.strip():
        raise ValueError("the concept name is empty: name what the images show (e.g. 'Eiffel Tower')")
    if latents.ndim < 3 or latents.shape[0] < 1:
        raise ValueError(f"latents must be a batch [N, C, ...], got shape {tuple(latents.shape)}")
    device = torch.device(device)
    n_templates = len(CONCEPT_TYPES[concept_type])

    def loss(w: dict[str, Tensor], step) -> Tensor:
        x0 = latents[step.batch].to(device, torch.float32)
        captions = captions_for(concept.strip(), concept_type, step.randint(n_templates, x0.shape[0]))
        noise = step.randn(*x0.shape)
        _, sigma = sample_sigmas(denoiser.sigmas, x0.shape[0], step.generator)
        sigma = sigma.to(device)
        x = noise_latents(denoiser.parameterisation, x0, noise, sigma)
        context = encode(w, captions)
        denoised = denoiser.call(x, sigma, context)
        return -denoising_mse(denoiser.parameterisation, denoised, x, x0, noise, sigma, denoiser.sigma_data)

    return train(initial, loss, n_items=latents.shape[0], batch_size=batch_size, epochs=epochs, adam=adam,
                 seed=seed, device=device, autocast_dtype=autocast_dtype, callback=callback)


# --------------------------------------------------------------------------- the result and its file

FORMAT = "rece-unlearning"
FORMAT_VERSION = 1
MAX_DELTA = 1e3  # |ΔW| above this is no unlearning of a text encoder (weights are O(1)); refused on load


@dataclass
class Unlearning:
    """The trained change of the text encoder: ``deltas`` ``key → ΔW`` (float32, CPU) on the CLIP's
    state-dict keys (e.g. ``clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight``)."""

    deltas: dict[str, Tensor]
    concept: str
    concept_type: str
    parameters: str
    epochs: int
    learning_rate: float
    seed: int
    batch_size: int
    images: int
    zero_shot: bool
    resolution: int
    family: str
    parameterisation: str
    epoch_losses: list[float]
    seconds: float
    device: str = "cpu"

    @property
    def n_parameters(self) -> int:
        return sum(v.numel() for v in self.deltas.values())

    def summary(self) -> str:
        src = "zero-shot (random latents)" if self.zero_shot else f"{self.images} image(s) at {self.resolution}px"
        losses = ", ".join(f"{x:.4f}" for x in self.epoch_losses)
        return (f"few-shot unlearning of {self.concept!r} ({self.concept_type}) from {src}\n"
                f"trained {self.parameters}: {len(self.deltas)} tensors, {self.n_parameters:,} parameters; "
                f"{self.family} model, {self.parameterisation} loss\n"
                f"{self.epochs} epochs, batch {self.batch_size}, lr {self.learning_rate:g}, seed {self.seed}\n"
                f"loss per epoch (−MSE; lower = the concept caption helps less): {losses}\n"
                f"{self.seconds:.1f} s on {self.device}")

    def info(self) -> dict:
        return {"concept": self.concept, "concept_type": self.concept_type, "parameters": self.parameters,
                "epochs": self.epochs, "learning_rate": self.learning_rate, "seed": self.seed,
                "batch_size": self.batch_size, "images": self.images, "zero_shot": self.zero_shot,
                "resolution": self.resolution, "family": self.family, "parameterisation": self.parameterisation,
                "epoch_losses": list(self.epoch_losses), "seconds": self.seconds, "device": self.device}


def save_unlearning(u: Unlearning, path: str, *, pack_version: str = "") -> None:
    """Write ``u`` as safetensors: tensors ``delta.<key>`` (float32) and JSON metadata."""
    from .files import write_file

    if not u.deltas:
        raise ValueError("this unlearning holds no weights: nothing to save")
    tensors = {f"delta.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in u.deltas.items()}
    write_file(tensors, path, format=FORMAT, version=str(FORMAT_VERSION), field="unlearning",
               info={**u.info(), "pack_version": pack_version})


def load_unlearning(path: str) -> Unlearning:
    """Read and validate an unlearning file; ``ValueError`` naming the file and the problem otherwise."""
    from .files import metadata_object, read_header, read_tensors

    name, header, meta = read_header(path, format=FORMAT, versions=(str(FORMAT_VERSION),), kind="unlearning",
                                     title="few-shot unlearning", versioned="unlearning")
    if not header or not all(k.startswith("delta.") and _LAYER.match(k[len("delta."):]) for k in header):
        bad = next((k for k in header if not (k.startswith("delta.") and _LAYER.match(k[len("delta."):]))), "")
        raise ValueError(f"{name}: holds no text-encoder deltas" + (f" (unexpected tensor {bad[:60]!r})" if bad else ""))
    for k, entry in header.items():
        if entry["dtype"] != "F32":
            raise ValueError(f"{name}: tensor {k[:60]} must be float32, found {entry['dtype'][:20]}")
    info = metadata_object(meta, "unlearning", name)
    fields = {"concept": str, "concept_type": str, "parameters": str, "epochs": int, "learning_rate": (int, float),
              "seed": int, "batch_size": int, "images": int, "zero_shot": bool, "resolution": int, "family": str,
              "parameterisation": str, "epoch_losses": list, "seconds": (int, float), "device": str}
    for field, kind in fields.items():
        value = info.get(field)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"{name}: metadata field {field!r} is missing or malformed")
    if info["concept_type"] not in CONCEPT_TYPES or info["parameters"] not in PARAMETER_SETS:
        raise ValueError(f"{name}: unknown concept type or parameter set in its metadata")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in info["epoch_losses"]):
        raise ValueError(f"{name}: metadata field 'epoch_losses' is malformed")
    tensors = read_tensors(path, name)
    for k, v in tensors.items():
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name}: tensor {k[:60]} contains NaN or Inf")
        if float(v.abs().max()) > MAX_DELTA if v.numel() else False:
            raise ValueError(f"{name}: tensor {k[:60]} changes a weight by more than {MAX_DELTA:g}; not an unlearning")
    return Unlearning(deltas={k[len("delta."):]: v for k, v in tensors.items()},
                      **{f: info[f] for f in fields})
