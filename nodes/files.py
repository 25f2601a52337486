"""Erasure files in ComfyUI: the ``models/rece`` folder, Save / Load Erased Weights, Export as LoRA."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

import folder_paths

from ..rece_core import __version__
from ..rece_core.files import load_erasure, lora_factors, lora_key, save_erasure
from . import bridge

FOLDER = "rece"
EXTENSIONS = {".safetensors"}


def register_folder() -> None:
    """Register ``models/rece`` (kept if extra_model_paths.yaml already added paths for it)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))


def _check_relative(name: str, what: str) -> None:
    if not name or os.path.isabs(name) or ".." in Path(name).parts or name.startswith(("/", "\\")):
        raise ValueError(f"{what} {name!r} must be a plain name inside the models folder (no '..', no absolute path)")


def _inside(path: str, folder: str) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, base]) == base


def resolve(folder: str, name: str) -> str:
    """The file ``name`` of a model folder; refuses names and links that lead outside it."""
    _check_relative(name, "file name")
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ValueError(f"{name}: no such file in models/{folder}")
    if not any(_inside(path, base) for base in folder_paths.get_folder_paths(folder)):
        raise ValueError(f"{name}: refused, it links outside models/{folder}")
    return path


def new_path(folder: str, prefix: str) -> str:
    """``<folder>/<prefix>_00001.safetensors``, the next free number, inside the first folder path."""
    _check_relative(prefix, "filename_prefix")
    base = folder_paths.get_folder_paths(folder)[0]
    stem = os.path.join(base, os.path.normpath(prefix))
    if not _inside(os.path.dirname(stem) or base, base):
        raise ValueError(f"filename_prefix {prefix!r} leads outside models/{folder}")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    n = 1
    while os.path.exists(f"{stem}_{n:05}.safetensors"):
        n += 1
    return f"{stem}_{n:05}.safetensors"


class SaveErasedWeights:
    """Write an erasure to models/rece as a small .safetensors file."""

    CATEGORY = "model_patches/rece"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    DESCRIPTION = "Saves the erasure (two thin factors and its parameters) to models/rece for sharing."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"erasure": ("RECE_ERASURE",),
                             "filename_prefix": ("STRING", {"default": "rece/erasure"})}}

    def save(self, erasure, filename_prefix):
        bridge.require_erasure(erasure, "Save Erased Weights")
        path = new_path(FOLDER, filename_prefix)
        save_erasure(erasure, path, pack_version=__version__)
        rel = os.path.relpath(path, folder_paths.get_folder_paths(FOLDER)[0])
        return {"ui": {"rece_report": [{"saved": rel, "concepts": list(erasure.concepts)}]}, "result": ()}


class LoadErasedWeights:
    """Load an erasure file from models/rece for Apply Erased Weights."""

    CATEGORY = "model_patches/rece"
    FUNCTION = "load"
    RETURN_TYPES = ("RECE_ERASURE", "STRING")
    RETURN_NAMES = ("erasure", "report")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"erasure_name": (folder_paths.get_filename_list(FOLDER),)}}

    def load(self, erasure_name):
        erasure = load_erasure(resolve(FOLDER, erasure_name))
        report = f"loaded {erasure_name}\n{erasure.summary()}"
        return {"ui": {"rece_report": [{"loaded": erasure_name, "concepts": list(erasure.concepts)}]},
                "result": (erasure, report)}


class ExportErasureAsLoRA:
    """Write the erasure as a standard LoRA (kohya/A1111 keys) for this model into models/loras."""

    CATEGORY = "model_patches/rece"
    FUNCTION = "export"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    DESCRIPTION = ("Exports W(P − I) of every layer reading the text (attn2.to_k/to_v, Flux's txt_in...) of this "
                   "model as lora_up/lora_down; exact at rank 0, "
                   "otherwise the best approximation of that rank (the report states the error).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "erasure": ("RECE_ERASURE",),
                             "filename_prefix": ("STRING", {"default": "rece/erasure_lora"}),
                             "rank": ("INT", {"default": 0, "min": 0, "max": 4096,
                                              "tooltip": "0 = exact (rank of P − I); lower = smaller, approximate"}),
                             "precision": (["fp16", "fp32"], {"default": "fp16"})}}

    @torch.no_grad()
    def export(self, model, erasure, filename_prefix, rank, precision):
        bridge.require_erasure(erasure, "Export Erasure as LoRA")
        arch, keys = bridge.architecture(model)
        bridge.require_erasure(erasure, "Export Erasure as LoRA", model, keys)
        dtype = torch.float16 if precision == "fp16" else torch.float32
        out, worst = {}, 0.0
        for key, w in bridge.key_weights(model, keys, torch.device("cpu"), include_erasures=False):
            up, down, err = lora_factors(erasure, w, rank)
            name = lora_key(key, arch.name)
            out[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
            out[f"{name}.lora_down.weight"] = down.to(dtype).clone()  # one copy per layer in the file
            out[f"{name}.alpha"] = torch.tensor(float(up.shape[1]), dtype=dtype)
            worst = max(worst, err)
        path = new_path("loras", filename_prefix)
        save_file(out, path, metadata={"rece_concepts": ", ".join(erasure.concepts), "ss_network_module": "networks.lora"})
        rel = os.path.relpath(path, folder_paths.get_folder_paths("loras")[0])
        report = (f"exported {len(keys)} layers to loras/{rel} at rank "
                  f"{rank if 0 < rank < erasure.rank else erasure.rank} ({precision}); "
                  + ("exact" if worst == 0.0 else f"largest relative error of a layer's delta {worst:.2e}"))
        return {"ui": {"rece_report": [{"exported": rel, "error": worst}]}, "result": (report,)}


register_folder()

NODE_CLASS_MAPPINGS = {
    "RECESaveErasedWeights": SaveErasedWeights,
    "RECELoadErasedWeights": LoadErasedWeights,
    "RECEExportErasureAsLoRA": ExportErasureAsLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RECESaveErasedWeights": "Save Erased Weights",
    "RECELoadErasedWeights": "Load Erased Weights",
    "RECEExportErasureAsLoRA": "Export Erasure as LoRA",
}
