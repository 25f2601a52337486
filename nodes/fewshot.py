"""Few-shot Unlearn Concept: trains the text encoder (a copy of the chosen weights) to raise the frozen
model's denoising loss on a few images of a concept, and hands back the CLIP with the change as a
weight patch (``rece_core.fewshot``, the loop in ``rece_core.train``).

Host facts used (ComfyUI 0.3.64 to current): ``CLIP.clone/add_patches/tokenize``, ``process_latent_in``,
``VAE.encode``; the text encoder and the diffusion model are called through ``host.diffusion``
(``TextEncoder``: ``encode_token_weights`` as ``encode_from_tokens`` runs it; ``Denoiser``: ``apply_model``
with the model's ``model_sampling``, SDXL's ``encode_adm``), on copies of their weights as the CLIP and MODEL
use them: the loaded ones are never written, and need not be loaded.
"""

from __future__ import annotations

import re
import time

import torch
from safetensors.torch import save_file

import comfy.model_management

from ..rece_core import __version__
from ..rece_core.fewshot import (CONCEPT_TYPES, PARAMETER_SETS, Denoiser, Unlearning, load_unlearning, prepare_images,
                                 save_unlearning, trainable_keys, unlearn, zero_shot_latents)
from ..rece_core.train import AdamSettings, TrainingOutOfMemory
from . import files
from .checks import check_widgets, ui_report
from .host import diffusion, run, weights

CATEGORY = "model_patches/rece"
UNLEARNING = "RECE_UNLEARNING"
TITLE = "Few-shot Unlearn Concept"
SUPPORTED = {"SD15": "SD1.x", "SD20": "SD2.x", "SDXL": "SDXL", "Flux": "Flux", "FluxSchnell": "Flux", "SD3": "SD3"}
"""Model families trained through: SD1.x/SD2.x (one CLIP encoder read by cross-attention only: the paper's
case and CLIP-H), SDXL (CLIP-L and bigG; bigG's pooled output also enters through the size conditioning
``y``), Flux (T5-XXL's rows into ``txt_in``, CLIP-L's pooled vector into ``vector_in``) and SD3 (CLIP-L+G and
T5 rows, pooled CLIP-L+G into ``y``). Others are refused with the reason (see docs/fewshot.md)."""
ENCODERS = {"SD1.x": 1, "SD2.x": 1, "SDXL": 2, "Flux": 2, "SD3": 3}
TEXT_ENCODERS = ("all", "clip_l", "clip_g", "t5xxl")
"""Which of the CLIP's encoders are trained: all of them, or one (its state-dict prefix)."""
PRECISIONS = {"float32": None, "bf16": torch.bfloat16}
"""What the models compute in while training: float32, or bfloat16 autocast (float32 master weights, gradients
and Adam state either way)."""
LOW_VRAM = ("auto", "on", "off")
"""Where the frozen model's weights live while training: ``on`` = CPU memory, each block moved to the GPU when it
runs (``diffusion.Denoiser`` offload); ``auto`` = on when the copies would not fit in half the free GPU memory."""
NOT_YET = "the DiT families with LLM text encoders (Qwen, Llama, Mistral, Gemma, UMT5 ...) are not supported yet"


def parameterisation(model) -> tuple[str, float]:
    """``eps`` / ``v`` / ``flow`` and sigma_data of the model's sampling (object patches respected)."""
    ms = model.get_model_object("model_sampling")
    try:
        kind = diffusion.parameterisation(ms)
    except ValueError as exc:
        raise ValueError(f"{TITLE}: {exc}") from None
    return kind, float(getattr(ms, "sigma_data", 1.0))


