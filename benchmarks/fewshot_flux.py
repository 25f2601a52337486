"""Few-shot unlearning on Flux: which text encoder to train (the authors' issue #5), measured on tiny models.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/fewshot_flux.py   # ComfyUI's own Flux and FluxClipModel
    python benchmarks/fewshot_flux.py                                 # the CI stand-ins

Flux reads T5-XXL's rows through ``txt_in`` and CLIP-L's pooled vector through ``vector_in``. For each seed,
Few-shot Unlearn Concept is run three times from the same start, training CLIP-L only, T5 only, or both
(``text_encoders``), with the same images, epochs and learning rate. Printed per run, relative to the
untrained CLIP: the flow-matching loss of the concept images under the concept caption (what the method
raises: higher = the caption helps less), under an unrelated caption, and how far the concept prompt's rows
and pooled vector moved. Seeded random models carry no meaning: this measures how much each path can carry
the unlearning, not what a trained Flux would show.
"""

from __future__ import annotations

import argparse
import os
import sys

from _host import ROOT  # noqa: E402  (sys.path: tests/ and the ComfyUI tier; ComfyUI on the CPU without CUDA)

sys.path.insert(0, str(ROOT / "tests" / "nodes"))  # the node tests' helpers

import torch  # noqa: E402

import fewshot_dit_factory as fdf  # noqa: E402
import fewshot_factory as ff  # noqa: E402
from test_fewshot_flux import CONCEPT, flux_loss, run  # noqa: E402

UNRELATED = "a bowl of green soup"


def moved(a, b, text: str) -> tuple[float, float]:
    with torch.no_grad():
        ra, pa = a.encode_from_tokens(a.tokenize(text), return_pooled=True)
        rb, pb = b.encode_from_tokens(b.tokenize(text), return_pooled=True)
    return float((rb - ra).norm() / ra.norm()), float((pb - pa).norm() / pa.norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args()
    tier = "ComfyUI " + os.environ["COMFYUI_PATH"] if os.environ.get("COMFYUI_PATH") else "stand-in"
    print(f"tier: {tier}; {args.seeds} seeds, {args.epochs} epochs, lr {args.lr:g}, 2 images at 64 px")
    print("| seed | trained | concept loss × | unrelated-caption loss × | concept rows moved | pooled moved |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed in range(args.seeds):
        clip, model, vae = fdf.make_flux(seed)
        imgs = ff.images(2, 64, seed=seed + 3)
        base = flux_loss(clip, model, vae, imgs)
        base_u = flux_loss(clip, model, vae, imgs, UNRELATED)
        for enc in ("clip_l", "t5xxl", "all"):
            out, u, _ = run(clip, model, vae, imgs, epochs=args.epochs, learning_rate=args.lr, seed=seed,
                            text_encoders=enc)
            rows, pooled = moved(clip, out, f"a photo of a {CONCEPT}")
            print(f"| {seed} | {enc} | {flux_loss(out, model, vae, imgs) / base:.3f} "
                  f"| {flux_loss(out, model, vae, imgs, UNRELATED) / base_u:.3f} | {rows:.3f} | {pooled:.3f} |")


if __name__ == "__main__":
    main()
