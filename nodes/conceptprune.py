"""ConceptPrune nodes: record feed-forward activations while ComfyUI samples, prune the skilled weights.

- ConceptPrune Erase Concept: samples the base and concept prompts through ``comfy.sample.sample``
  (the model's own sampling, the chosen sampler), stopping at step τ; forward pre-hooks on the
  feed-forward output layers accumulate ``rece_core.prune.ColumnStats``; the union of the skilled
  masks of steps ``0 … τ−1`` is applied as a weight patch on a clone.
- Apply / Save / Load ConceptPrune, Export ConceptPrune as LoRA (full-weight ``.diff`` keys).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from safetensors.torch import save_file
from torch import Tensor

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
from comfy.weight_adapter.base import WeightAdapterBase

from ..rece_core import __version__
from ..rece_core.prune import ColumnStats, PruneResult, build_result, union_mask
from ..rece_core.prune_files import load_prune, save_prune
from ..rece_core.prune_presets import PRUNE_PRESETS, prompt_pairs
from . import files
from .checks import check_widgets, ui_report
from .host import architectures, encoding, run, weights

PRUNE = "CONCEPTPRUNE"
NAME = "conceptprune"
KINDS = ["artist", "nudity", "object", "custom"]
CATEGORY = "model_patches/rece"
CUSTOM_DEFAULTS = (0.01, 10)  # skill_ratio, τ for the custom kind (the artist preset's)
MEMORY_SHARE = 0.5  # of the free memory for one sampler call's batch (auto batch)


def split_lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


class PrunePatch(WeightAdapterBase):
    """``W ← W − strength · W ⊙ M``, ``M`` given by flat row-major indices (int64) of the weight.

    The adapter's only state is ``weights = (indices,)``: ComfyUI's dynamic VRAM rebuilds it as
    ``type(a)(a.loaded_keys, a.weights)``. Applied to the weight as ComfyUI hands it over at patch
    time, so it is exactly ``W ⊙ (1 − M)`` of the weight the model uses at strength 1.
    """

    name = NAME

    def __init__(self, loaded_keys: set[str], weights: tuple[Tensor]) -> None:
        self.loaded_keys = loaded_keys
        self.weights = weights

    def calculate_shape(self, key: str) -> None:
        return None

    def calculate_weight(self, weight: Tensor, key: str, strength: float, strength_model: float, offset,
                         function: Callable[[Tensor], Tensor] | None,
                         intermediate_dtype: torch.dtype = torch.float32, original_weight=None) -> Tensor:
        if strength == 0.0:
            return weight
        idx = self.weights[0].to(device=weight.device, dtype=torch.int64)
        rows, cols = idx // weight.shape[1], idx % weight.shape[1]
        values = weight[rows, cols]
        delta = -strength * values.to(torch.float32)
        weight[rows, cols] = values + (function(delta) if function is not None else delta).to(weight.dtype)
        return weight


    def bypass_forward(self, org_forward: Callable[..., Tensor], x: Tensor, *args, **kwargs) -> Tensor:
        """Zeroing single weights needs the weight itself: refused clearly in bypass mode."""
        raise ValueError("ConceptPrune zeroes single weights of a layer, which ComfyUI's bypass mode (the layer's "
                         "weight left alone, its forward wrapped) cannot do; use the model with its weights "
                         "patched (the default), or apply the exported LoRA")


def is_prune_patch(value: object) -> bool:
    return isinstance(value, WeightAdapterBase) and getattr(value, "name", None) == NAME


def patched(model, result: PruneResult, strength: float):
    """A clone of ``model`` with ``result``'s pruning patched in; ``model`` untouched."""
    out = model.clone()
    patches = {k: PrunePatch(set(), (v,)) for k, v in result.indices.items() if v.numel()}
    added = out.add_patches(patches, strength)
    if len(added) != len(patches):
        raise ValueError(f"only {len(added)} of {len(patches)} feed-forward weights could be patched")
    return out