def check_inputs(clip, model) -> tuple[str, list[str]]:
    """The model family name and the CLIP's state-dict keys; a clear refusal for what is not supported."""
    if clip is None or not hasattr(clip, "cond_stage_model"):
        raise ValueError(f"{TITLE}: the clip input is not a CLIP (if it comes from a checkpoint loader, the "
                         "checkpoint has no text encoder)")
    family = weights.model_type(model)
    if family not in SUPPORTED:
        raise ValueError(f"{TITLE}: this {family} model is not supported: it trains through SD1.x, SD2.x, SDXL, "
                         f"Flux and SD3 models; {NOT_YET}")
    if getattr(model.model, "concat_keys", ()) or (SUPPORTED[family] in ("SD1.x", "SD2.x")
                                                  and getattr(model.model, "adm_channels", 0)):
        raise ValueError(f"{TITLE}: this {family} model takes more than the text (an inpainting or image-conditioned "
                         "model); use the plain text-to-image checkpoint of the family, whose CLIP is the same")
    encoders = list(clip.tokenize("a"))
    if len(encoders) != ENCODERS[SUPPORTED[family]]:
        raise ValueError(f"{TITLE}: this CLIP has {len(encoders)} text encoder(s) ({', '.join(encoders)}) but this "
                         f"{SUPPORTED[family]} model reads {ENCODERS[SUPPORTED[family]]}; connect the CLIP that "
                         "belongs to the model")
    return SUPPORTED[family], list(clip.cond_stage_model.state_dict().keys())


