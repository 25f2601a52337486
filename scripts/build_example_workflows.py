"""Write example_workflows/*.json (ComfyUI's UI workflow format). Run: python scripts/build_example_workflows.py"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "example_workflows"

# node type -> (inputs [(name, type)], outputs [(name, type)])
SLOTS = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "PreviewImage": ([("images", "IMAGE")], []),
    "RECEEraseConcept": ([("model", "MODEL"), ("clip", "CLIP")],
                         [("model", "MODEL"), ("erasure", "RECE_ERASURE"), ("report", "STRING")]),
    "RECEDeriveEmbedding": ([("model", "MODEL"), ("clip", "CLIP")],
                            [("conditioning", "CONDITIONING"), ("reach", "FLOAT"), ("report", "STRING")]),
    "RECEApplyErasedWeights": ([("model", "MODEL"), ("erasure", "RECE_ERASURE")],
                               [("model", "MODEL"), ("report", "STRING")]),
    "ConceptPruneEraseConcept": ([("model", "MODEL"), ("clip", "CLIP")],
                                 [("model", "MODEL"), ("prune", "CONCEPTPRUNE"), ("report", "STRING")]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "ImageBatch": ([("image1", "IMAGE"), ("image2", "IMAGE")], [("IMAGE", "IMAGE")]),
    "RECEFewShotUnlearnConcept": ([("clip", "CLIP"), ("model", "MODEL"), ("vae", "VAE"), ("images", "IMAGE")],
                                  [("clip", "CLIP"), ("unlearning", "RECE_UNLEARNING"), ("report", "STRING")]),
    "RECETaskVectorEraseConcept": ([("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("image", "IMAGE")],
                                   [("model", "MODEL"), ("task_vector", "LORA_MODEL"), ("alpha", "FLOAT"),
                                    ("report", "STRING")]),
    "RECEDiverseInversion": ([("model", "MODEL"), ("clip", "CLIP"), ("task_vector", "LORA_MODEL"), ("vae", "VAE"),
                              ("image", "IMAGE")],
                             [("conditioning", "CONDITIONING"), ("alpha", "FLOAT"), ("ranking", "STRING"),
                              ("report", "STRING")]),
}


NUDITY = ["nudity", "", "", "nudity", 3, 0.1, 0.1, 1.0, 0.1, "(none)"]  # RECE Erase Concept widgets, paper defaults


class Graph:
    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, type_: str, widgets: list, pos: tuple[int, int], title: str | None = None) -> int:
        ins, outs = SLOTS[type_]
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": [320, 160], "flags": {},
                "order": len(self.nodes), "mode": 0,
                "inputs": [{"name": n, "type": t, "link": None} for n, t in ins],
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outs)],
                "properties": {"Node name for S&R": type_}, "widgets_values": widgets}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node["id"]

    def link(self, src: int, out_slot: int, dst: int, in_name: str) -> None:
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        in_slot = next(i for i, x in enumerate(d["inputs"]) if x["name"] == in_name)
        t = s["outputs"][out_slot]["type"]
        lid = len(self.links) + 1
        self.links.append([lid, src, out_slot, dst, in_slot, t])
        s["outputs"][out_slot]["links"].append(lid)
        d["inputs"][in_slot]["link"] = lid

    def dump(self, name: str) -> None:
        wf = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
              "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}
        (OUT / name).write_text(json.dumps(wf, indent=1) + "\n")


def sampler_branch(g: Graph, model: tuple[int, int], pos_cond: int, neg: int, latent: int, vae: int,
                   x: int, y: int, prefix: str, seed: int = 42,
                   settings: tuple[int, float, str, str] = (25, 7.0, "euler", "normal")) -> None:
    steps, cfg, sampler, scheduler = settings
    ks = g.add("KSampler", [seed, "fixed", steps, cfg, sampler, scheduler, 1.0], (x, y))
    g.link(model[0], model[1], ks, "model")
    g.link(pos_cond, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(latent, 0, ks, "latent_image")
    dec = g.add("VAEDecode", [], (x + 340, y))
    g.link(ks, 0, dec, "samples")
    g.link(vae, 2, dec, "vae")
    save = g.add("SaveImage", [prefix], (x + 600, y))
    g.link(dec, 0, save, "images")


def loader_and_erase(g: Graph, ckpt_name: str, erase_widgets: list) -> tuple[int, int]:
    """Load Checkpoint → RECE Erase Concept (model and clip)."""
    ckpt = g.add("CheckpointLoaderSimple", [ckpt_name], (0, 200))
    erase = g.add("RECEEraseConcept", erase_widgets, (380, 0))
    g.link(ckpt, 0, erase, "model")
    g.link(ckpt, 1, erase, "clip")
    return ckpt, erase


def prompts_and_latent(g: Graph, ckpt: int, prompt: str | None, size: int) -> tuple[int | None, int, int]:
    """Positive (unless None) and empty negative CLIPTextEncode, and an EmptyLatentImage."""
    pos = None
    if prompt is not None:
        pos = g.add("CLIPTextEncode", [prompt], (380, 420))
        g.link(ckpt, 1, pos, "clip")
    neg = g.add("CLIPTextEncode", [""], (380, 640))
    g.link(ckpt, 1, neg, "clip")
    return pos, neg, g.add("EmptyLatentImage", [size, size, 1], (380, 860))


def erase_nudity_sd15() -> None:
    g = Graph()
    ckpt, erase = loader_and_erase(g, "v1-5-pruned-emaonly.safetensors", NUDITY)
    pos, neg, latent = prompts_and_latent(g, ckpt, "a photo of a person on the beach", 512)
    sampler_branch(g, (ckpt, 0), pos, neg, latent, ckpt, 760, 500, "rece/original")
    sampler_branch(g, (erase, 0), pos, neg, latent, ckpt, 760, 100, "rece/erased")
    g.dump("erase_nudity_sd15_side_by_side.json")


def erase_artist_sdxl() -> None:
    g = Graph()
    ckpt, erase = loader_and_erase(g, "sd_xl_base_1.0.safetensors",
                                   ["Van Gogh", "art", "", "artistic_style", 1, 0.001, 0.1, 1.0, 0.1, "(none)"])
    pos, neg, latent = prompts_and_latent(g, ckpt, "a starry night over a village, painting by Van Gogh", 1024)
    sampler_branch(g, (erase, 0), pos, neg, latent, ckpt, 760, 100, "rece/sdxl_no_van_gogh")
    g.dump("erase_artist_style_sdxl.json")


def red_team() -> None:
    g = Graph()
    ckpt, erase = loader_and_erase(g, "v1-5-pruned-emaonly.safetensors", NUDITY)
    derive = g.add("RECEDeriveEmbedding", ["nudity", 0.1], (760, 0))
    g.link(erase, 0, derive, "model")
    g.link(ckpt, 1, derive, "clip")
    _, neg, latent = prompts_and_latent(g, ckpt, None, 512)
    sampler_branch(g, (erase, 0), derive, neg, latent, ckpt, 1140, 100, "rece/red_team")
    g.dump("red_team_derive_embedding.json")


def erase_nudity_flux() -> None:
    """Flux dev (Comfy-Org's single-file fp8 checkpoint): RECE edits txt_in, the layer reading T5's rows.

    Guidance 3.5 is Flux's default conditioning value; cfg 1 as Flux dev is sampled.
    """
    g = Graph()
    ckpt, erase = loader_and_erase(g, "flux1-dev-fp8.safetensors", NUDITY)
    pos, neg, latent = prompts_and_latent(g, ckpt, "a photo of a person on the beach", 1024)
    flux = (20, 1.0, "euler", "simple")
    sampler_branch(g, (ckpt, 0), pos, neg, latent, ckpt, 760, 500, "rece/flux_original", settings=flux)
    sampler_branch(g, (erase, 0), pos, neg, latent, ckpt, 760, 100, "rece/flux_erased", settings=flux)
    g.dump("erase_nudity_flux_side_by_side.json")


def erase_artist_rece_and_conceptprune_sd15() -> None:
    """SD1.5: Van Gogh erased by RECE (the text readers) and by ConceptPrune (the feed-forward weights that
    draw the style; the paper's artist preset: skill ratio 0.01, τ 10 of 50 steps), side by side with the
    original, all from the same seed."""
    g = Graph()
    ckpt, erase = loader_and_erase(g, "v1-5-pruned-emaonly.safetensors",
                                   ["Van Gogh", "art", "", "artistic_style", 1, 0.001, 0.1, 1.0, 0.1, "(none)"])
    prune = g.add("ConceptPruneEraseConcept", ["Van Gogh", "artist", 0.0, 0, 50, 0, 7.5, "euler", "normal", 512],
                  (380, -420))
    g.link(ckpt, 0, prune, "model")
    g.link(ckpt, 1, prune, "clip")
    pos, neg, latent = prompts_and_latent(g, ckpt, "a starry night over a village, painting by Van Gogh", 512)
    sampler_branch(g, (ckpt, 0), pos, neg, latent, ckpt, 760, 500, "rece/van_gogh_original")
    sampler_branch(g, (erase, 0), pos, neg, latent, ckpt, 760, 100, "rece/van_gogh_rece")
    sampler_branch(g, (prune, 0), pos, neg, latent, ckpt, 760, -300, "rece/van_gogh_conceptprune")
    g.dump("erase_artist_rece_and_conceptprune_sd15.json")
def fewshot_unlearn_sd15() -> None:
    """Four images of the concept (LoadImage ×4 → ImageBatch) → Few-shot Unlearn Concept (paper's settings)
    → the same prompt encoded by the original and by the unlearned CLIP, sampled side by side."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ["v1-5-pruned-emaonly.safetensors"], (0, 200))
    loads = [g.add("LoadImage", [f"eiffel_tower_{i}.png"], (0, 420 + 330 * i)) for i in range(4)]
    batch = loads[0]
    for i, img in enumerate(loads[1:]):
        b = g.add("ImageBatch", [], (340, 420 + 200 * i))
        g.link(batch, 0, b, "image1")
        g.link(img, 0, b, "image2")
        batch = b
    unlearn = g.add("RECEFewShotUnlearnConcept",
                    ["Eiffel Tower", "object", 5, 1e-5, 0, "fixed", "mlp-final-attn", False, 512, 2, "all"], (680, 0))
    for src, slot, name in ((ckpt, 1, "clip"), (ckpt, 0, "model"), (ckpt, 2, "vae"), (batch, 0, "images")):
        g.link(src, slot, unlearn, name)
    prompt = "a photo of the Eiffel Tower at sunset"
    pos_orig = g.add("CLIPTextEncode", [prompt], (1060, 500))
    g.link(ckpt, 1, pos_orig, "clip")
    pos_new = g.add("CLIPTextEncode", [prompt], (1060, 100))
    g.link(unlearn, 0, pos_new, "clip")
    neg = g.add("CLIPTextEncode", [""], (1060, 700))
    g.link(ckpt, 1, neg, "clip")
    latent = g.add("EmptyLatentImage", [512, 512, 1], (1060, 900))
    sampler_branch(g, (ckpt, 0), pos_new, neg, latent, ckpt, 1440, 100, "rece/fewshot_unlearned")
    sampler_branch(g, (ckpt, 0), pos_orig, neg, latent, ckpt, 1440, 500, "rece/fewshot_original")
    g.dump("fewshot_unlearn_sd15_side_by_side.json")


def task_vector_sd15() -> None:
    """Task Vector Erase Concept (fine-tune on 16 images SD1.5 draws of the concept, α by Diverse Inversion),
    the original and the erased model side by side, and Diverse Inversion red-teaming the erased model."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ["v1-5-pruned-emaonly.safetensors"], (0, 200))
    erase = g.add("RECETaskVectorEraseConcept", ["nudity", "(fine-tune on the concept)", 0.0, 200, 1e-4, "lora", 8, 16, 512,
                                                 20, 8, 100, 5e-3, 1.0, 0, "fixed"], (380, 0))
    g.link(ckpt, 0, erase, "model")
    g.link(ckpt, 1, erase, "clip")
    pos, neg, latent = prompts_and_latent(g, ckpt, "a photo of a person on the beach", 512)
    sampler_branch(g, (ckpt, 0), pos, neg, latent, ckpt, 760, 500, "rece/tv_original")
    sampler_branch(g, (erase, 0), pos, neg, latent, ckpt, 760, 100, "rece/tv_erased")
    invert = g.add("RECEDiverseInversion", ["nudity", 8, 100, 5e-3, 0.1, 8, 512, 20, 4.0, "rece/red_team_nudity",
                                            0, "fixed"], (760, 900))
    g.link(erase, 0, invert, "model")
    g.link(ckpt, 1, invert, "clip")
    sampler_branch(g, (erase, 0), invert, neg, latent, ckpt, 1140, 900, "rece/tv_red_team")
    g.dump("erase_task_vector_sd15.json")


BUILDERS = (fewshot_unlearn_sd15, erase_nudity_sd15, erase_artist_sdxl, red_team, erase_nudity_flux,
            erase_artist_rece_and_conceptprune_sd15, task_vector_sd15)


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for build in BUILDERS:
        build()
