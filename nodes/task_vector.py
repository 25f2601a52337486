"""Task-vector erasure with Diverse Inversion (Pham et al., arXiv 2404.03631): nodes.

- "Task Vector Erase Concept": fine-tune LoRA adapters toward the concept on the model's own images with
  empty captions (the paper's prompt-agnostic fine-tune), or take an existing LoRA file, as the task
  vector τ; return the model with ``θ − α·τ`` (a patched clone: ComfyUI's own LoRA patches at strength −α),
  τ as a ``LORA_MODEL`` (ComfyUI's Load LoRA Model / Save LoRA Weights apply or save it at any strength)
  and a report. α = 0 chooses α by Diverse Inversion.
- "Diverse Inversion": learn N word embeddings that each make the model draw the concept (textual
  inversion's loss plus a diversity term), as CONDITIONING and as embedding files for ``embedding:``; with
  a task vector, the α at which the set stops reaching the concept and a per-layer ranking.
"""

from __future__ import annotations

import math
import time

import torch
from safetensors.torch import save_file

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.utils
import folder_paths

from ..rece_core import task_vector as tv
from ..rece_core.diverse_inversion import Inversion, alpha_for_set, diverse_inversion, make_probe
from .checks import check_widgets, ui_report
from .files import resolve, save_new
from .host import run
from .host.diffusion import Denoiser, TokenEncoder, require_text_rows_unet

CATEGORY = "model_patches/rece"
FINETUNE = "(fine-tune on the concept)"
PROBE_SAMPLES = 32
LORA_MODEL = "LORA_MODEL"
ADAPTERS = ["lora", "full weights"]
FULL = "full weights"


def lora_names() -> list[str]:
    return [FINETUNE] + [n for n in folder_paths.get_filename_list("loras") if n.lower().endswith(".safetensors")]


def _interrupted() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


# --------------------------------------------------------------------------- the concept's latents

