"""The node classes: thin adapters from ComfyUI's MODEL/CLIP to ``rece_core``."""

from __future__ import annotations

import dataclasses
import re
import time
import uuid

import torch

import comfy.model_management

from ..rece_core import PRESETS, Erasure, LowRankTransform, rece
from ..rece_core.derive import derive_with_transform, weighted_norm2
from ..rece_core.pooled import rece_vectors
from ..rece_core.procedure import fit_rows
from . import files
from .host import encoding, run, weights
from .checks import check_lines, check_widgets, ui_report
from .patch import ErasurePatch, is_erasure_patch

ERASURE = "RECE_ERASURE"
KINDS = ["nudity", "unsafe", "artistic_style", "object", "custom"]
CATEGORY = "model_patches/rece"
MIN_REG = 1e-6  # ρ = 0 leaves ΣW'ᵀW' singular on real models; 1e-6 solves (float64 Cholesky)
MIN_LAMB = 1e-6  # λ = 0 leaves λI + s·Σeeᵀ + p·Σrrᵀ singular with fewer token rows than d


def split_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def patched(model, erasure: Erasure, keys: list[str], strength: float, spaces: dict[str, list[str]] | None = None):
    """A clone of ``model`` carrying ``erasure`` as a weight patch on every key, and the transform of each of its
    other text spaces on that space's readers (``spaces``: name → keys; the pooled vector's columns only, where a
    layer reads more); ``model`` untouched."""
    out = model.clone()
    patch = ErasurePatch.of(erasure.transform)
    added = out.add_patches({k: patch for k in keys}, strength)
    if len(added) != len(keys):
        raise ValueError(f"only {len(added)} of {len(keys)} cross-attention weights could be patched")
    wanted = _space_patches(model, erasure, spaces or {})
    if wanted:
        added = out.add_patches({k: ErasurePatch.of(t) for k, t in wanted.items()}, strength)
        if len(added) != len(wanted):
            raise ValueError(f"only {len(added)} of {len(wanted)} weights reading the other text spaces could be patched")
    return out


def _space_patches(model, erasure: Erasure, spaces: dict[str, list[str]]) -> dict[str, LowRankTransform]:
    """Reader key → the transform of its text space, widened to the layer's columns (SDXL's ``label_emb``)."""
    return {k: weights.widened(erasure.spaces[name].transform, weights.in_features(model, k))
            for name, keys in spaces.items() if name in erasure.spaces for k in keys}


def undone(model, erasure: Erasure, keys: list[str], strength: float, spaces: dict[str, list[str]] | None = None):
    """A clone of ``model`` without the last patch of ``erasure`` at ``strength`` on every key (and on every reader
    of its other text spaces): strength −t of an erasure applied at t restores the weights exactly, as −1 cancels
    +1 for a LoRA.

    An erasure is a product ``W P`` whose ``P`` is close to singular (it folds the concept onto the
    guide: its smallest singular value is about 1e-8 on SD1.5), so no patch added on top can undo it;
    the erasure's own patch is taken off instead. Anything else is refused: a negative strength of an
    erasure the model does not carry at that strength would have no meaning."""
    wanted = {k: erasure.transform for k in keys} | _space_patches(model, erasure, spaces or {})
    out = model.clone()
    for key, t in wanted.items():
        entries = out.patches.get(key, [])
        found = [i for i, p in enumerate(entries) if is_erasure_patch(p[1]) and float(p[0]) == strength
                 and _same(p[1].transform(), t)]
        if not found:
            raise ValueError(
                f"Apply Erased Weights: a negative strength undoes an erasure this model carries, and this model "
                f"does not carry the erasure of {', '.join(map(repr, erasure.concepts[:3]))} at strength "
                f"{strength:g}. An erasure (W P) cannot be inverted by another patch; to go back, use the model "
                "from before it (the loaded model is never changed) or strength 0")
        out.patches[key] = entries[:found[-1]] + entries[found[-1] + 1:]
    out.patches_uuid = uuid.uuid4()  # ComfyUI re-patches the weights of a model whose patches changed
    return out


