"""``python -m rece_core demo``: erase a concept from a small seeded SD-shaped model."""

from __future__ import annotations

import argparse
import sys

from . import PRESETS, rece
from .toy import ARCHITECTURES, ToyTextEncoder, cross_attention_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rece_core")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="erase a concept from a seeded SD-shaped model (no download)")
    demo.add_argument("--arch", choices=sorted(ARCHITECTURES), default="sd15")
    demo.add_argument("--concept", action="append", help="concept to erase (repeatable)")
    demo.add_argument("--guide", default="")
    demo.add_argument("--preserve", action="append", default=[])
    demo.add_argument("--kind", choices=sorted(PRESETS), default="nudity")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    _, d = ARCHITECTURES[args.arch]
    weights = cross_attention_weights(args.arch, seed=args.seed)
    encoder = ToyTextEncoder(d, seed=args.seed)
    preset = PRESETS[args.kind]
    erasure = rece(weights, encoder, args.concept or ["nudity"], args.guide, args.preserve,
                   reg=preset.reg, epochs=preset.epochs)
    print(f"{args.arch}: {len(weights)} cross-attention matrices, text width {d}")
    print(erasure.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
