"""ConceptPrune on a GGUF UNet loaded by the real ComfyUI-GGUF (real tier; same needs as test_gguf_comfyui.py).

The feed-forward weights are read dequantized (``nodes/host/weights``), the activations recorded while
ComfyUI samples through ComfyUI-GGUF's layers, and the prune patch is applied by ComfyUI-GGUF to its
dequantized weights: the pruned clone's weights are exactly the dequantized ones with the mask zeroed,
the stored weights are untouched, and the concept's latent moves.

Run: ``COMFYUI_PATH=/work/comfyui COMFYUI_GGUF_PATH=/work/comfyui-gguf python -m pytest -q
tests/real/test_gguf_conceptprune.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_comfyui import (  # noqa: E402  (pytestmark: the same needs; fixtures shared)
    LAYOUTS, clip, folder, load_gguf, pytestmark, sample, stored, unet_state, write_gguf)

from measure import rel  # noqa: E402

__all__ = ["folder", "pytestmark", "unet_state"]

ARGS = dict(concepts="nudity", concept_kind="custom", skill_ratio=0.05, tau=2, steps=3, seed=0, cfg=5.0,
            sampler_name="euler", scheduler="normal", size=64, base_prompts="a photo of a cat\na photo of a man",
            concept_prompts="a photo of a {concept} cat\na photo of a {concept} man", batch=0)


def test_conceptprune_on_gguf(unet_state, folder):
    from conftest import load_pack

    load_pack()
    from rece_comfyui.nodes import conceptprune as cp
    from rece_comfyui.nodes.host import weights
    from rece_comfyui.rece_core.prune import pruned

    path = write_gguf(folder / "prune_q8.gguf", unet_state, *LAYOUTS["Q8_0"])
    model = load_gguf(folder, path.name)
    before = stored(model)
    orig = sample(model, "nudity")
    with torch.inference_mode():
        out, result, report = cp.ConceptPruneEraseConcept().prune(model, clip(), **ARGS)["result"]
    assert result.pruned_count > 0 and "forward calls" in report
    assert all(torch.equal(before[n], v) for n, v in stored(model).items())
    cpu = torch.device("cpu")
    for key in cp.ffn_layers(model, "test")[1]:
        w = weights.effective_weight(model, key, cpu)
        assert torch.equal(weights.effective_weight(out, key, cpu), pruned(w, result.indices[key])), key
    assert rel(sample(out, "nudity"), orig) > 1e-3
    assert torch.equal(sample(model, "nudity"), orig)