def concept_latents(model, clip, vae, image, concept: str, count: int, size: int, steps: int, seed: int,
                    progress: run.Progress) -> tuple[torch.Tensor, str]:
    """The concept's latents in the model's own latent space (``process_latent_in``): ``image`` encoded
    by ``vae`` when given, else ``count`` images the model itself draws for ``concept`` (ComfyUI's
    sampler, euler, CFG 7.5, as the authors' generate_training_images.py uses the base pipeline)."""
    if image is not None:
        if vae is None:
            raise ValueError("connect the VAE that belongs to the model to encode the images")
        with torch.inference_mode(False):
            latents = model.model.process_latent_in(vae.encode(image[:, :, :, :3]).float()).detach().clone()
        progress.tick()
        return latents, f"{latents.shape[0]} given image(s)"
    import comfy.sample

    tokens = clip.tokenize(concept)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    ucond, upooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    positive, negative = [[cond, {"pooled_output": pooled}]], [[ucond, {"pooled_output": upooled}]]
    channels = getattr(getattr(model.model, "latent_format", None), "latent_channels", 4)
    outs = []
    for i in range(count):
        empty = torch.zeros(1, channels, size // 8, size // 8)
        noise = comfy.sample.prepare_noise(empty, seed + i)
        out = comfy.sample.sample(model, noise, steps, 7.5, "euler", "normal", positive, negative, empty,
                                  seed=seed + i, disable_pbar=True, callback=lambda *a: _interrupted())
        outs.append(out.float())
        progress.tick()
    with torch.inference_mode(False):
        latents = model.model.process_latent_in(torch.cat(outs)).detach().clone()
    return latents, f"{count} image(s) the model drew for {concept!r} ({size}px, {steps} steps)"


# --------------------------------------------------------------------------- task vectors as LoRA patches

def load_lora_file(name: str) -> dict[str, torch.Tensor]:
    """A LoRA from models/loras (.safetensors only), or a clear error naming the file."""
    if not name.lower().endswith(".safetensors"):
        raise ValueError(f"{name}: only .safetensors LoRA files are read")
    path = resolve("loras", name)
    try:
        return comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as exc:
        raise ValueError(f"{name}: not a readable safetensors LoRA ({str(exc)[:200]})") from None


def lora_patches(model, lora: dict[str, torch.Tensor], name: str) -> dict:
    """ComfyUI's own patches of ``lora`` for this model's diffusion model (as LoraLoader builds them)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    lora = comfy.lora_convert.convert_lora(lora)
    patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
    patches = {k: v for k, v in patches.items() if k.startswith("diffusion_model.")}
    if not patches:
        raise ValueError(f"{name}: holds no layer of this model's diffusion model (a LoRA for another model "
                         "family, or a text-encoder-only LoRA)")
    return patches


@torch.no_grad()
def tau_of(den: Denoiser, patches: dict) -> dict[str, torch.Tensor]:
    """τ of each patched layer: its weight with the patch at strength 1, minus its weight (ComfyUI's own
    ``calculate_weight``, float32)."""
    out = {}
    with torch.inference_mode(False):
        for key, patch in patches.items():
            if f"m.{key}" not in den.params:
                continue
            w = den.weight(key)
            out[key] = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], w.clone(), key,
                                                   intermediate_dtype=torch.float32) - w
    return out


def lora_sd(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> dict[str, torch.Tensor]:
    """A LoRA state dict (``diffusion_model.<layer>.lora_up/lora_down/alpha``) ComfyUI's loaders read."""
    out = {}
    for key, (up, down) in layers.items():
        base = key.removesuffix(".weight")
        out[f"{base}.lora_up.weight"] = up.detach().float().cpu().contiguous()
        out[f"{base}.lora_down.weight"] = down.detach().float().cpu().contiguous()
        out[f"{base}.alpha"] = torch.tensor(float(rank))
    return out


def trainable_layers(den: Denoiser) -> list[str]:
    """The layers the fine-tune adapts: every linear weight of the transformer blocks (attention and
    feed-forward; every 2-D weight where the model has no ``transformer_blocks``)."""
    keys = [k.removeprefix("m.") for k, v in den.params.items()
            if k.startswith("m.diffusion_model.") and k.endswith(".weight") and v.ndim == 2]
    blocks = [k for k in keys if "transformer_blocks" in k]
    return blocks or keys


def finetune(den: Denoiser, latents: torch.Tensor, neutral: torch.Tensor, adapter: str, rank: int, steps: int,
             lr: float, seed: int, progress) -> tuple[dict[str, torch.Tensor], list[float]]:
    """τ trained toward the concept with empty captions (the pack's training loop), as a LoRA state dict:
    ``adapter = "lora"``: LoRA factors (up starts at 0, ``alpha = rank``); ``"full weights"``: the trained
    layers themselves, τ = their change, written as ComfyUI's ``.diff`` keys."""
    from ..rece_core.train import AdamSettings, train

    keys = trainable_layers(den)
    g = torch.Generator().manual_seed(seed)
    full = adapter == FULL
    initial = {}
    for k in keys:
        w = den.weight(k)
        if full:
            initial[k] = w
        else:
            initial[f"{k}|down"] = torch.randn(rank, w.shape[1], generator=g) / math.sqrt(w.shape[1])
            initial[f"{k}|up"] = torch.zeros(w.shape[0], rank)
    n = latents.shape[0]
    batch = min(4, n)
    epochs = max(1, math.ceil(steps / math.ceil(n / batch)))

    def loss(trainables, step):
        if full:
            override = {k: trainables[k] for k in keys}
        else:
            override = {k: den.weight(k) + trainables[f"{k}|up"] @ trainables[f"{k}|down"] for k in keys}
        x0 = latents[step.batch].to(den.device)
        noise, t = step.randn(*x0.shape), step.rand(x0.shape[0])
        with torch.inference_mode(False):
            cond = neutral.to(den.device, torch.float32).clone().expand(x0.shape[0], -1, -1)
        return den.loss(override)(cond, x0, noise, t).mean()

    result = train(initial, loss, n_items=n, batch_size=batch, epochs=epochs,
                   adam=AdamSettings(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), seed=seed,
                   device=den.device, callback=lambda p: progress(p.step, p.total))
    if full:
        deltas = result.deltas()
        return {f"{k.removesuffix('.weight')}.diff": deltas[k].detach().float().cpu().contiguous() for k in keys}, \
            list(result.losses)
    layers = {k: (result.trained[f"{k}|up"], result.trained[f"{k}|down"]) for k in keys}
    return lora_sd(layers, rank), list(result.losses)


# --------------------------------------------------------------------------- Diverse Inversion

def invert(den: Denoiser, enc: TokenEncoder, latents, n, steps, lr, diversity, seed, progress) -> Inversion:
    with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
        return diverse_inversion(enc, den.loss(), latents, enc.init, n=n, steps=steps, lr=lr, diversity=diversity,
                                 seed=seed, check=_interrupted, progress=progress)


def choose(den: Denoiser, enc: TokenEncoder, inv: Inversion, latents, tau: dict, alpha_max: float, seed: int):
    """α for the set (``alpha_for_set`` on θ − α·τ) and the per-layer ranking at α = 0."""
    probe = make_probe(latents, PROBE_SAMPLES, seed + 1)
    with torch.inference_mode(False):
        neutral = enc.text("").detach().clone()

        def loss_with(a):
            return den.loss({k: den.weight(k) - a * d for k, d in tau.items()} if a else None)

        search, l0, base = alpha_for_set(loss_with, enc, inv.embeddings, neutral, probe, alpha_max=alpha_max,
                                         check=_interrupted)
        leaves = {k: den.weight(k).clone().requires_grad_(True) for k in tau}
        with torch.enable_grad():
            conds = enc(inv.embeddings).detach()
            total = 0.0
            for i in range(conds.shape[0]):
                s = probe.x0.shape[0]
                total = total + den.loss(leaves)(conds[i:i + 1].expand(s, -1, -1), probe.x0, probe.noise,
                                                 probe.t).mean()
            total.backward()
        ranking = tv.rank_layers({k: v.grad for k, v in leaves.items()}, tau)
    return search, l0, base, ranking


def write_embeddings(inv: Inversion, enc: TokenEncoder, prefix: str) -> list[str]:
    """One file per embedding in models/embeddings, ``{<embedding_key>: [1, d]}``: ComfyUI's ``embedding:``
    syntax loads each (``embedding:<prefix>_00001`` ...)."""
    names = []
    for v in inv.embeddings:
        tensors = {enc.embedding_key: v.detach().float().cpu().reshape(1, -1).contiguous()}
        rel = save_new("embeddings", prefix,
                       lambda p: save_file(tensors, p, metadata={"rece_method": "diverse_inversion"}))
        names.append(rel.removesuffix(".safetensors"))
    return names


def edited_model(model, patches: dict, alpha: float, keys: list[str] | None = None):
    """A clone of ``model`` with ``patches`` at strength ``−α`` (LoraLoader's own patching)."""
    out = model.clone()
    chosen = patches if keys is None else {k: patches[k] for k in keys}
    out.add_patches(chosen, -alpha)
    return out


def ranking_text(ranking: list[tuple[str, float]], top: int = 20) -> str:
    return "\n".join(f"{k.removeprefix('diffusion_model.')}\t{s:.4g}" for k, s in ranking[:top])


TRAINS = "the task-vector fine-tune and Diverse Inversion call"


class TaskVectorEraseConcept:
    """Erase a concept with a task vector: ``θ − α·τ`` for a fine-tune (or LoRA) τ of the concept."""

    DESCRIPTION = ("Fine-tunes LoRA adapters toward the concept on images the model draws itself, with empty "
                   "captions (prompt-agnostic), and subtracts the change at strength α: θ − α·τ. Or subtracts a "
                   "LoRA you already hold. α = 0 chooses α by Diverse Inversion.")
    SEARCH_ALIASES = ["task vector", "concept erasure", "erase concept", "negative lora", "subtract lora",
                      "unlearn", "nsfw", "safety", "diverse inversion"]
    CATEGORY = CATEGORY
    FUNCTION = "erase"
    RETURN_TYPES = ("MODEL", LORA_MODEL, "FLOAT", "STRING")
    RETURN_NAMES = ("model", "task_vector", "alpha", "report")
    OUTPUT_TOOLTIPS = ("The model with θ − α·τ (a patched clone; the model you loaded is unchanged).",
                       "τ as a LoRA: Load LoRA Model at strength −α erases, Save LoRA Weights writes it.",
                       "The strength α used.",
                       "What was trained or loaded, α and how it was chosen, the per-layer ranking.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to erase from (SD1.x, SD2.x)."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder (draws the training images; Diverse Inversion)."}),
            "concept": ("STRING", {"multiline": True, "default": "nudity", "tooltip": "The concept to erase."}),
            "task_vector_from": (lora_names(), {"default": FINETUNE, "tooltip": "Fine-tune on the concept, or "
                                                "a LoRA of the concept in models/loras used as the task vector."}),
            "alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.05, "round": False,
                                "tooltip": "Edit strength α in θ − α·τ; 0 = choose by Diverse Inversion "
                                           "(the paper's scripts use 1.75 for a full fine-tune)."}),
            "steps": ("INT", {"default": 200, "min": 1, "max": 100000, "tooltip": "Fine-tune steps (paper: 200)."}),
            "lr": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": False,
                             "tooltip": "Fine-tune learning rate (LoRA; the paper's full fine-tune uses 1e-5)."}),
            "adapter": (ADAPTERS, {"default": "lora", "tooltip": "What the fine-tune trains on the transformer "
                                   "blocks' linear layers: LoRA adapters (small, shareable) or the full weights of "
                                   "those layers (as the paper, which trains the whole UNet)."}),
            "rank": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "LoRA rank of the fine-tune."}),
            "images": ("INT", {"default": 16, "min": 1, "max": 1000, "tooltip": "Images the model draws of the "
                               "concept to fine-tune on (paper: 200); unused with an IMAGE input."}),
            "image_size": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64,
                                   "tooltip": "Size of the images the model draws (its native size)."}),
            "sample_steps": ("INT", {"default": 20, "min": 1, "max": 200,
                                     "tooltip": "Sampling steps of each drawn image (euler, CFG 7.5)."}),
            "inversions": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "Diverse Inversion: embeddings "
                                   "learned when α = 0."}),
            "inversion_steps": ("INT", {"default": 100, "min": 1, "max": 100000,
                                        "tooltip": "Diverse Inversion: optimisation steps (when α = 0)."}),
            "inversion_lr": ("FLOAT", {"default": 5e-3, "min": 1e-6, "max": 1.0, "step": 1e-4, "round": False,
                                       "tooltip": "Diverse Inversion: Adam learning rate of the embeddings."}),
            "layer_fraction": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                         "tooltip": "Edit only the layers ranked highest by Diverse Inversion "
                                                    "whose scores add up to this share (1 = every layer, as "
                                                    "the authors' save_tv.py). Below 1 needs α = 0."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1, "control_after_generate": True,
                             "tooltip": "Seed of the drawn images, the fine-tune and the inversion."}),
        }, "optional": {
            "vae": ("VAE", {"tooltip": "Needed only to encode the optional images."}),
            "image": ("IMAGE", {"tooltip": "Images of the concept to fine-tune on instead of drawn ones."}),
        }}

    def erase(self, model, clip, concept, task_vector_from, alpha, steps, lr, adapter, rank, images, image_size,
              sample_steps, inversions, inversion_steps, inversion_lr, layer_fraction, seed, vae=None, image=None):
        start = time.perf_counter()
        title = "Task Vector Erase Concept"
        check_widgets(type(self), title, alpha=alpha, steps=steps, lr=lr, rank=rank, images=images,
                      image_size=image_size, sample_steps=sample_steps, inversions=inversions,
                      inversion_steps=inversion_steps, inversion_lr=inversion_lr, layer_fraction=layer_fraction,
                      seed=seed)
        concept = concept.strip()
        if not concept:
            raise ValueError(f"{title}: enter the concept to erase")
        if layer_fraction < 1.0 and alpha != 0.0:
            raise ValueError(f"{title}: a layer subset is chosen by Diverse Inversion; set alpha to 0 or "
                             "layer_fraction to 1")
        trains = task_vector_from == FINETUNE
        need_latents = trains or alpha == 0.0
        total = (0 if not need_latents else (1 if image is not None else images)) + (steps if trains else 0) \
            + (inversion_steps if alpha == 0.0 else 0) + 1
        progress = run.Progress(total)
        done = [0]

        def at(k: int, _n: int | None = None) -> None:
            progress.at(done[0] + k)

        _interrupted()
        device = run.compute_device()
        lines = []
        latents, den = None, None
        if need_latents:  # a given LoRA at a given α needs neither images nor the model's weights
            require_text_rows_unet(model, TRAINS)
            den = Denoiser(model, device)
            latents, source = concept_latents(model, clip, vae, image, concept, images, image_size, sample_steps,
                                              seed, progress)
            done[0] = progress.done
            lines.append(f"concept images: {source}")
        losses: list[float] = []
        if trains:
            with torch.inference_mode(False), torch.no_grad():
                neutral = clip.encode_from_tokens(clip.tokenize("")).float().clone()
            if adapter not in ADAPTERS:
                raise ValueError(f"{title}: adapter must be one of {ADAPTERS}, got {adapter!r}")
            lora, losses = finetune(den, latents, neutral, adapter, rank, steps, lr, seed, at)
            done[0] += steps
            name = "fine-tune"
            what = "full weights" if adapter == FULL else f"LoRA rank {rank}"
            lines.append(f"fine-tuned {what} on {len(trainable_layers(den))} layers, {len(losses)} steps, "
                         f"lr {lr:g}, empty captions; loss {losses[0]:.4g} → {losses[-1]:.4g}")
        else:
            lora = load_lora_file(task_vector_from)
            name = task_vector_from
            lines.append(f"task vector: the LoRA {task_vector_from}")
        patches = lora_patches(model, lora, name)
        keys, ranking, search, chosen = None, [], None, alpha
        if alpha == 0.0:
            enc = TokenEncoder(clip, concept, device)
            inv = invert(den, enc, latents, inversions, inversion_steps, inversion_lr, 0.1, seed, at)
            done[0] += inversion_steps
            tau = tau_of(den, patches)
            search, l0, base, ranking = choose(den, enc, inv, latents, tau, 4.0, seed)
            chosen = search.alpha
            keys = tv.top_layers(ranking, layer_fraction) if layer_fraction < 1.0 else None
            lines.append(f"Diverse Inversion: {inversions} embeddings, {inversion_steps} steps; the set "
                         + (f"stops reaching the concept at α = {chosen:.3g}" if search.found else
                            f"still reaches the concept at α = {chosen:.3g} (the largest tried)"))
        out = edited_model(model, patches, chosen, keys)
        progress.at(total)
        lines.append(f"edited {len(keys) if keys is not None else len(patches)} of {len(patches)} layers at α = "
                     f"{chosen:.3g} in {time.perf_counter() - start:.1f} s")
        if ranking:
            lines.append("layers ranked by how fast subtracting them takes the concept from the set:\n"
                         + ranking_text(ranking, 10))
        report = "\n".join(lines)
        ui = {"method": "task_vector", "concept": concept, "alpha": chosen, "found": None if search is None
              else search.found, "curve": [] if search is None else [list(c) for c in search.curve],
              "losses": losses, "layers": len(patches), "edited": len(keys) if keys is not None else len(patches),
              "ranking": [[k, s] for k, s in ranking[:20]], "source": name}
        return {"ui": ui_report(ui), "result": (out, lora, float(chosen), report)}


