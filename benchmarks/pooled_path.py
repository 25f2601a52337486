"""How much of a concept the pooled text path carries, before and after RECE (Flux's vector_in, SD3's y_embedder).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/pooled_path.py   # ComfyUI's own tiny Flux / SD3
    python benchmarks/pooled_path.py                                 # the CI stand-ins

RECE erases the rows' readers and, as its own text space, the pooled readers. On tiny seeded models
(tests/dit_factory.py) it samples, for each concept, the original and the erased model, and prints,
relative to the concept's distance from the empty prompt on the original model ``‖x(c) − x(∅)‖``:
- ``pooled alone``: how far the concept's pooled vector alone (with the empty prompt's rows) moves the
  sample from the empty prompt's, on the original model and on the erased one;
- ``left``: the erased model's ``‖x'(c) − x'(∅)‖`` (rows and pooled vector both the concept's), and the
  same with the rows' erasure alone (what RECE left before the pooled path was erased, issue #21).
"""

from __future__ import annotations

import os

import _host  # noqa: E402,F401  (sys.path: tests/ and the ComfyUI tier; ComfyUI on the CPU without CUDA)

from conftest import load_pack  # noqa: E402
from dit_factory import DiTCLIP, make_model, sample  # noqa: E402

load_pack()
from rece_comfyui.nodes.host import weights  # noqa: E402
from rece_comfyui.nodes.rece import RECEEraseConcept, patched  # noqa: E402

CONCEPTS = ["nudity", "Van Gogh", "a red car", "Mickey Mouse"]


def swap_pooled(cond: list, other: list) -> list:
    return [[cond[0][0], cond[0][1] | {"pooled_output": other[0][1]["pooled_output"]}]]


def main() -> None:
    tier = "ComfyUI " + os.environ["COMFYUI_PATH"] if os.environ.get("COMFYUI_PATH") else "stand-in"
    print(f"tier: {tier}")
    for family in ("flux", "sd3"):
        for seed in (0, 1):
            model, clip = make_model(family, seed=seed), DiTCLIP(family, seed=seed)
            empty = clip.conditioning("")
            for concept in CONCEPTS:
                erased, erasure, _ = RECEEraseConcept().erase(model, clip, concept, "", "", "custom", 3, 0.1, 0.1,
                                                              1.0, 0.1)["result"]
                rows_only = patched(model, erasure, weights.cross_attention_keys(model), 1.0)
                c = clip.conditioning(concept)
                pooled_only = swap_pooled(empty, c)  # the empty prompt's rows, the concept's pooled vector

                def x(m, cond):
                    return sample(m, family, cond, empty, seed=seed)

                base = (x(model, c) - x(model, empty)).norm()
                alone = (x(model, pooled_only) - x(model, empty)).norm() / base
                alone_erased = (x(erased, pooled_only) - x(erased, empty)).norm() / base
                left = (x(erased, c) - x(erased, empty)).norm() / base
                left_rows = (x(rows_only, c) - x(rows_only, empty)).norm() / base
                print(f"{family:4} seed {seed} {concept!r:15}: pooled alone {alone:.3f} -> {alone_erased:.3f} "
                      f"erased | left: rows + pooled erased {left:.3f}, rows only {left_rows:.3f}", flush=True)


if __name__ == "__main__":
    main()