def _same(a, b) -> bool:
    """The same ``P = I + up @ down`` (the adapter keeps ``down = None`` for a dense ``P − I``)."""
    a, b = a.to(dtype=torch.float32), b.to(dtype=torch.float32)
    return (a.up.shape == b.up.shape and torch.equal(a.up.cpu(), b.up.cpu())
            and torch.equal(a.down.cpu(), b.down.cpu()))


def pooled_erasure(model, clip, arch, names: list[str], guide: str, preserve: list[str], device, check, *,
                   lamb: float, erase_scale: float, preserve_scale: float, reg: float,
                   epochs: int) -> tuple[Erasure | None, list[str], str]:
    """RECE on the pooled text vector, its own text space: ``(erasure, pooled keys, note)``.

    The same closed forms as on the rows (``rece_core.pooled``), over the pooled vectors of the concepts,
    guide and preserved prompts, with ``S = Σ WᵀW`` of the layers reading the pooled vector (its columns
    only). ``None`` where the model has no pooled path, or the CLIP gives no pooled vector of that width
    (the note says why).
    """
    keys = weights.pooled_keys(model, arch)
    if not keys:
        return None, [], ""
    width = weights.pooled_width(model, arch, keys)
    guides = [guide.strip() or " "] * len(names)
    texts = list(dict.fromkeys(names + guides + ["", " "] + preserve))
    # several prompts per encoder call where ComfyUI's CLIP allows it; Cancel before each call
    pooled = encoding.pooled_many(clip, texts, arch, encoding.EncoderCalls(check=check))
    bad = next((p for p in pooled if p is None or p.reshape(-1).shape[0] != width), False)
    if bad is not False:
        gives = "no pooled vector" if bad is None else f"a {bad.reshape(-1).shape[0]}-wide pooled vector"
        return None, [], (f"note: the pooled text path is not erased: the CLIP gives {gives}, the model's pooled "
                          f"path reads {width} wide")
    vectors = {t: p.reshape(1, -1).to(device=device, dtype=torch.float64) for t, p in zip(texts, pooled)}
    vector = vectors.__getitem__
    concepts = torch.cat([vector(n) for n in names])
    start = time.perf_counter()
    s = weights.pooled_gram(model, arch, keys, device, include_erasures=True)
    p, rounds = rece_vectors(s, concepts, torch.cat([vector(g) for g in guides]),
                             {t: vector(t) for t in dict.fromkeys([""] + preserve)}, vector(" "), lamb=lamb,
                             erase_scale=erase_scale, preserve_scale=preserve_scale, reg=reg, epochs=epochs,
                             check=check)
    erasure = Erasure(transform=p.compressed().to(dtype=torch.float32), concepts=tuple(names), guides=tuple(guides),
                      preserve=tuple(preserve), lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale,
                      reg=reg, epochs=epochs, rounds=tuple(rounds), seconds=time.perf_counter() - start,
                      device=str(device))
    return erasure, keys, ""


