"""Erasure files in ComfyUI: the ``models/rece`` folder, Save / Load Erased Weights, Export as LoRA."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

import folder_paths

from ..rece_core import __version__
from ..rece_core.files import load_erasure, lora_factors, lora_key, save_erasure
from .host import weights
from .checks import check_widgets, ui_report

FOLDER = "rece"
EXACT = 1e-5  # a relative error of the written LoRA below this is float32 rounding: reported as exact
FP16_WARN = 1e-2
EXTENSIONS = {".safetensors"}
LISTS = "rece_lists"
"""Concept lists: ``models/rece/lists/*.txt`` and the lists shipped in the pack's ``lists/``."""
NO_LIST = "(none)"
MAX_LIST_BYTES = 4 * 2**20


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


def register_lists() -> None:
    """Register ``models/rece/lists`` (the user's) and the pack's own ``lists/`` for concept lists."""
    paths = [os.path.join(folder_paths.models_dir, FOLDER, "lists"),
             str(Path(__file__).resolve().parents[1] / "lists")]
    known, exts = folder_paths.folder_names_and_paths.get(LISTS, ([], set()))
    folder_paths.folder_names_and_paths[LISTS] = (known + [p for p in paths if p not in known], set(exts) | {".txt"})


def concept_list_names() -> list[str]:
    return [NO_LIST] + folder_paths.get_filename_list(LISTS)


def read_concept_list(name: str | None) -> list[str]:
    """The concepts of a list file: one per line, blank lines and ``#`` comments skipped.

    UTF-8, with or without a byte-order mark (Windows Notepad writes one); at most ``MAX_LIST_BYTES`` bytes.
    ``None`` (an API caller leaving the optional input out) is no list."""
    if name is None or name in ("", NO_LIST):
        return []
    if not isinstance(name, str):
        raise ValueError(f"concept list must be a file name (a string), not {type(name).__name__}")
    if not name.endswith(".txt"):
        raise ValueError(f"concept list {name!r}: only .txt lists in models/rece/lists are read")
    path = resolve(LISTS, name)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LIST_BYTES + 1)
        if len(data) > MAX_LIST_BYTES:
            raise ValueError(f"concept list {name}: larger than {MAX_LIST_BYTES // 2**20} MiB; split it")
        text = data.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"concept list {name}: cannot be read ({exc.__class__.__name__}: {exc})") from None
    concepts = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not concepts:
        raise ValueError(f"concept list {name}: has no concepts (one per line, # starts a comment)")
    return concepts


def _check_relative(name: str, what: str) -> None:
    if not name.strip() or os.path.isabs(name) or ".." in Path(name).parts or name.startswith(("/", "\\")):
        raise ValueError(f"{what} {name!r} must be a plain name inside the models folder (no '..', no absolute path)")


def _inside(path: str, folder: str) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, base]) == base


def resolve(folder: str, name: str) -> str:
    """The file ``name`` of a model folder; refuses names and links that lead outside it."""
    _check_relative(name, "file name")
    path = folder_paths.get_full_path(folder, name)
    where = "models/rece/lists" if folder == LISTS else f"models/{folder}"
    if path is None:
        raise ValueError(f"{name}: no such file in {where}")
    if not any(_inside(path, base) for base in folder_paths.get_folder_paths(folder)):
        raise ValueError(f"{name}: refused, it links outside {where}")
    return path


def loadable_names() -> list[str]:
    """The files of ``models/rece`` that ``resolve`` accepts (links leading outside are left out)."""
    names = []
    for name in folder_paths.get_filename_list(FOLDER):
        try:
            resolve(FOLDER, name)
        except ValueError:
            continue
        names.append(name)
    return names


def new_path(folder: str, prefix: str) -> str:
    """``<folder>/<prefix>_00001.safetensors``, the next free number, inside the first folder path.

    The file is created here, exclusively (empty), so two saves with the same prefix at once each get
    their own number; write it with ``write_new``. A prefix the OS cannot create is refused naming it."""
    if not isinstance(prefix, str):
        raise ValueError(f"filename_prefix must be a string, not {type(prefix).__name__}")
    if "\0" in prefix:
        raise ValueError(f"filename_prefix {prefix!r}: cannot create a file whose name holds a NUL character")
    _check_relative(prefix, "filename_prefix")
    norm = os.path.normpath(prefix)
    if norm == "." or any(part.startswith(".") for part in Path(norm).parts):
        raise ValueError(f"filename_prefix {prefix!r} would write a hidden file or folder (a name starting with "
                         "'.'); use a plain name such as rece/erasure")
    base = folder_paths.get_folder_paths(folder)[0]
    stem = os.path.join(base, os.path.normpath(prefix))
    if not _inside(os.path.dirname(stem) or base, base):
        raise ValueError(f"filename_prefix {prefix!r} leads outside models/{folder}")
    n = 1
    while True:
        path = f"{stem}_{n:05}.safetensors"
        try:
            os.makedirs(os.path.dirname(stem), exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            n += 1
        except (OSError, ValueError) as exc:
            raise ValueError(f"filename_prefix {prefix!r}: cannot create {os.path.relpath(path, base)!r} in "
                             f"models/{folder} ({exc.strerror or exc}); use a shorter plain name such as "
                             "rece/erasure") from None


def write_new(path: str, write: Callable[[str], None]) -> None:
    """``write(path)`` into the file ``new_path`` created; on failure the empty file is removed."""
    try:
        write(path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise


def save_new(folder: str, prefix: str, write: Callable[[str], None]) -> str:
    """``write`` the next new file of ``prefix`` in ``folder`` (``new_path``, ``write_new``); its path relative to
    the folder's first directory, as the nodes report it."""
    path = new_path(folder, prefix)
    write_new(path, write)
    return os.path.relpath(path, folder_paths.get_folder_paths(folder)[0])

class SaveErasedWeights:
    """Write an erasure to models/rece as a small .safetensors file."""

    CATEGORY = "model_patches/rece"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    DESCRIPTION = "Saves the erasure (two thin factors and its parameters) to models/rece for sharing."
    SEARCH_ALIASES = ["save erasure", "export erasure", "concept erasure", "unlearn", "RECE"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"erasure": ("RECE_ERASURE", {"tooltip": "The erasure to save."}),
                             "filename_prefix": ("STRING", {"default": "rece/erasure",
                                                            "tooltip": "Path under models/rece; _00001 and "
                                                                       ".safetensors are added."})}}

    def save(self, erasure, filename_prefix):
        weights.require_erasure(erasure, "Save Erased Weights")
        rel = save_new(FOLDER, filename_prefix, lambda p: save_erasure(erasure, p, pack_version=__version__))
        return {"ui": ui_report({"saved": rel, "concepts": list(erasure.concepts)}), "result": ()}


class LoadErasedWeights:
    """Load an erasure file from models/rece for Apply Erased Weights."""

    CATEGORY = "model_patches/rece"
    FUNCTION = "load"
    RETURN_TYPES = ("RECE_ERASURE", "STRING")
    RETURN_NAMES = ("erasure", "report")
    OUTPUT_TOOLTIPS = ("The loaded erasure: connect it to Apply Erased Weights.",
                       "The file name and the erasure's own report (concepts, parameters, reach per round).")
    DESCRIPTION = ("Loads an erasure file (.safetensors, checked before use) from models/rece, e.g. one shared "
                   "by someone else, for Apply Erased Weights.")
    SEARCH_ALIASES = ["load erasure", "import erasure", "concept erasure", "unlearn", "nsfw", "safety", "RECE"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"erasure_name": (loadable_names(), {"tooltip": "An erasure file in models/rece."})}}

    def load(self, erasure_name):
        erasure = load_erasure(resolve(FOLDER, erasure_name))
        report = f"loaded {erasure_name}\n{erasure.summary()}"
        return {"ui": ui_report({"loaded": erasure_name, "concepts": list(erasure.concepts)}),
                "result": (erasure, report)}


class ExportErasureAsLoRA:
    """Write the erasure as a standard LoRA (kohya/A1111 keys) for this model into models/loras."""

    CATEGORY = "model_patches/rece"
    FUNCTION = "export"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("Where the LoRA was written, its rank, and its largest relative error (exact at rank 0).",)
    SEARCH_ALIASES = ["export lora", "erasure to lora", "save lora", "concept erasure", "unlearn", "RECE"]
    DESCRIPTION = ("Exports W(P − I) of every layer reading the text (attn2.to_k/to_v, Flux's txt_in...) of this "
                   "model as lora_up/lora_down; exact at rank 0, "
                   "otherwise the best approximation of that rank (the report states the error).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "The model whose weights the LoRA's deltas are "
                                                            "computed from."}),
                             "erasure": ("RECE_ERASURE", {"tooltip": "The erasure to export."}),
                             "filename_prefix": ("STRING", {"default": "rece/erasure_lora",
                                                            "tooltip": "Path under models/loras; _00001 and "
                                                                       ".safetensors are added."}),
                             "rank": ("INT", {"default": 0, "min": 0, "max": 4096,
                                              "tooltip": "0 = exact (rank of P − I); lower = smaller, approximate"}),
                             "precision": (["fp16", "fp32"], {"default": "fp16",
                                                              "tooltip": "Precision of the stored LoRA factors."})}}

    @torch.no_grad()
    def export(self, model, erasure, filename_prefix, rank, precision):
        check_widgets(type(self), "Export Erasure as LoRA", rank=rank)
        weights.require_erasure(erasure, "Export Erasure as LoRA")
        if erasure.rank < 1:
            raise ValueError("Export Erasure as LoRA: this erasure has rank 0 (it changes nothing); nothing to export")
        arch, keys = weights.architecture(model)
        weights.require_erasure(erasure, "Export Erasure as LoRA", model, keys)
        dtype = torch.float16 if precision == "fp16" else torch.float32
        out, worst = {}, 0.0
        # the readers of every other text space the erasure holds (pooled text, HiDream's Llama-3 layers): each its
        # own space's transform (the pooled vector's columns only, where a layer reads more)
        space_of = {k: name for name, ks in weights.space_keys(model, arch, keys).items() if name in erasure.spaces
                    for k in ks}
        others = list(space_of)
        for key, w in weights.key_weights(model, keys + others, torch.device("cpu"), include_erasures=False):
            space = erasure
            if key in space_of:
                space = dataclasses.replace(erasure, transform=weights.widened(
                    erasure.spaces[space_of[key]].transform, int(w.shape[1])))
            try:
                up, down, err = lora_factors(space, w, rank, dtype)
            except ValueError as exc:
                raise ValueError(f"Export Erasure as LoRA: {exc} (layer {key})") from None
            name = lora_key(key, "dit" if key in space_of else arch.name)
            out[f"{name}.lora_up.weight"] = up.contiguous()
            out[f"{name}.lora_down.weight"] = down.clone()  # one copy per layer in the file
            out[f"{name}.alpha"] = torch.tensor(float(up.shape[1]), dtype=dtype)  # rank ≥ 1: never 0
            worst = max(worst, err)
        rel = save_new("loras", filename_prefix, lambda p: save_file(out, p, metadata={
            "rece_concepts": ", ".join(erasure.concepts), "ss_network_module": "networks.lora"}))
        report = (f"exported {len(keys) + len(others)} layers to loras/{rel} at rank "
                  f"{rank if 0 < rank < erasure.rank else erasure.rank} ({precision}); "
                  + ("exact" if worst <= EXACT else f"largest relative error of a layer's delta {worst:.2e} "
                     f"(as written in {precision})"))
        if precision == "fp16" and worst > FP16_WARN:
            report += "\nwarning: fp16 loses this much of the erasure; export with precision fp32"
        return {"ui": ui_report({"exported": rel, "error": worst}), "result": (report,)}


register_folder()
register_lists()

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
