"""Every example workflow matches the node definitions: known node types, valid widget values, typed links.

Our nodes are checked against their own INPUT_TYPES. ComfyUI's core nodes are checked against
the small table below in CI and against ComfyUI's real definitions in the real tier (which also
checks that the table itself agrees with ComfyUI).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import load_pack

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "example_workflows").glob("*.json"))
FILES = "files"  # a combo of model files: any name is acceptable in an example

# The parts of ComfyUI's core node definitions the examples use (shape of INPUT_TYPES / RETURN_TYPES).
CORE = {
    "CheckpointLoaderSimple": ({"required": {"ckpt_name": (FILES,)}}, ("MODEL", "CLIP", "VAE")),
    "CLIPTextEncode": ({"required": {"text": ("STRING", {"multiline": True}), "clip": ("CLIP",)}},
                       ("CONDITIONING",)),
    "EmptyLatentImage": ({"required": {"width": ("INT", {"min": 16, "max": 16384}),
                                       "height": ("INT", {"min": 16, "max": 16384}),
                                       "batch_size": ("INT", {"min": 1, "max": 4096})}}, ("LATENT",)),
    "KSampler": ({"required": {
        "model": ("MODEL",), "seed": ("INT", {"min": 0, "max": 0xffffffffffffffff, "control_after_generate": True}),
        "steps": ("INT", {"min": 1, "max": 10000}), "cfg": ("FLOAT", {"min": 0.0, "max": 100.0}),
        "sampler_name": (["euler", "euler_ancestral", "dpmpp_2m", "ddim"],),
        "scheduler": (["normal", "karras", "simple"],), "positive": ("CONDITIONING",),
        "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
        "denoise": ("FLOAT", {"min": 0.0, "max": 1.0})}}, ("LATENT",)),
    "VAEDecode": ({"required": {"samples": ("LATENT",), "vae": ("VAE",)}}, ("IMAGE",)),
    "SaveImage": ({"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {})}}, ()),
    "PreviewImage": ({"required": {"images": ("IMAGE",)}}, ()),
    "LoadImage": ({"required": {"image": (FILES, {"image_upload": True})}}, ("IMAGE", "MASK")),
    "ImageBatch": ({"required": {"image1": ("IMAGE",), "image2": ("IMAGE",)}}, ("IMAGE",)),
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def definitions() -> dict[str, tuple[dict, tuple]]:
    pack = load_pack()
    defs = {name: (cls.INPUT_TYPES(), tuple(cls.RETURN_TYPES)) for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
    if os.environ.get("COMFYUI_PATH"):
        import nodes as comfy_nodes

        for name in CORE:
            cls = comfy_nodes.NODE_CLASS_MAPPINGS[name]
            defs[name] = (cls.INPUT_TYPES(), tuple(cls.RETURN_TYPES))
    else:
        defs.update(CORE)
    return defs


def widgets(input_types: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of every widget, plus the frontend's control_after_generate value."""
    out = []
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES or kind == FILES:
                out.append((name, kind, opts))
                if opts.get("control_after_generate"):
                    out.append((f"{name}:control", ["fixed", "increment", "decrement", "randomize"], {}))
    return out


def check_value(node: str, name: str, kind, opts: dict, value) -> None:
    where = f"{node}.{name}={value!r}"
    if kind == FILES or name in ("ckpt_name", "image"):
        assert isinstance(value, str) and value, where
    elif isinstance(kind, (list, tuple)):
        assert value in kind, f"{where} not one of {list(kind)[:8]}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert opts.get("min", value) <= value <= opts.get("max", value), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)), where
        assert opts.get("min", value) <= value <= opts.get("max", value), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_matches_node_definitions(path: Path):
    wf = json.loads(path.read_text())
    defs = definitions()
    nodes = {n["id"]: n for n in wf["nodes"]}
    for node in wf["nodes"]:
        assert node["type"] in defs, f"unknown node type {node['type']} in {path.name}"
        input_types, outputs = defs[node["type"]]
        spec = widgets(input_types)
        values = node.get("widgets_values", [])
        n_required = len(widgets({"required": input_types["required"]}))
        assert n_required <= len(values) <= len(spec), \
            f"{node['type']}: {len(values)} widget values for {[s[0] for s in spec]}"
        for (name, kind, opts), value in zip(spec, values):
            check_value(node["type"], name, kind, opts, value)
        assert [o["type"] for o in node["outputs"]] == list(outputs), node["type"]
        linked = {i["name"] for i in node["inputs"] if i["link"] is not None}
        required = {n for n, s in input_types["required"].items()
                    if not (isinstance(s[0], (list, tuple)) or s[0] in WIDGET_TYPES or s[0] == FILES)}
        assert required <= linked, f"{node['type']} has unconnected inputs {required - linked}"
    for lid, src, out_slot, dst, in_slot, kind in wf["links"]:
        assert nodes[src]["outputs"][out_slot]["type"] == kind, f"link {lid}"
        target = nodes[dst]["inputs"][in_slot]
        assert target["type"] == kind and target["link"] == lid, f"link {lid}"
        assert lid in nodes[src]["outputs"][out_slot]["links"]


def test_workflows_saved_before_the_optional_inputs_still_load():
    """A RECE Erase Concept saved before `concept_list` existed: its values map onto the same widgets."""
    input_types = definitions()["RECEEraseConcept"][0]
    legacy = ["nudity", "", "", "nudity", 3, 0.1, 0.1, 1.0, 0.1]
    required = widgets({"required": input_types["required"]})
    assert [w[0] for w in required] == ["concepts", "guide", "preserve", "concept_kind", "rounds", "reg", "lamb",
                                        "erase_scale", "preserve_scale"]
    for (name, kind, opts), value in zip(required, legacy):
        check_value("RECEEraseConcept", name, kind, opts, value)
    assert all(name in input_types.get("optional", {}) for name, _, _ in widgets(input_types)[len(legacy):])


def test_there_are_the_five_examples():
    names = {p.name for p in EXAMPLES}
    assert names >= {"erase_nudity_sd15_side_by_side.json", "erase_artist_style_sdxl.json",
                     "red_team_derive_embedding.json", "erase_nudity_flux_side_by_side.json",
                     "erase_artist_rece_and_conceptprune_sd15.json",
                     "fewshot_unlearn_sd15_side_by_side.json", "erase_task_vector_sd15.json"}


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="real tier: set COMFYUI_PATH")
def test_core_table_agrees_with_comfyui():
    import nodes as comfy_nodes

    for name, (input_types, outputs) in CORE.items():
        real = comfy_nodes.NODE_CLASS_MAPPINGS[name]
        assert tuple(real.RETURN_TYPES) == outputs, name
        real_inputs = real.INPUT_TYPES()
        assert [w[0] for w in widgets(real_inputs)] == [w[0] for w in widgets(input_types)], name