def ffn_layers(model, node: str) -> tuple[architectures.Architecture, list[str]]:
    """The model's family and its feed-forward output weight keys, or a clear refusal."""
    arch, _ = weights.architecture(model)
    keys = arch.ffn_keys(list(model.model.state_dict().keys()))
    if not keys:
        able = ", ".join(a.title.split(" (")[0] for a in architectures.ARCHITECTURES if a.ffn_out)
        why = ("its feed-forward layers were not verified with this pack" if not arch.ffn_out else
               "it has none of the feed-forward output layers this family should have")
        raise ValueError(f"{node}: ConceptPrune is not available for this {weights.model_type(model)} model "
                         f"({arch.title}): {why} (ConceptPrune works on {able})")
    weights.require_readable(model, keys)
    return arch, keys


def require_prune(result, node: str, model=None) -> list[str]:
    """A ConceptPrune result made for ``model``'s family and layer shapes, or a clear error; its keys."""
    if not isinstance(result, PruneResult):
        raise ValueError(f"{node}: the prune input is not a ConceptPrune result")
    if model is None:
        return list(result.shapes)
    arch, keys = ffn_layers(model, node)
    if result.architecture != arch.name:
        raise ValueError(f"{node}: this prune was made for {result.architecture}, but this "
                         f"{weights.model_type(model)} model is {arch.title}")
    sd = model.model.state_dict()
    for key, shape in result.shapes.items():
        have = shape_of(model, key) if key in sd else None
        if have != tuple(shape):
            raise ValueError(f"{node}: this prune does not fit this model (layer {key} "
                             f"{'missing' if have is None else have}, the prune has {tuple(shape)})")
    return keys


def _encode(clip, text: str, arch) -> tuple[Tensor, dict]:
    """``(cond [1, rows, d], extra)`` as CLIPTextEncode gives them."""
    cond, extra = encoding.split_conditioning(clip.encode_from_tokens(clip.tokenize(text), return_pooled=True,
                                                                      return_dict=True))
    extra = {k: v for k, v in extra.items() if v is not None}
    if arch.guidance is not None:
        extra.setdefault("guidance", arch.guidance)
    return cond, extra


def _batched(items: list[tuple[Tensor, dict]]) -> list:
    """One CONDITIONING of a batch of prompts with the same shapes (tensors concatenated on dim 0)."""
    cond = torch.cat([c for c, _ in items])
    extra = {}
    for key, value in items[0][1].items():
        extra[key] = torch.cat([e[key] for _, e in items]) if isinstance(value, Tensor) else value
    return [[cond, extra]]


def _groups(encoded: list[tuple[Tensor, dict]], batch: int) -> list[list[tuple[Tensor, dict]]]:
    """Prompts in batches of at most ``batch``, each of one cond shape and one set of extra shapes."""
    by_shape: dict[tuple, list] = {}
    for item in encoded:
        cond, extra = item
        sig = (tuple(cond.shape), tuple(sorted((k, tuple(v.shape) if isinstance(v, Tensor) else repr(v))
                                               for k, v in extra.items())))
        by_shape.setdefault(sig, []).append(item)
    return [items[i:i + batch] for items in by_shape.values() for i in range(0, len(items), batch)]


