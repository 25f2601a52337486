"""How far HiDream's Llama-3 layers alone still move the sample toward a concept after RECE, per round.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/hidream_llama.py   # ComfyUI's own tiny HiDream class
    python benchmarks/hidream_llama.py                                 # the CI stand-in

On the tiny seeded HiDream of tests/dit_factory.py (stand-in encoders), for 0–3 RECE rounds: the sample with
the empty prompt's T5 rows and pooled vector and the concept's Llama-3 layers, minus the empty prompt's sample,
on the erased model, projected on the same move on the original model (1: as before, 0: no move toward the
concept); the same with the concept's T5 rows alone, for comparison. docs/families.md quotes its output.
"""

from __future__ import annotations

import os

import _host  # noqa: E402,F401  (sys.path: tests/ and the ComfyUI tier; ComfyUI on the CPU without CUDA)

import torch  # noqa: E402

from conftest import load_pack  # noqa: E402
from dit_factory import DiTCLIP, make_model, sample  # noqa: E402

load_pack()
from rece_comfyui.nodes.rece import RECEEraseConcept  # noqa: E402

CONCEPT, PRESERVED = "nudity", "a photo of a cat"


def main() -> None:
    model, clip = make_model("hidream"), DiTCLIP("hidream")
    empty, concept = clip.conditioning(""), clip.conditioning(CONCEPT)
    inputs = {"Llama-3 layers alone": [[empty[0][0], empty[0][1] | {
                  "conditioning_llama3": concept[0][1]["conditioning_llama3"]}]],
              "T5 rows alone": [[concept[0][0], empty[0][1]]]}
    print(f"tier: {'ComfyUI ' + os.environ['COMFYUI_PATH'] if os.environ.get('COMFYUI_PATH') else 'CI stand-in'}")
    for rounds in range(4):
        out = RECEEraseConcept().erase(model, clip, CONCEPT, "", PRESERVED, "custom", rounds, 0.1, 0.1, 1.0,
                                       0.1)["result"][0]
        parts = []
        for name, cond in inputs.items():
            before, after = ((sample(m, "hidream", cond, empty) - sample(m, "hidream", empty, empty)).double()
                             for m in (model, out))
            parts.append(f"{name} {float((after * before).sum() / (before * before).sum()):+.3f}")
        print(f"rounds {rounds}: " + ", ".join(parts))


if __name__ == "__main__":
    with torch.no_grad():
        main()
