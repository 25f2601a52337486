"""Stand-in for ComfyUI's ``folder_paths`` (model folders)."""

import os

models_dir = os.environ.get("RECE_STANDIN_MODELS", os.path.join(os.path.dirname(__file__), "_models"))
supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
folder_names_and_paths = {"loras": ([os.path.join(models_dir, "loras")], supported_pt_extensions)}


def add_model_folder_path(folder_name, full_folder_path, is_default=False):
    paths, exts = folder_names_and_paths.setdefault(folder_name, ([], set()))
    if full_folder_path not in paths:
        paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)


def get_folder_paths(folder_name):
    return folder_names_and_paths[folder_name][0][:]


def get_filename_list(folder_name):
    out = []
    paths, exts = folder_names_and_paths[folder_name]
    for base in paths:
        if os.path.isdir(base):
            for root, _, files in os.walk(base, followlinks=True):
                for f in files:
                    if not exts or os.path.splitext(f)[1].lower() in exts:
                        out.append(os.path.relpath(os.path.join(root, f), base))
    return sorted(set(out))


def get_full_path(folder_name, filename):
    for base in folder_names_and_paths[folder_name][0]:
        path = os.path.join(base, os.path.normpath("/" + filename).lstrip("/"))
        if os.path.isfile(path):
            return path
    return None