def layer_erasures(model, clip, arch, keys: list[str], names: list[str], guide: str, preserve: list[str], device,
                   check, *, keep_bytes: int, lamb: float, erase_scale: float, preserve_scale: float, reg: float,
                   epochs: int, calls: encoding.EncoderCalls | None = None
                   ) -> tuple[dict[str, Erasure], dict[str, list[str]], str]:
    """RECE in every encoder layer that is its own text space (HiDream's ``llama3.<layer>``):
    ``(space → erasure, space → reader keys, note)``.

    Each layer gets the closed form of the rows (``rece``) over that layer's rows of the concepts, guides, ``''``,
    ``' '`` and the preserved prompts, with ``S = Σ WᵀW`` over that layer's readers. Memory: the layers are taken in
    groups, as many per encoding pass as ``keep_bytes`` holds of every prompt's rows (float32); each pass encodes
    every prompt once and keeps only its group's layers. A few prompts: one pass for all layers; 100 concepts on
    HiDream (128 × 4096 rows per layer and prompt, 2 MiB): about 4 layers a pass within 1 GiB, 8 passes.
    ``{}`` and a note where the CLIP gives no rows for them."""
    spaces = weights.layer_keys(model, arch, keys)
    if not spaces:
        return {}, {}, ""
    spec = arch.layers
    guides = [guide.strip() or " "] * len(names)
    texts = list(dict.fromkeys(names + guides + ["", " "] + preserve))
    length = max(len((encoding.pooled_tokens(clip, t).get(spec.encoder) or [[0]])[0]) for t in texts)
    width = {name: weights.in_features(model, ks[0]) for name, ks in spaces.items()}
    per_layer = len(texts) * length * max(width.values()) * 4  # one layer's rows of every prompt, float32
    group = max(1, keep_bytes // max(per_layer, 1))
    order = list(spaces)
    out: dict[str, Erasure] = {}
    for start in range(0, len(order), group):
        part = order[start:start + group]
        rows = encoding.layer_rows(clip, texts, arch, [spec.layer(n) for n in part], calls)
        if isinstance(rows, str):
            return {}, {}, f"note: the {spec.title} are not erased: {rows}"
        for name in part:
            check()
            found = dict(zip(texts, rows.pop(spec.layer(name))))
            encoding.check_width(found[texts[0]].rows.shape[-1], width[name], model, arch)
            erasure = rece(lambda ks=spaces[name]: weights.gram_of(model, ks, device, include_erasures=True),
                           found.__getitem__, names, guide, preserve, lamb=lamb, erase_scale=erase_scale,
                           preserve_scale=preserve_scale, reg=reg, epochs=epochs, device=device,
                           encode_many=lambda ts, f=found: [f[t] for t in ts], check=check)
            out[name] = erasure
        del rows
    return out, spaces, ""


def layers_summary(title: str, erasures: dict[str, Erasure], spaces: dict[str, list[str]]) -> str:
    """One report line for an encoder's layer spaces: how many, their readers, and the worst of the last step."""
    readers = sorted((k.removeprefix("diffusion_model.") for ks in spaces.values() for k in ks),
                     key=lambda k: [int(x) for x in re.findall(r"\d+", k)])
    last = [e.rounds[-1] for e in erasures.values()]
    ranks = [e.rank for e in erasures.values()]
    names = list(erasures)
    return (f"{title} ({len(names)} spaces, {names[0]} … {names[-1]}, read by {len(readers)} layers, "
            f"{readers[0]} … {readers[-1]}), each its own transform: after the last step reach ≤ "
            f"{max(max(r.reach) for r in last):.3f}, guide gap ≤ {max(max(r.guide_gap) for r in last):.3f}, max "
            f"preserve drift {max((max(r.drift.values()) for r in last if r.drift), default=0.0):.4f}; rank "
            f"{min(ranks)}–{max(ranks)} of {erasures[names[0]].dim}")


def round_ui(erasure: Erasure) -> dict:
    """The report as plain JSON for the node's ``ui`` output (the canvas and the history API)."""
    return {
        "concepts": list(erasure.concepts), "guides": list(erasure.guides), "preserve": list(erasure.preserve),
        "params": {"lamb": erasure.lamb, "erase_scale": erasure.erase_scale,
                   "preserve_scale": erasure.preserve_scale, "reg": erasure.reg, "epochs": erasure.epochs},
        "rounds": [{"step": r.step, "reach": list(r.reach), "guide_gap": list(r.guide_gap),
                    "drift": r.drift} for r in erasure.rounds],
        "rank": erasure.rank, "dim": erasure.dim, "seconds": round(erasure.seconds, 3), "device": erasure.device,
    }


class RECEEraseConcept:
    """Erase concepts from a model's cross-attention in closed form (RECE)."""

    DESCRIPTION = ("Erases concepts (one per line) from the model's cross-attention keys and values with "
                   "RECE's closed-form edit, then closes the holes an attacker's embedding could use.")
    SEARCH_ALIASES = ["concept erasure", "erase concept", "unlearn", "machine unlearning", "nsfw", "safety",
                      "safe", "remove nudity", "remove style", "remove artist", "remove object", "censor",
                      "UCE", "RECE", "cross attention edit"]
    CATEGORY = CATEGORY
    FUNCTION = "erase"
    RETURN_TYPES = ("MODEL", ERASURE, "STRING")
    RETURN_NAMES = ("model", "erasure", "report")
    OUTPUT_TOOLTIPS = ("The model with the concepts erased (a patched clone; the model you loaded is unchanged).",
                       "The erasure itself: save it, apply it to another model, or export it as a LoRA.",
                       "The erasure report: how much of each concept the best attacking embedding still reaches, "
                       "per round, and how far the preserved prompts drifted.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to erase from (SD1.x, SD2.x, SDXL, Flux, Flux.2, "
                                           "Chroma, SD3.x, Wan, Qwen-Image (2.1), HiDream, Lumina 2 / Z-Image, "
                                           "Kandinsky 5, HunyuanVideo / HunyuanImage, Ideogram 4, ERNIE-Image, "
                                           "JoyImage, OmniGen2, Anima, Cosmos Predict2, AuraFlow, PixArt, LTX-Video, "
                                           "Mochi, Stable Cascade, LongCat-Image). Its pooled text path, where it has "
                                           "one, is erased too, and HiDream's Llama-3 layers, each in its own "
                                           "space."}),
            "clip": ("CLIP", {"tooltip": "The text encoder that goes with the model."}),
            "concepts": ("STRING", {"multiline": True, "default": "nudity",
                                    "tooltip": "Concepts to erase, one per line."}),
            "guide": ("STRING", {"default": "", "tooltip": "What the concepts should become; empty = "
                                 "unconditional, as in the paper."}),
            "preserve": ("STRING", {"multiline": True, "default": "",
                                    "tooltip": "Concepts to keep unchanged, one per line (optional)."}),
            "concept_kind": (KINDS, {"default": "nudity", "tooltip": "The concept kinds tuned in the paper; "
                                     "the report notes when reg/rounds differ from the paper's values."}),
            "rounds": ("INT", {"default": 3, "min": 0, "max": 20,
                               "tooltip": "RECE rounds of derive + erase after the first erase (epochs)."}),
            "reg": ("FLOAT", {"default": 0.1, "min": MIN_REG, "max": 100.0, "step": 0.0001, "round": False,
                              "tooltip": "ρ: regularisation of the derived embedding (> 0: at 0 the derivation "
                                         "system is singular)."}),
            "lamb": ("FLOAT", {"default": 0.1, "min": MIN_LAMB, "max": 1e6, "step": 0.01, "round": False,
                               "tooltip": "λ: how strongly the original weights are kept (> 0: at 0 the erase "
                                          "system is singular unless the concepts have more token rows than the "
                                          "text width)."}),
            "erase_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1e6, "step": 0.01, "round": False,
                                      "tooltip": "Weight of the erase targets (concept → guide) in the edit."}),
            "preserve_scale": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1e6, "step": 0.01, "round": False,
                                         "tooltip": "Weight of keeping the preserved prompts (and '' / ' ') "
                                                    "where they are."}),
        }, "optional": {
            "concept_list": (files.concept_list_names(), {
                "default": files.NO_LIST,
                "tooltip": "Also erase every concept of a list file (one per line, # comments): your own in "
                           "models/rece/lists, or the pack's (I2P categories, the paper's artists)."}),
        }}

    @torch.no_grad()
    def erase(self, model, clip, concepts, guide, preserve, concept_kind, rounds, reg, lamb, erase_scale,
              preserve_scale, concept_list=files.NO_LIST):
        start = time.perf_counter()
        check_widgets(type(self), "RECE Erase Concept", rounds=rounds, reg=reg, lamb=lamb, erase_scale=erase_scale,
                      preserve_scale=preserve_scale)
        names = list(dict.fromkeys(split_lines(concepts) + files.read_concept_list(concept_list)))
        if not names:
            raise ValueError("RECE Erase Concept: enter at least one concept to erase (one per line), "
                             "or choose a concept list.")
        arch, keys = weights.architecture(model)
        d = weights.text_width(model, keys)
        device = run.compute_device()
        solve = run.solve_device(device)
        keep = check_lines(len(names), len(split_lines(preserve)), d)
        interrupted = comfy.model_management.throw_exception_if_processing_interrupted
        interrupted()
        # The bar counts weights read, prompts encoded (ticked after every encoder call) and the chunks and
        # steps of the procedure (whose number is known once it starts); it grows if prompts are encoded again.
        bar = {"read": 0, "encoded": 0, "done": 0, "steps": 1 + rounds}
        prompts = len(names) + len(dict.fromkeys([guide.strip(), "", " "] + split_lines(preserve)))
        progress = run.Progress(len(keys) + prompts + bar["steps"])

        def show(**change: int) -> None:
            bar.update(change)
            progress.at(bar["read"] + bar["encoded"] + bar["done"],
                        len(keys) + max(prompts, bar["encoded"]) + bar["steps"])

        def gram():
            """The weights as this model uses them, earlier erasures included: chained erase nodes compose."""
            return weights.gram_of(model, keys, device, include_erasures=True,
                                   tick=lambda: show(read=bar["read"] + 1)).to(solve)

        # about a second per encoder call: Cancel within it, and a tick after it
        calls = encoding.EncoderCalls(check=interrupted, tick=lambda n: show(encoded=bar["encoded"] + n))

        def encode_many(texts):
            out = encoding.encode_many(clip, list(texts), arch, model, calls)
            encoding.check_width(out[0].rows.shape[-1], d, model, arch)  # a wrong CLIP: refused before any weight is read
            return out

        erasure = rece(gram, lambda t: encode_many([t])[0], names, guide, split_lines(preserve), lamb=lamb,
                       erase_scale=erase_scale, preserve_scale=preserve_scale, reg=reg, epochs=rounds,
                       encode_many=encode_many, tokens=encoding.tokenize(clip, names[0], arch)[2], keep_bytes=keep,
                       check=interrupted,
                       progress=lambda done, total: show(done=done, steps=total))
        pooled, pooled_keys, pooled_note = pooled_erasure(
            model, clip, arch, names, guide, split_lines(preserve), solve, interrupted, lamb=lamb,
            erase_scale=erase_scale, preserve_scale=preserve_scale, reg=reg, epochs=rounds)
        layered, layer_spaces, layer_note = layer_erasures(
            model, clip, arch, keys, names, guide, split_lines(preserve), solve, interrupted, keep_bytes=keep,
            lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale, reg=reg, epochs=rounds, calls=calls)
        erasure = dataclasses.replace(
            erasure, seconds=time.perf_counter() - start, device=str(device),
            extra={"kind": concept_kind, "model": weights.model_type(model), "architecture": arch.name,
                   "fingerprint": weights.base_fingerprint(model, keys)},
            spaces=({"pooled": pooled} if pooled is not None else {}) | layered)
        out = patched(model, erasure, keys, 1.0, ({"pooled": pooled_keys} if pooled is not None else {}) | layer_spaces)
        report = erasure.summary()
        if pooled is not None:
            report += (f"\npooled text ({', '.join(k.removeprefix('diffusion_model.') for k in pooled_keys)}), its "
                       f"own transform:\n" + "\n".join(pooled.summary().splitlines()[1:]))
        if pooled_note:
            report += "\n" + pooled_note
        if layered:
            report += "\n" + layers_summary(arch.layers.title, layered, layer_spaces)
        if layer_note:
            report += "\n" + layer_note
        if arch.note:
            report += f"\nnote ({arch.title}): {arch.note}"
        left = arch.unedited(list(model.model.state_dict().keys()), keys + [k for ks in layer_spaces.values() for k in ks],
                             getattr(getattr(model.model, "model_config", None), "unet_config", None))
        if left:
            report += "\n" + left
        preset = PRESETS.get(concept_kind)
        if preset is not None and (preset.reg != reg or preset.epochs != rounds):
            report += (f"\nnote: the paper uses reg={preset.reg:g} and {preset.epochs} round(s) for "
                       f"{concept_kind}; this run used reg={reg:g}, {rounds} round(s)")
        ui = round_ui(erasure) | {"kind": concept_kind, "model": weights.model_type(model)}
        return {"ui": ui_report(ui), "result": (out, erasure, report)}