def auto_batch(model, latent_shape: list[int], n: int) -> int:
    """Latents per sampler call: as many as ``MEMORY_SHARE`` of the free memory holds (at least 1)."""
    try:
        per = float(model.model.memory_required([2] + latent_shape[1:]))
        free = comfy.model_management.get_free_memory(model.load_device)
        return max(1, min(n, int(MEMORY_SHARE * free // max(per, 1.0))))
    except Exception:  # a model without a memory estimate: one call per side
        return n


class Recorder:
    """Forward pre-hooks on the feed-forward output layers: rows → ``ColumnStats`` at the current step."""

    def __init__(self, model, arch, keys: list[str], check: Callable[[], None]) -> None:
        self.stats: ColumnStats | None = None
        self.step = 0
        self.calls = 0
        self.check = check
        self.handles = []
        for i, key in enumerate(keys):
            module = comfy.utils.get_attr(model.model, key.removesuffix(".weight"))
            cols = arch.ffn_columns(key, shape_of(model, key))
            self.handles.append(module.register_forward_pre_hook(self._hook(key, cols, first=i == 0)))

    def _hook(self, key: str, cols, first: bool):
        def hook(module, args):
            self.check()  # Cancel within a step
            if self.stats is None:
                return None
            if first:
                self.calls += 1
            x = args[0]
            self.stats.add(self.step, key, x if cols is None else x[..., cols[0]:cols[1]])
            return None
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def record(model, recorder: Recorder, groups: list[list[tuple[Tensor, dict]]], negative: list, *, steps: int,
           last_step: int | None, cfg: float, sampler_name: str, scheduler: str, seed: int, size: int,
           stats: ColumnStats, progress: Callable[[], None]) -> Tensor:
    """Sample each batch of prompts (same noise for each prompt, as the authors' fixed seed) up to
    ``last_step``, recording into ``stats``; returns the last batch's latent."""
    out = None
    for group in groups:
        positive = _batched(group)
        latent = torch.zeros([len(group), 4, size // 8, size // 8])
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent[:1], seed)
        noise = noise.repeat([len(group)] + [1] * (noise.ndim - 1))
        recorder.stats, recorder.step = stats, 0

        def callback(step, x0, x, total_steps):
            recorder.step = step + 1
            progress()

        try:
            out = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                      denoise=1.0, last_step=last_step, callback=callback, disable_pbar=True,
                                      seed=seed)
        finally:
            recorder.stats = None
    return out


def settings_for(kind: str, skill_ratio: float, tau: int) -> tuple[float, int]:
    """The widget values, where 0 means the kind's preset (the paper's setting)."""
    preset = PRUNE_PRESETS.get(kind)
    ratio0, tau0 = (preset.skill_ratio, preset.tau) if preset else CUSTOM_DEFAULTS
    return (skill_ratio or ratio0), (tau or tau0)


def prompt_sets(kind: str, concepts: list[str], base_text: str, concept_text: str, node: str):
    """``(base prompts, {concept: concept prompts})``: the preset's pairs or the custom ones."""
    base, custom = split_lines(base_text), split_lines(concept_text)
    if base or custom:
        if not base or not custom:
            raise ValueError(f"{node}: give both base prompts and concept prompts (one per line), or neither")
        if len(base) != len(custom):
            raise ValueError(f"{node}: {len(base)} base prompts but {len(custom)} concept prompts; they are pairs")
        if any("{concept}" in c for c in custom):
            return base, {c: [p.replace("{concept}", c) for p in custom] for c in concepts}
        return base, {", ".join(concepts): custom}
    if kind not in PRUNE_PRESETS:
        raise ValueError(f"{node}: the custom kind needs base prompts and concept prompts (one per line; "
                         "'{concept}' in a concept prompt is replaced by each concept)")
    base = prompt_pairs(kind, "")[0]
    return base, {c: prompt_pairs(kind, c)[1] for c in concepts}


def shape_of(model, key: str) -> tuple[int, int]:
    """A weight's ``(out, in)`` as the model uses it (GGUF's logical shape, not its packed bytes)."""
    return tuple(int(x) for x in weights.logical_shape(weights.stored_weight(model, key)[0])[:2])


def model_weights(model) -> int:
    return sum(math.prod(weights.logical_shape(v)) for k, v in model.model.state_dict().items()
               if k.startswith("diffusion_model."))


def prune_ui(result: PruneResult, model_total: int, seconds: float, calls: int) -> dict:
    n = result.pruned_count
    return {"concepts": list(result.concepts), "kind": result.kind, "settings": dict(result.settings),
            "pruned": n, "share": n / max(1, result.layer_weights), "model_share": n / max(1, model_total),
            "layers": [{"key": l["key"].removeprefix("diffusion_model.").removesuffix(".weight"),
                        "pruned": l["pruned"], "share": l["share"]} for l in result.layers()],
            "seconds": round(seconds, 3), "forward_calls": calls}


class ConceptPruneEraseConcept:
    """Prune the feed-forward weights that draw a concept (ConceptPrune, training-free)."""

    DESCRIPTION = ("Erases concepts (one per line) by pruning the feed-forward weights that are skilled at them "
                   "(ConceptPrune): samples base and concept prompts up to step τ, scores each weight by "
                   "|W|·‖activation‖ and zeroes the concept's top weights of every row.")
    SEARCH_ALIASES = ["conceptprune", "concept prune", "prune", "skilled neurons", "wanda", "concept erasure",
                      "erase concept", "unlearn", "remove style", "remove artist", "remove nudity", "nsfw"]
    CATEGORY = CATEGORY
    FUNCTION = "prune"
    RETURN_TYPES = ("MODEL", PRUNE, "STRING")
    RETURN_NAMES = ("model", "prune", "report")
    OUTPUT_TOOLTIPS = ("The model with the skilled weights pruned (a patched clone; the model you loaded is "
                       "unchanged).",
                       "The prune itself (which weights): save it, apply it, or export it as a LoRA.",
                       "How many weights were pruned per layer, what share of the model, forward calls, time.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to prune (SD1.x/SD2.x/SDXL UNet, Flux)."}),
            "clip": ("CLIP", {"tooltip": "The text encoder that goes with the model."}),
            "concepts": ("STRING", {"multiline": True, "default": "Van Gogh",
                                    "tooltip": "Concepts to erase, one per line (their masks are united). For "
                                               "the nudity kind the paper's word is 'naked'."}),
            "concept_kind": (KINDS, {"default": "artist",
                                     "tooltip": "Which of the paper's prompt pairs and settings to use: artist "
                                                "('a photo of a {thing}' vs 'a {thing} in the style of {concept}', "
                                                "20 things), nudity ('a photo of a {human}' vs 'a photo of a "
                                                "{concept} {human}', 18 humans), object ('a {scene}' vs 'a "
                                                "{concept} in a {scene}', 12 scenes); custom: your own pairs."}),
            "skill_ratio": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.5, "step": 0.001, "round": False,
                                      "tooltip": "Share of each row's weights that can be skilled per step; 0 = "
                                                 "the kind's paper value (artist/nudity 0.01, object 0.02)."}),
            "tau": ("INT", {"default": 0, "min": 0, "max": 1000,
                            "tooltip": "τ: the masks of the first τ steps are united (sampling stops there); "
                                       "0 = the kind's paper value (artist/object 10, nudity 9)."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                              "tooltip": "The sampling schedule's steps (the paper: 50); only the first τ run."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                             "tooltip": "The one seed of every prompt's noise (the paper: 0)."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance (the paper: 7.5; the unconditional rows are "
                                         "recorded too, as in the authors' code)."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {
                "default": "euler", "tooltip": "ComfyUI's sampler (a deterministic one, e.g. euler, keeps batched "
                                              "prompts exactly like one at a time)."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "normal",
                                                               "tooltip": "ComfyUI's noise schedule."}),
            "size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64,
                             "tooltip": "Square image size sampled (SD1.5: 512, SDXL/Flux: 1024)."}),
        }, "optional": {
            "base_prompts": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "Your own base prompts, one per line (with concept prompts: "
                                                   "replaces the kind's pairs)."}),
            "concept_prompts": ("STRING", {"multiline": True, "default": "",
                                           "tooltip": "Your own concept prompts, one per line, paired with the "
                                                      "base prompts; '{concept}' is replaced by each concept."}),
            "batch": ("INT", {"default": 0, "min": 0, "max": 256,
                              "tooltip": "Prompts per sampler call; 0 = as many as half the free memory holds."}),
        }}

    @torch.no_grad()
    def prune(self, model, clip, concepts, concept_kind, skill_ratio, tau, steps, seed, cfg, sampler_name,
              scheduler, size, base_prompts="", concept_prompts="", batch=0):
        node = "ConceptPrune Erase Concept"
        start = time.perf_counter()
        check_widgets(type(self), node, skill_ratio=skill_ratio, tau=tau, steps=steps, seed=seed, cfg=cfg,
                      size=size)
        names = list(dict.fromkeys(split_lines(concepts)))
        if not names:
            raise ValueError(f"{node}: enter at least one concept to erase (one per line).")
        if concept_kind not in KINDS:
            raise ValueError(f"{node}: unknown concept kind {concept_kind!r}")
        ratio, tau = settings_for(concept_kind, skill_ratio, tau)
        if tau > steps:
            raise ValueError(f"{node}: τ={tau} is more than the {steps} sampling steps")
        base, concept_sets = prompt_sets(concept_kind, names, base_prompts, concept_prompts, node)
        arch, keys = ffn_layers(model, node)
        interrupted = comfy.model_management.throw_exception_if_processing_interrupted
        interrupted()

        encoded_base = [_encode(clip, p, arch) for p in base]
        encoded_sets = {c: [_encode(clip, p, arch) for p in ps] for c, ps in concept_sets.items()}
        negative = [list(_encode(clip, "", arch))]
        n_max = max([len(encoded_base)] + [len(v) for v in encoded_sets.values()])
        size_lat = [1, 4, size // 8, size // 8]
        per_call = batch or auto_batch(model, size_lat, n_max)
        base_groups = _groups(encoded_base, per_call)
        set_groups = {c: _groups(v, per_call) for c, v in encoded_sets.items()}
        calls_total = len(base_groups) + sum(len(g) for g in set_groups.values())
        progress = run.Progress(calls_total * tau + len(keys))
        done = 0

        def tick():
            nonlocal done
            done += 1
            progress.at(done)

        recorder = Recorder(model, arch, keys, interrupted)
        stats_base = ColumnStats()
        stats_sets = {c: ColumnStats() for c in set_groups}
        common = dict(steps=steps, last_step=tau, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                      seed=seed, size=size, progress=tick)
        try:
            record(model, recorder, base_groups, negative, stats=stats_base, **common)
            for c, groups in set_groups.items():
                record(model, recorder, groups, negative, stats=stats_sets[c], **common)
        finally:
            recorder.remove()

        device = run.compute_device()
        masks = []
        for key, w in weights.key_weights(model, keys, device, include_erasures=True, tick=tick):
            cols = arch.ffn_columns(key, tuple(w.shape[:2]))
            mask = None
            for stats in stats_sets.values():
                try:
                    m = union_mask(w, stats, stats_base, key, tau, ratio, cols)
                except KeyError:
                    raise ValueError(f"{node}: layer {key} did not run in each of the first {tau} steps "
                                     f"with sampler {sampler_name}; choose another sampler") from None
                mask = m if mask is None else mask | m
            masks.append((key, mask.cpu()))
            del w
        settings = {"skill_ratio": ratio, "tau": tau, "steps": steps, "seed": seed, "cfg": cfg,
                    "sampler": sampler_name, "scheduler": scheduler, "size": size}
        result = build_result(masks, names, architecture=arch.name, kind=concept_kind, settings=settings,
                              extra={"model": weights.model_type(model), "base_prompts": len(base),
                                     "concept_prompts": sum(len(v) for v in concept_sets.values())})
        out = patched(model, result, 1.0)
        seconds = time.perf_counter() - start
        total = model_weights(model)
        report = (result.summary(total) + f"\n{recorder.calls} diffusion-model forward calls in {calls_total} "
                  f"sampler call(s) of up to {per_call} prompt(s), {seconds:.1f} s on {device}")
        ui = prune_ui(result, total, seconds, recorder.calls) | {"model": weights.model_type(model)}
        return {"ui": ui_report(ui), "result": (out, result, report)}


class ApplyConceptPrune:
    """Apply a ConceptPrune result (from the node or a file) to a model, at a strength."""

    DESCRIPTION = "Zeroes the weights a ConceptPrune result names (at strength 1) in a patched clone of the model."
    SEARCH_ALIASES = ["apply prune", "conceptprune", "load prune", "concept erasure", "unlearn"]
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("The model with the prune applied (a patched clone).",
                       "Which concepts, how many weights per layer, at what strength.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A model of the family and size the prune was made for."}),
            "prune": (PRUNE, {"tooltip": "From ConceptPrune Erase Concept or Load ConceptPrune."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "1 = the pruned weights are zero, 0 = unchanged."}),
        }}

    def apply(self, model, prune, strength):
        node = "Apply ConceptPrune"
        check_widgets(type(self), node, strength=strength)
        require_prune(prune, node, model)
        out = patched(model, prune, strength)
        report = f"applied at strength {strength:g}: " + prune.summary(model_weights(model))
        return {"ui": ui_report(prune_ui(prune, model_weights(model), 0.0, 0) | {"strength": strength}),
                "result": (out, report)}