class DiverseInversion:
    """Learn N diverse word embeddings that each make the model draw the concept (red-team set)."""

    DESCRIPTION = ("Learns N word embeddings that each make the model draw the concept (textual inversion with a "
                   "diversity term), saved to models/embeddings for embedding:<name> in any prompt. With a task "
                   "vector, finds the strength α at which none of them reaches the concept any more.")
    SEARCH_ALIASES = ["diverse inversion", "textual inversion", "red team", "attack", "embedding",
                      "concept erasure", "task vector", "test erasure"]
    CATEGORY = CATEGORY
    FUNCTION = "invert"
    OUTPUT_NODE = True
    RETURN_TYPES = ("CONDITIONING", "FLOAT", "STRING", "STRING")
    RETURN_NAMES = ("conditioning", "alpha", "ranking", "report")
    OUTPUT_TOOLTIPS = ("All N embeddings as conditioning (combined); sample one with embedding:<name>.",
                       "The α at which the set stops reaching the concept (0 without a task vector).",
                       "Layers ranked by how fast subtracting their share of τ takes the concept from the set.",
                       "The embedding files, their losses, α and how it was found.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to invert on (SD1.x, SD2.x), e.g. an erased one to red-team."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder (SD1.x CLIP-L, SD2.x CLIP-H): the embeddings are "
                                         "word embeddings of this encoder."}),
            "concept": ("STRING", {"multiline": False, "default": "nudity",
                                   "tooltip": "The concept (its first word starts every embedding)."}),
            "count": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "N, the number of embeddings."}),
            "steps": ("INT", {"default": 100, "min": 1, "max": 100000, "tooltip": "Optimisation steps."}),
            "lr": ("FLOAT", {"default": 5e-3, "min": 1e-6, "max": 1.0, "step": 1e-4, "round": False,
                             "tooltip": "Adam learning rate of the embeddings."}),
            "diversity": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 100.0, "step": 0.01, "round": False,
                                    "tooltip": "λ of the diversity term (mean pairwise cosine of the embeddings' "
                                               "offsets from the concept word)."}),
            "images": ("INT", {"default": 8, "min": 1, "max": 1000,
                               "tooltip": "Images the model draws of the concept; unused with an IMAGE input."}),
            "image_size": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64,
                                   "tooltip": "Size of the images the model draws (its native size)."}),
            "sample_steps": ("INT", {"default": 20, "min": 1, "max": 200,
                                     "tooltip": "Sampling steps of each drawn image (euler, CFG 7.5)."}),
            "alpha_max": ("FLOAT", {"default": 4.0, "min": 0.05, "max": 20.0, "step": 0.05,
                                    "tooltip": "The largest α the search tries (with a task vector)."}),
            "filename_prefix": ("STRING", {"default": "rece/diverse_inversion",
                                           "tooltip": "Path under models/embeddings; _00001 ... per embedding."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1, "control_after_generate": True,
                             "tooltip": "Seed of the drawn images and the inversion."}),
        }, "optional": {
            "task_vector": (LORA_MODEL, {"tooltip": "τ (Task Vector Erase Concept's output): find α for it."}),
            "vae": ("VAE", {"tooltip": "Needed only to encode the optional images."}),
            "image": ("IMAGE", {"tooltip": "Images of the concept instead of ones the model draws."}),
        }}

    def invert(self, model, clip, concept, count, steps, lr, diversity, images, image_size, sample_steps, alpha_max,
               filename_prefix, seed, task_vector=None, vae=None, image=None):
        title = "Diverse Inversion"
        check_widgets(type(self), title, count=count, steps=steps, lr=lr, diversity=diversity, images=images,
                      image_size=image_size, sample_steps=sample_steps, alpha_max=alpha_max, seed=seed)
        concept = concept.strip()
        if not concept:
            raise ValueError(f"{title}: enter the concept")
        start = time.perf_counter()
        total = (1 if image is not None else images) + steps + 1
        progress = run.Progress(total)
        _interrupted()
        device = run.compute_device()
        enc = TokenEncoder(clip, concept, device)
        require_text_rows_unet(model, TRAINS)
        den = Denoiser(model, device)
        latents, source = concept_latents(model, clip, vae, image, concept, images, image_size, sample_steps, seed,
                                          progress)
        done = progress.done
        inv = invert(den, enc, latents, count, steps, lr, diversity, seed, lambda k, n: progress.at(done + k))
        names = write_embeddings(inv, enc, filename_prefix)
        lines = [f"{count} embeddings for {concept!r} from {source}, {steps} steps, diversity {inv.diversity:.3f} "
                 f"(mean pairwise cosine of offsets); files: " + ", ".join(f"embedding:{n}" for n in names)]
        alpha, ranking, search = 0.0, [], None
        if task_vector is not None:
            patches = lora_patches(model, task_vector, "task_vector")
            search, l0, base, ranking = choose(den, enc, inv, latents, tau_of(den, patches), alpha_max, seed)
            alpha = search.alpha
            lines.append(f"neutral loss {l0:.4g}; the set's losses {', '.join(f'{x:.4g}' for x in base.tolist())}; "
                         + (f"no embedding reaches the concept from α = {alpha:.3g}" if search.found
                            else f"some embedding still reaches the concept at α = {alpha:.3g}"))
        with torch.inference_mode(False):
            conds = enc(inv.embeddings).detach()
        out = [[conds[i:i + 1].to(comfy.model_management.intermediate_device()), {}] for i in range(conds.shape[0])]
        progress.at(total)
        lines.append(f"{time.perf_counter() - start:.1f} s")
        ui = {"method": "diverse_inversion", "concept": concept, "embeddings": names, "alpha": alpha,
              "found": None if search is None else search.found,
              "curve": [] if search is None else [list(c) for c in search.curve],
              "ranking": [[k, s] for k, s in ranking[:20]], "diversity": inv.diversity}
        return {"ui": ui_report(ui), "result": (out, float(alpha), ranking_text(ranking), "\n".join(lines))}


NODE_CLASS_MAPPINGS = {
    "RECETaskVectorEraseConcept": TaskVectorEraseConcept,
    "RECEDiverseInversion": DiverseInversion,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RECETaskVectorEraseConcept": "Task Vector Erase Concept",
    "RECEDiverseInversion": "Diverse Inversion",
}