class RECEDeriveEmbedding:
    """The paper's closed-form attack: the embedding with which the erased model comes closest to a concept."""

    DESCRIPTION = ("Derives the text embedding with which an erased model best reproduces a concept "
                   "(RECE's closed-form attack). Sample with it to see what the erased model can still draw.")
    SEARCH_ALIASES = ["red team", "attack", "adversarial embedding", "derive embedding", "test erasure",
                      "concept erasure", "unlearn", "nsfw", "safety", "RECE"]
    CATEGORY = CATEGORY
    FUNCTION = "derive"
    RETURN_TYPES = ("CONDITIONING", "FLOAT", "STRING")
    RETURN_NAMES = ("conditioning", "reach", "report")
    OUTPUT_TOOLTIPS = ("The derived embedding as conditioning: sample with it to see what the erased model can "
                       "still draw for the concept.",
                       "Reach: 1 = the erased model still reproduces the concept exactly, 0 = it misses it by as "
                       "much as the guide differs from the concept.",
                       "A one-line report of the derivation.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A model erased by RECE Erase Concept or Apply Erased Weights."}),
            "clip": ("CLIP", {"tooltip": "The text encoder that goes with the model."}),
            "concept": ("STRING", {"multiline": True, "default": "nudity",
                                   "tooltip": "The concept to attack (one prompt)."}),
            "reg": ("FLOAT", {"default": 0.1, "min": MIN_REG, "max": 100.0, "step": 0.0001, "round": False,
                              "tooltip": "ρ: regularisation toward the zero embedding (> 0: at 0 the "
                                         "derivation system is singular)."}),
        }}

    @torch.no_grad()
    def derive(self, model, clip, concept, reg):
        check_widgets(type(self), "RECE Derive Embedding", reg=reg)
        text = concept.strip()
        if not text:
            raise ValueError("RECE Derive Embedding: enter the concept to derive an embedding for.")
        arch, keys = weights.architecture(model)
        erasures = weights.applied_erasures(model, keys)
        if not erasures:
            raise ValueError("RECE Derive Embedding: this model carries no RECE erasure; connect the MODEL "
                             "output of RECE Erase Concept or Apply Erased Weights.")
        d = weights.text_width(model, keys)
        device = run.compute_device()
        solve = run.solve_device(device)
        progress = run.Progress(len(keys) + 1)
        emb, cond, extra = encoding.encode_checked(clip, text, model, d, solve, arch)
        guide, _, guide_extra = encoding.encode(clip, " ", solve, arch, model)
        if torch.equal(emb.rows, guide.rows):
            raise ValueError(f"RECE Derive Embedding: {text!r} encodes like the empty prompt; there is no "
                             "concept to derive")
        s = weights.gram_of(model, keys, device, tick=progress.tick).to(solve)
        p = weights.combined_transform(erasures, d, solve)
        derived = derive_with_transform(s, p, emb.rows, reg=reg)
        # reach over every text space: Σ‖W'c' − Wc‖² / Σ‖Wc − Wg‖² summed over the rows' and the pooled readers
        c = emb.rows.to(torch.float64)
        miss = weighted_norm2(p.apply_rows(derived) - c, s)
        scale = weighted_norm2(c - fit_rows(guide.rows, c.shape[0]).to(c), s)
        extra = dict(extra)
        spaces = "rows"
        pooled_keys = weights.pooled_keys(model, arch)
        pooled_erasures = weights.applied_erasures(model, pooled_keys) if pooled_keys else []
        if pooled_erasures and extra.get("pooled_output") is not None:
            width = weights.pooled_width(model, arch, pooled_keys)
            sp = weights.pooled_gram(model, arch, pooled_keys, solve, include_erasures=False)
            pp = weights.combined_transform([(weights.narrowed(t, width), x) for t, x in pooled_erasures], width, solve)
            pooled = extra["pooled_output"]
            pc = pooled.reshape(1, -1).to(device=solve, dtype=torch.float64)
            pg = guide_extra["pooled_output"].reshape(1, -1).to(pc)
            pd = derive_with_transform(sp, pp, pc, reg=reg)
            miss = miss + weighted_norm2(pp.apply_rows(pd) - pc, sp)
            scale = scale + weighted_norm2(pc - pg, sp)
            extra["pooled_output"] = pd.reshape(pooled.shape).to(device=pooled.device, dtype=pooled.dtype)
            spaces = "rows + pooled vector"
        # each encoder layer that is its own text space (HiDream's Llama-3): derived in that space, on its readers
        layer_spaces = weights.layer_keys(model, arch, keys)
        rows_of = extra.get(arch.layers.key) if arch.layers is not None else None
        derived_layers = 0
        if rows_of is not None and guide_extra.get(arch.layers.key) is not None:
            layers_out = rows_of.clone()
            for name, ks in layer_spaces.items():
                erased = weights.applied_erasures(model, ks)
                layer = arch.layers.layer(name)
                if not erased or layer >= rows_of.shape[1]:
                    continue
                sl = weights.gram_of(model, ks, device).to(solve)
                pl = weights.combined_transform(erased, sl.shape[0], solve)
                lc = rows_of[0, layer].to(device=solve, dtype=torch.float64)
                lg = guide_extra[arch.layers.key][0, layer].to(device=solve, dtype=torch.float64)
                ld = derive_with_transform(sl, pl, lc, reg=reg)
                miss = miss + weighted_norm2(pl.apply_rows(ld) - lc, sl)
                scale = scale + weighted_norm2(lc - fit_rows(lg, lc.shape[0]), sl)
                layers_out[0, layer] = ld.to(device=layers_out.device, dtype=layers_out.dtype)
                derived_layers += 1
            if derived_layers:
                extra[arch.layers.key] = layers_out
                spaces += f" + {derived_layers} {arch.layers.title}"
        value = float((1.0 - miss / scale.clamp_min(torch.finfo(torch.float64).tiny)).clamp(0.0, 1.0))
        progress.tick()
        report = (f"derived embedding for {text!r} (ρ={reg:g}; {spaces}) reaches {value:.1%} of it on the erased "
                  f"model ({len(erasures)} erasure(s))")
        ui = {"concept": text, "reg": reg, "reach": value, "erasures": len(erasures)}
        return {"ui": ui_report(ui),
                "result": (encoding.conditioning(arch, derived.float(), model, cond, extra), value, report)}