class FewShotUnlearnConcept:
    """Erase a concept from the text encoder, given a few images of it (Fuchi & Takagi, BMVC 2024)."""

    DESCRIPTION = ("Few-shot unlearning: trains the text encoder so that captions naming the concept no longer "
                   "help the (frozen) model denoise the given images. The CLIP output carries the change as a "
                   "patch and works with any model that uses this text encoder; the loaded CLIP and MODEL are "
                   "left untouched.")
    SEARCH_ALIASES = ["few-shot unlearning", "unlearn", "erase concept", "concept erasure", "forget", "text encoder",
                      "remove character", "remove style", "remove logo"]
    CATEGORY = CATEGORY
    FUNCTION = "unlearn"
    RETURN_TYPES = ("CLIP", UNLEARNING, "STRING")
    RETURN_NAMES = ("clip", "unlearning", "report")
    OUTPUT_TOOLTIPS = ("The CLIP with the unlearning applied (a patch on a clone).",
                       "The trained change: save it with Save Unlearning, or export it as a LoRA.",
                       "Loss per epoch, seconds, which parameters were trained.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The text encoder to unlearn from (left untouched; a patched clone "
                                             "is returned)."}),
                "model": ("MODEL", {"tooltip": "The diffusion model, frozen: it scores the images."}),
                "concept": ("STRING", {"default": "", "tooltip": "The concept's name as prompts use it, e.g. "
                                                                  "'Eiffel Tower' or 'Van Gogh'."}),
                "concept_type": (list(CONCEPT_TYPES), {"default": "object",
                                                       "tooltip": "object: 'a photo of a {}' captions; style: "
                                                                  "'a painting in the style of {}'."}),
                "epochs": ("INT", {"default": 5, "min": 1, "max": 1000,
                                   "tooltip": "Passes over the images (paper: 4-5 with 4 images)."}),
                "learning_rate": ("FLOAT", {"default": 1e-5, "min": 1e-8, "max": 1e-1, "step": 1e-6,
                                            "tooltip": "Adam learning rate (paper: 1e-5)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Fixes flips, captions, noise and timesteps: same seed, same result."}),
                "parameters": (list(PARAMETER_SETS), {"default": PARAMETER_SETS[0],
                                                      "tooltip": "Which text-encoder weights are trained: "
                                                                 "mlp-final-attn = every MLP + the last layer's "
                                                                 "self-attention (paper's default)."}),
            },
            "optional": {
                "vae": ("VAE", {"tooltip": "Encodes the images (not needed for zero-shot)."}),
                "images": ("IMAGE", {"tooltip": "A few images of the concept (a batch; the paper uses 4)."}),
                "zero_shot": ("BOOLEAN", {"default": False,
                                          "tooltip": "No images: random latents in their place (weaker)."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8,
                                       "tooltip": "Images are resized to this square (paper: 512)."}),
                "batch_size": ("INT", {"default": 2, "min": 1, "max": 64, "tooltip": "Images per step (paper: 2)."}),
                "text_encoders": (list(TEXT_ENCODERS), {"default": "all",
                                                        "tooltip": "all: every encoder of the CLIP (SDXL: CLIP-L "
                                                                   "and bigG; Flux: CLIP-L and T5-XXL; SD3: all "
                                                                   "three), or only one. T5-XXL is large: see the "
                                                                   "docs for its memory."}),
                "precision": (list(PRECISIONS), {"default": "float32",
                                                 "tooltip": "float32: exact. bf16: the models run under bfloat16 "
                                                            "autocast (faster, less memory on GPUs with bf16), "
                                                            "trained weights and Adam stay float32."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True,
                                                       "tooltip": "Recompute the frozen model's blocks during the "
                                                                  "backward pass instead of keeping them: much less "
                                                                  "memory, about a third more time per step; same "
                                                                  "result."}),
                "low_vram": (list(LOW_VRAM), {"default": "auto",
                                              "tooltip": "on: the frozen model's weights stay in CPU memory and "
                                                         "each block is moved to the GPU when it runs (slower, "
                                                         "for models that do not fit twice); auto: on when "
                                                         "needed; same result."}),
            },
        }

    def unlearn(self, clip, model, concept, concept_type, epochs, learning_rate, seed, parameters,
                vae=None, images=None, zero_shot=False, resolution=512, batch_size=2, text_encoders="all",
                gradient_checkpointing=True, precision="float32", low_vram="auto"):
        check_widgets(type(self), TITLE, epochs=epochs, learning_rate=learning_rate, seed=seed)
        if concept_type not in CONCEPT_TYPES:
            raise ValueError(f"{TITLE}: concept_type must be one of {', '.join(CONCEPT_TYPES)}, got {concept_type!r}")
        if not isinstance(concept, str) or not concept.strip():
            raise ValueError(f"{TITLE}: the concept name is empty: name what the images show, e.g. 'Eiffel Tower'")
        for name, value, lo, hi in (("resolution", resolution, 64, 2048), ("batch_size", batch_size, 1, 64)):
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise ValueError(f"{TITLE}: {name} must be a whole number from {lo} to {hi}, got {value!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"{TITLE}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if low_vram not in LOW_VRAM:
            raise ValueError(f"{TITLE}: low_vram must be one of {', '.join(LOW_VRAM)}, got {low_vram!r}")
        if not isinstance(gradient_checkpointing, bool):
            raise ValueError(f"{TITLE}: gradient_checkpointing must be true or false, got {gradient_checkpointing!r}")
        if resolution % 8:
            raise ValueError(f"{TITLE}: resolution must be a multiple of 8 (the VAE's scale), got {resolution}")
        family, clip_keys = check_inputs(clip, model)
        keys = trainable_keys(clip_keys, parameters)
        if text_encoders not in TEXT_ENCODERS:
            raise ValueError(f"{TITLE}: text_encoders must be one of {', '.join(TEXT_ENCODERS)}, got {text_encoders!r}")
        if text_encoders != "all":
            keys = [k for k in keys if k.startswith(f"{text_encoders}.")]
            if not keys:
                raise ValueError(f"{TITLE}: this CLIP has no {text_encoders} encoder; choose all")
        kind, sigma_data = parameterisation(model)
        if not zero_shot and (images is None or vae is None):
            raise ValueError(f"{TITLE}: connect images of the concept and the VAE, or turn on zero_shot")
        start = time.perf_counter()
        g = torch.Generator().manual_seed(int(seed))
        base = model.model

        # latents of the images in the model's space, encoded once
        if zero_shot:
            channels = int(getattr(getattr(base, "latent_format", None), "latent_channels", 4))
            latents = zero_shot_latents(batch_size, (channels, resolution // 8, resolution // 8), g)
            n_images = 0
        else:
            if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1:
                raise ValueError(f"{TITLE}: images must be an IMAGE batch, got "
                                 f"{getattr(images, 'shape', type(images).__name__)}")
            pixels = prepare_images(images, resolution, g)
            with torch.no_grad():
                latents = base.process_latent_in(vae.encode(pixels)).float().cpu()
            n_images = int(images.shape[0])

        context_dim = (getattr(getattr(base, "model_config", None), "unet_config", None) or {}).get("context_dim")
        if context_dim is not None:
            with torch.no_grad():
                width = int(clip.encode_from_tokens(clip.tokenize("")).shape[-1])  # SDXL: CLIP-L + bigG
            if width != int(context_dim):
                raise ValueError(f"{TITLE}: this CLIP gives {width}-wide text but this {family} model reads "
                                 f"{context_dim}-wide text; connect the CLIP that belongs to the model")
        device = run.compute_device()
        # the frozen model and text encoder as differentiable copies (patches applied, any storage ComfyUI or
        # ComfyUI-GGUF loads); the loaded MODEL and CLIP are only read, and need not be on the GPU
        cancel = comfy.model_management.throw_exception_if_processing_interrupted  # checked per weight read
        den = diffusion.Denoiser(model, device, tick=cancel,
                                 offload=None if low_vram == "auto" else low_vram == "on")
        te = diffusion.TextEncoder(clip, device, float32=keys, tick=cancel)  # trained weights exact, the rest as stored
        initial = {k: te.params[k] for k in keys}

        def encode(w, captions):
            rows = [te.encode(clip.tokenize(c), w) for c in captions]
            comfy.model_management.throw_exception_if_processing_interrupted()
            pooled = None if rows[0][1] is None else torch.cat([r[1] for r in rows]).to(device)
            return torch.cat([r[0] for r in rows]).to(device), pooled

        def denoise(x, sigma, context):
            rows, pooled = context
            return den.denoised(x, sigma, rows, pooled=pooled)

        sigmas = den.sigmas.detach().float().cpu()
        progress = run.Progress(epochs * -(-latents.shape[0] // batch_size))
        try:
            with den.checkpointing(gradient_checkpointing) as n_checkpointed:
                result = unlearn(initial, encode, Denoiser(denoise, sigmas, kind, sigma_data), latents,
                                 concept.strip(), concept_type, epochs=epochs, batch_size=batch_size,
                                 adam=AdamSettings(lr=learning_rate), seed=seed, device=device,
                                 autocast_dtype=PRECISIONS[precision], callback=lambda p: progress.at(p.step, p.total))
        except TrainingOutOfMemory as exc:
            t5 = sum(initial[k].numel() for k in keys if k.startswith("t5xxl."))
            hint = (f"; {t5:,} of the trained parameters are T5-XXL's: text_encoders = clip_l trains CLIP-L alone "
                    "(see the docs for what that leaves)") if t5 else ""
            raise TrainingOutOfMemory(f"{TITLE}: {exc}{hint}") from exc
        deltas = {k: v.detach().to("cpu", torch.float32) for k, v in result.deltas().items()}
        unlearning = Unlearning(
            deltas=deltas, concept=concept.strip(), concept_type=concept_type, parameters=parameters, epochs=epochs,
            learning_rate=float(learning_rate), seed=int(seed), batch_size=batch_size, images=n_images,
            zero_shot=bool(zero_shot), resolution=resolution, family=family, parameterisation=kind,
            epoch_losses=list(result.epoch_losses), seconds=time.perf_counter() - start, device=str(device))
        out = apply_unlearning(clip, unlearning, 1.0, TITLE)
        report = (unlearning.summary() + f"\nprecision: {precision}"
                  + (f"\ngradient checkpointing: {n_checkpointed} blocks of the model" if n_checkpointed
                     else "\ngradient checkpointing: off")
                  + ("\nlow VRAM: the model's blocks were held in CPU memory and moved to the GPU one at a time"
                     if den.offload else "\nlow VRAM: not available for this model (no blocks known to stream); "
                     "the model's weights were held on the device" if low_vram == "on" else ""))
        return {"ui": ui_report({"concept": unlearning.concept, "epoch_losses": unlearning.epoch_losses,
                                 "seconds": round(unlearning.seconds, 3), "parameters": result.parameters,
                                 "parameter_set": parameters, "device": str(device)}),
                "result": (out, unlearning, report)}


def require_unlearning(value, node: str) -> Unlearning:
    if not isinstance(value, Unlearning):
        raise ValueError(f"{node}: the unlearning input is not a few-shot unlearning (connect Few-shot Unlearn "
                         "Concept or Load Unlearning)")
    return value


def apply_unlearning(clip, u: Unlearning, strength: float, node: str):
    """A clone of ``clip`` carrying ``u``'s deltas as ``diff`` weight patches; refuses another encoder."""
    if clip is None or not hasattr(clip, "cond_stage_model"):
        raise ValueError(f"{node}: the clip input is not a CLIP")
    state = clip.cond_stage_model.state_dict()
    for k, d in u.deltas.items():
        if k not in state or tuple(state[k].shape) != tuple(d.shape):
            found = "missing" if k not in state else f"of shape {tuple(state[k].shape)}"
            raise ValueError(f"{node}: this unlearning was made for another text encoder ({u.family}): its weight "
                             f"{k} is {found} in this CLIP, expected {tuple(d.shape)}")
    out = clip.clone()
    added = out.add_patches({k: ("diff", (d,)) for k, d in u.deltas.items()}, strength)
    if len(added) != len(u.deltas):
        raise ValueError(f"{node}: only {len(added)} of {len(u.deltas)} text-encoder weights could be patched")
    return out


_LORA_KEY = re.compile(r"^clip_([lhg])\.transformer\.text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_T5_KEY = re.compile(r"^t5xxl\.transformer\.(.+)\.weight$")
LORA_PREFIXES = {"SD1.x": {"l": "lora_te", "h": "lora_te"}, "SD2.x": {"l": "lora_te", "h": "lora_te"},
                 "SDXL": {"l": "lora_te1", "g": "lora_te2"}, "Flux": {"l": "lora_te1", "t5xxl": "lora_te2"},
                 "SD3": {"l": "lora_te1", "g": "lora_te2", "t5xxl": "lora_te3"}}
"""The kohya/OneTrainer prefix ComfyUI's LoRA loader (``comfy.lora.model_lora_keys_clip``) maps to each encoder of
a family's CLIP: T5-XXL is ``lora_te2`` next to CLIP-L alone (Flux), ``lora_te3`` next to CLIP-L and G (SD3)."""


def lora_te_key(key: str, family: str = "SD1.x") -> tuple[str, str]:
    """``clip_l.transformer.text_model.encoder.layers.3.mlp.fc1.weight`` →
    (``lora_te_text_model_encoder_layers_3_mlp_fc1``, ``diff``) (``diff_b`` for a bias), with the family's
    prefix (``LORA_PREFIXES``); ``t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wo.weight`` →
    (``lora_te2_encoder_block_0_layer_1_DenseReluDense_wo``, ``diff``) on Flux."""
    prefixes = LORA_PREFIXES.get(family, {})
    m, t5 = _LORA_KEY.match(key), _T5_KEY.match(key)
    if m is not None and m[1] in prefixes:
        return f"{prefixes[m[1]]}_text_model_encoder_layers_{m[2]}_{m[3].replace('.', '_')}", \
            "diff" if m[4] == "weight" else "diff_b"
    if t5 is not None and "t5xxl" in prefixes:
        return f"{prefixes['t5xxl']}_{t5[1].replace('.', '_')}", "diff"
    raise ValueError(f"no LoRA text-encoder name for weight {key} of a {family} text encoder")


class SaveUnlearning:
    """Write a few-shot unlearning to models/rece as a .safetensors file."""

    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    DESCRIPTION = ("Saves a few-shot unlearning (the text encoder's weight changes and how they were made) to "
                   "models/rece, for Load Unlearning.")
    SEARCH_ALIASES = ["save unlearning", "few-shot unlearning", "unlearn", "save text encoder"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unlearning": (UNLEARNING, {"tooltip": "The unlearning to save."}),
                             "filename_prefix": ("STRING", {"default": "rece/unlearning",
                                                            "tooltip": "Path under models/rece; _00001 and "
                                                                       ".safetensors are added."})}}

    def save(self, unlearning, filename_prefix):
        u = require_unlearning(unlearning, "Save Unlearning")
        rel = files.save_new(files.FOLDER, filename_prefix, lambda p: save_unlearning(u, p, pack_version=__version__))
        return {"ui": ui_report({"saved": rel, "concept": u.concept}), "result": ()}


class LoadUnlearning:
    """Load a few-shot unlearning from models/rece and apply it to a CLIP."""

    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP", UNLEARNING, "STRING")
    RETURN_NAMES = ("clip", "unlearning", "report")
    OUTPUT_TOOLTIPS = ("The CLIP with the unlearning applied (a patch on a clone).",
                       "The loaded unlearning (e.g. for Export Unlearning as LoRA).",
                       "The file name and how the unlearning was made.")
    DESCRIPTION = ("Loads a few-shot unlearning file (.safetensors, checked before use) from models/rece and "
                   "applies it to the CLIP as a patch; the given CLIP is left untouched.")
    SEARCH_ALIASES = ["load unlearning", "few-shot unlearning", "unlearn", "apply unlearning"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP", {"tooltip": "The text encoder the unlearning was made from."}),
                             "unlearning_name": (files.loadable_names(),
                                                 {"tooltip": "An unlearning file in models/rece."}),
                             "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                                    "tooltip": "1 = as trained; 0 = no change."})}}

    def load(self, clip, unlearning_name, strength):
        check_widgets(type(self), "Load Unlearning", strength=strength)
        u = load_unlearning(files.resolve(files.FOLDER, unlearning_name))
        out = apply_unlearning(clip, u, float(strength), "Load Unlearning")
        return {"ui": ui_report({"loaded": unlearning_name, "concept": u.concept}),
                "result": (out, u, f"loaded {unlearning_name}\n{u.summary()}")}


class ExportUnlearningAsLoRA:
    """Write the unlearning as a LoRA file (lora_te_… keys) that ComfyUI's LoRA loaders apply to the CLIP."""

    CATEGORY = CATEGORY
    FUNCTION = "export"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("Where the LoRA was written and how many text-encoder weights it changes.",)
    DESCRIPTION = ("Exports the text encoder's weight changes as a LoRA file with full-weight difference keys "
                   "(lora_te_….diff / .diff_b): exact; load it with Load LoRA (strength_clip).")
    SEARCH_ALIASES = ["export lora", "unlearning to lora", "save lora", "few-shot unlearning", "unlearn"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unlearning": (UNLEARNING, {"tooltip": "The unlearning to export."}),
                             "filename_prefix": ("STRING", {"default": "rece/unlearning_lora",
                                                            "tooltip": "Path under models/loras; _00001 and "
                                                                       ".safetensors are added."}),
                             "precision": (["fp32", "fp16"], {"default": "fp32",
                                                              "tooltip": "fp32 is exact; fp16 halves the file and "
                                                                         "rounds the changes."})}}

    @torch.no_grad()
    def export(self, unlearning, filename_prefix, precision):
        u = require_unlearning(unlearning, "Export Unlearning as LoRA")
        dtype = torch.float16 if precision == "fp16" else torch.float32
        out = {}
        for k, d in u.deltas.items():
            name, kind = lora_te_key(k, u.family)
            out[f"{name}.{kind}"] = d.to(dtype).contiguous()
        meta = {"rece_unlearning_concept": u.concept, "rece_unlearning_family": u.family}
        rel = files.save_new("loras", filename_prefix, lambda p: save_file(out, p, metadata=meta))
        report = (f"exported {len(out)} text-encoder tensors ({u.n_parameters:,} parameters) to loras/{rel} "
                  f"({precision}{', exact' if precision == 'fp32' else ''}); apply with Load LoRA, strength_clip 1")
        return {"ui": ui_report({"exported": rel}), "result": (report,)}


NODE_CLASS_MAPPINGS = {"RECEFewShotUnlearnConcept": FewShotUnlearnConcept, "RECESaveUnlearning": SaveUnlearning,
                       "RECELoadUnlearning": LoadUnlearning, "RECEExportUnlearningAsLoRA": ExportUnlearningAsLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"RECEFewShotUnlearnConcept": TITLE, "RECESaveUnlearning": "Save Unlearning",
                              "RECELoadUnlearning": "Load Unlearning",
                              "RECEExportUnlearningAsLoRA": "Export Unlearning as LoRA"}
