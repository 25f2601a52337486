"""Specificity of Few-shot Unlearn Concept on a tiny model that reads its text (issue #19).

    OMP_NUM_THREADS=1 python benchmarks/fewshot_specificity.py [--seeds 0 1 2 3 4 5] [--lr 1e-4] [--clip-lr 0]
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/fewshot_specificity.py   # ComfyUI's own classes

Defaults are the test's settings for the tier in use (tests/nodes/test_fewshot.py): CI tier eps-prediction,
pre-training 500 steps at UNet lr 1e-2 on every timestep, unlearning lr 1e-4, losses over every timestep;
real tier v-prediction, 300 steps at 2e-3 on the top 30 % of the schedule (``--t-min 0.7``), unlearning
lr 2e-3, losses measured on that same top 30 %.

Per seed: the seeded tiny CLIP/MODEL/VAE of ``tests/fewshot_factory.py``; the UNet and (unless
``--clip-lr 0``) the CLIP pre-trained to denoise synthetic image classes under captions naming each
class's made-up word (``make_text_sensitive``); then the node unlearns class 0's word from 4 new class-0 images. Printed:
text-sensitivity before/after pre-training (loss under the right / a wrong caption), (a) the concept
caption's loss on its images after/before, (c) class 1's loss under its own caption after/before,
(b) how far the conditioning of the concept prompt moved against that of class 1's prompt
(whole conditioning, and the rows from the class word on; relative change).
"""

from __future__ import annotations

import argparse

import _host  # noqa: E402,F401  (sys.path: tests/ and the ComfyUI tier; ComfyUI on the CPU without CUDA)

import torch  # noqa: E402

import fewshot_factory as ff  # noqa: E402
from conftest import load_pack  # noqa: E402


def moved(before: torch.Tensor, after: torch.Tensor, start: int = 0, stop: int | None = None) -> float:
    """Relative change of rows ``start:stop`` of a conditioning ``[1, L, d]``."""
    return float((after[:, start:stop] - before[:, start:stop]).norm() / before[:, start:stop].norm())


def word_start(clip, text: str) -> int:
    """Index of the first row that differs between 'a photo of a X' prompts (the class word's first token)."""
    a = next(iter(clip.tokenize(text).values()))[0]
    b = next(iter(clip.tokenize("a photo of a").values()))[0]
    return next(i for i in range(len(a)) if a[i][0] != b[i][0])


def end_row(clip, text: str) -> int:
    """Index of the end token's row."""
    ids = [t[0] for t in next(iter(clip.tokenize(text).values()))[0]]
    return next(i for i in range(1, len(ids)) if ids[i] == ids[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--lr", type=float, default=None, help="unlearning lr (default 1e-4 CI tier, 2e-3 real tier)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--pretrain-steps", type=int, default=None, help="default 500 CI tier, 300 real tier")
    p.add_argument("--pretrain-lr", type=float, default=None,
                   help="UNet pre-training lr (default 1e-2 CI tier, 2e-3 real tier: the figures in docs/fewshot.md)")
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--clip-lr", type=float, default=1e-3, help="pre-train the text encoder too at this lr (0: UNet only)")
    p.add_argument("--prediction", choices=("eps", "v", "flow"), default=None, help="default eps CI tier, v real tier")
    p.add_argument("--t-min", type=float, default=None,
                   help="pre-train and measure on the top 1 - t_min of the schedule (default 0 CI tier, 0.7 real tier)")
    args = p.parse_args()
    for name, ci, real in (("pretrain_lr", 1e-2, 2e-3), ("lr", 1e-4, 2e-3), ("pretrain_steps", 500, 300),
                           ("prediction", "eps", "v"), ("t_min", 0.0, 0.7)):
        if getattr(args, name) is None:
            setattr(args, name, real if ff.REAL else ci)
    node = load_pack().nodes.fewshot.FewShotUnlearnConcept()
    w0, w1 = ff.CLASS_WORDS[:2]
    concept, other = f"a photo of a {w0}", f"a photo of a {w1}"
    print(f"tier: {'real' if ff.REAL else 'CI'}; {args.prediction}; lr {args.lr}, {args.epochs} epochs, pre-training "
          f"{args.pretrain_steps} steps at {args.pretrain_lr}, {args.classes} classes, timesteps from {args.t_min:.0%} of the schedule")
    for seed in args.seeds:
        clip, model, vae = ff.make(seed=seed, prediction=args.prediction)
        imgs0, imgs1 = ff.class_images(0, 4, seed=100), ff.class_images(1, 4, seed=100)

        def loss(clip, imgs, text):
            return ff.caption_loss(clip, model, vae, imgs, text, t_min=args.t_min)

        def sens():
            return (loss(clip, imgs0, concept), loss(clip, imgs0, other), loss(clip, imgs1, other), loss(clip, imgs1, concept))

        s0 = sens()
        ff.make_text_sensitive(clip, model, vae, classes=args.classes, steps=args.pretrain_steps,
                               lr=args.pretrain_lr, seed=seed, clip_lr=args.clip_lr, t_min=args.t_min)
        s1 = sens()
        before = {t: ff.caption_conditioning(clip, [t]) for t in (concept, other)}
        out = node.unlearn(clip, model, vae=vae, images=imgs0, resolution=64, concept=w0, concept_type="object",
                           epochs=args.epochs, learning_rate=args.lr, seed=0, parameters="mlp-final-attn")["result"][0]
        after = {t: ff.caption_conditioning(out, [t]) for t in (concept, other)}
        a = loss(out, imgs0, concept) / s1[0]
        c = loss(out, imgs1, other) / s1[2]
        c_wrong = loss(out, imgs0, other) / s1[1]
        st0, st1 = word_start(clip, concept), word_start(clip, other)
        ends = [end_row(clip, t) for t in (concept, other)]
        print(f"seed {seed}: loss right/wrong caption, class 0: {s0[0]:.3f}/{s0[1]:.3f} -> {s1[0]:.3f}/{s1[1]:.3f}; "
              f"class 1: {s0[2]:.3f}/{s0[3]:.3f} -> {s1[2]:.3f}/{s1[3]:.3f}")
        print(f"   (a) concept loss x{a:.3f}  (c) other class x{c:.3f}  (class-0 images, other caption x{c_wrong:.3f})"
              f"  (b) whole {moved(before[concept], after[concept]):.3f} vs {moved(before[other], after[other]):.3f}"
              f"  from word {moved(before[concept], after[concept], st0):.3f} vs {moved(before[other], after[other], st1):.3f}"
              f"  word row {moved(before[concept], after[concept], st0, st0 + 1):.3f} vs "
              f"{moved(before[other], after[other], st1, st1 + 1):.3f}"
              f"  word+end {moved(before[concept], after[concept], st0, ends[0] + 1):.3f} vs "
              f"{moved(before[other], after[other], st1, ends[1] + 1):.3f}")


if __name__ == "__main__":
    main()