class ApplyErasedWeights:
    """Apply an erasure (from RECE Erase Concept or a file) to a model, at a strength."""

    DESCRIPTION = ("Applies an erasure to a model with the same text width (e.g. a fine-tune of the base it "
                   "was made on), computed from that model's own weights.")
    SEARCH_ALIASES = ["apply erasure", "load erasure", "concept erasure", "unlearn", "nsfw", "safety",
                      "remove style", "RECE"]
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("The model with the erasure applied (a patched clone).",
                       "Which erasure was applied, at what strength, and a warning when it was computed on "
                       "another base model.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to apply the erasure to (same text width)."}),
            "erasure": (ERASURE, {"tooltip": "An erasure from RECE Erase Concept or Load Erased Weights."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "1 = as computed, 0 = none; −1 undoes this erasure where the "
                                              "model carries it at 1 (−t undoes t)."}),
        }}

    def apply(self, model, erasure, strength):
        check_widgets(type(self), "Apply Erased Weights", strength=strength)
        weights.require_erasure(erasure, "Apply Erased Weights")
        keys = weights.cross_attention_keys(model)
        weights.require_erasure(erasure, "Apply Erased Weights", model, keys)
        arch = weights.architecture(model)[0]
        readers = weights.space_keys(model, arch, keys)
        spaces = {name: ks for name, ks in readers.items() if name in erasure.spaces}
        if strength < 0:
            out = undone(model, erasure, keys, -strength, spaces)
            report = (f"undid the erasure of {', '.join(map(repr, erasure.concepts))} applied at strength "
                      f"{-strength:g}: its patches are removed, the weights are as before it")
            ui = {"concepts": list(erasure.concepts), "strength": strength, "weights": len(keys),
                  "file": erasure.extra.get("file", ""), "warning": None}
            return {"ui": ui_report(ui), "result": (out, report)}
        out = patched(model, erasure, keys, strength, spaces)
        report = (f"applied erasure of {', '.join(map(repr, erasure.concepts))} at strength {strength:g} "
                  f"to {len(keys)} weights that read the text ({arch.title})")
        if "pooled" in spaces:
            report += f" and {len(spaces['pooled'])} that read the pooled text"
        elif "pooled" in readers:
            report += ("\nnote: this erasure holds no transform of the pooled text (made before this pack erased it), "
                       "so the model's pooled text path is left as it was")
        layers = {name: ks for name, ks in spaces.items() if name != "pooled"}
        if layers:
            report += (f" and {sum(map(len, layers.values()))} that read the {arch.layers.title}, each layer's own "
                       f"transform ({len(layers)} spaces, {next(iter(layers))} … {list(layers)[-1]})")
        missing = [name for name in readers if name != "pooled" and name not in erasure.spaces]
        if missing:
            report += (f"\nnote: this erasure holds no transform of {len(missing)} of the {arch.layers.title} this model "
                       f"reads ({missing[0]} … {missing[-1]}; made before this pack erased them, or the CLIP gave no "
                       "rows for them), so their readers are left as they were")
        unread = [name for name in erasure.spaces if name not in readers]
        if unread:
            report += (f"\nnote: {len(unread)} text space(s) of this erasure are not read by this model "
                       f"({', '.join(unread[:4])}{' …' if len(unread) > 4 else ''}): not applied")
        config = getattr(getattr(model.model, "model_config", None), "unet_config", None)
        left = arch.unedited(list(model.model.state_dict().keys()),
                             keys + [k for ks in layers.values() for k in ks], config)
        if left:
            report += "\n" + left
        made_on = erasure.extra.get("fingerprint")
        here = weights.base_fingerprint(model, keys)
        warning = None
        if made_on and made_on != here:
            warning = (f"warning: this erasure was computed on another base model (fingerprint {made_on}, this "
                       f"model {here}); it is applied to this model's own weights, but its guarantees were "
                       "measured on the other one")
            report += "\n" + warning
        ui = {"concepts": list(erasure.concepts), "strength": strength, "weights": len(keys),
              "file": erasure.extra.get("file", ""), "warning": warning}
        return {"ui": ui_report(ui), "result": (out, report)}


NODE_CLASS_MAPPINGS = {
    "RECEEraseConcept": RECEEraseConcept,
    "RECEDeriveEmbedding": RECEDeriveEmbedding,
    "RECEApplyErasedWeights": ApplyErasedWeights,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RECEEraseConcept": "RECE Erase Concept",
    "RECEDeriveEmbedding": "RECE Derive Embedding",
    "RECEApplyErasedWeights": "Apply Erased Weights",
}