class SaveConceptPrune:
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    DESCRIPTION = ("Saves a ConceptPrune result (pruned indices per layer, settings, concepts) to models/rece. "
                   "A prune file shows where a concept lived in the model: share it as you would the concept.")
    SEARCH_ALIASES = ["save prune", "conceptprune", "export prune"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prune": (PRUNE, {"tooltip": "The prune to save."}),
                             "filename_prefix": ("STRING", {"default": "rece/conceptprune",
                                                            "tooltip": "Path under models/rece; _00001 and "
                                                                       ".safetensors are added."})}}

    def save(self, prune, filename_prefix):
        require_prune(prune, "Save ConceptPrune")
        rel = files.save_new(files.FOLDER, filename_prefix, lambda p: save_prune(prune, p, pack_version=__version__))
        return {"ui": ui_report({"saved": rel, "concepts": list(prune.concepts), "pruned": prune.pruned_count}),
                "result": ()}


class LoadConceptPrune:
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (PRUNE, "STRING")
    RETURN_NAMES = ("prune", "report")
    OUTPUT_TOOLTIPS = ("The loaded prune: connect it to Apply ConceptPrune.",
                       "The file name and the prune's report (concepts, settings, weights per layer).")
    DESCRIPTION = ("Loads a ConceptPrune file (.safetensors, checked before use) from models/rece for "
                   "Apply ConceptPrune.")
    SEARCH_ALIASES = ["load prune", "conceptprune", "import prune"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prune_name": (files.loadable_names(),
                                            {"tooltip": "A ConceptPrune file in models/rece."})}}

    def load(self, prune_name):
        prune = load_prune(files.resolve(files.FOLDER, prune_name))
        report = f"loaded {prune_name}\n{prune.summary()}"
        return {"ui": ui_report({"loaded": prune_name, "concepts": list(prune.concepts),
                                 "pruned": prune.pruned_count}), "result": (prune, report)}


class ExportConceptPruneAsLoRA:
    CATEGORY = CATEGORY
    FUNCTION = "export"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("Where the LoRA was written and how many layers it holds.",)
    DESCRIPTION = ("Writes the prune as a LoRA file of full-weight differences (<layer>.diff = −W ⊙ M) that "
                   "ComfyUI's LoraLoader applies exactly to this model at strength 1.")
    SEARCH_ALIASES = ["export lora", "prune to lora", "conceptprune", "save lora"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "The model the LoRA is for (its weights give the "
                                                            "differences)."}),
                             "prune": (PRUNE, {"tooltip": "The prune to export."}),
                             "filename_prefix": ("STRING", {"default": "rece/conceptprune_lora",
                                                            "tooltip": "Path under models/loras."}),
                             "precision": (["fp32", "fp16", "bf16"], {"default": "fp32",
                                                                      "tooltip": "Exact when it is the model's "
                                                                                 "own weight precision or wider."})}}

    @torch.no_grad()
    def export(self, model, prune, filename_prefix, precision):
        node = "Export ConceptPrune as LoRA"
        require_prune(prune, node, model)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        base = model.clone()  # our own prune patches left out: the differences are from the unpruned weights
        for key in prune.shapes:
            if key in base.patches:
                base.patches[key] = [p for p in base.patches[key] if not is_prune_patch(p[1])]
        out = {}
        keys = [k for k, v in prune.indices.items() if v.numel()]
        for key, w in weights.key_weights(base, keys, torch.device("cpu"), include_erasures=True):
            diff = torch.zeros(w.shape, dtype=torch.float32)
            flat = prune.indices[key]
            diff.view(-1)[flat] = -w.reshape(-1)[flat]
            out[f"{key.removesuffix('.weight')}.diff"] = diff.to(dtype).contiguous()
        meta = {"conceptprune_concepts": ", ".join(prune.concepts)}
        rel = files.save_new("loras", filename_prefix, lambda p: save_file(out, p, metadata=meta))
        report = (f"exported {len(out)} layers ({prune.pruned_count:,} pruned weights) to loras/{rel} as full-weight "
                  f"differences ({precision}); apply with LoraLoader at strength_model 1")
        return {"ui": ui_report({"exported": rel, "layers": len(out)}), "result": (report,)}


NODE_CLASS_MAPPINGS = {
    "ConceptPruneEraseConcept": ConceptPruneEraseConcept,
    "ConceptPruneApply": ApplyConceptPrune,
    "ConceptPruneSave": SaveConceptPrune,
    "ConceptPruneLoad": LoadConceptPrune,
    "ConceptPruneExportLoRA": ExportConceptPruneAsLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConceptPruneEraseConcept": "ConceptPrune Erase Concept",
    "ConceptPruneApply": "Apply ConceptPrune",
    "ConceptPruneSave": "Save ConceptPrune",
    "ConceptPruneLoad": "Load ConceptPrune",
    "ConceptPruneExportLoRA": "Export ConceptPrune as LoRA",
}
