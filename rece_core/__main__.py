"""``python -m rece_core demo``: erase a concept from a small seeded SD-shaped model."""

from __future__ import annotations

import argparse
import sys

from . import PRESETS, rece
from .toy import ARCHITECTURES, ToyTextEncoder, cross_attention_weights

KINDS = sorted(PRESETS) + ["custom"]
MAX_WORD_TOKENS = 75  # one 77-token chunk less its start and end tokens, as the nodes refuse


def _word_tokens(text: str) -> int:
    """The toy encoder's word tokens: one per ≤ 5 letters of each word (``ToyTextEncoder.token_ids``)."""
    return sum(-(-len(w) // 5) for w in text.lower().split())


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command line and its ``demo`` subcommand."""
    parser = argparse.ArgumentParser(prog="python -m rece_core")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="erase a concept from a seeded SD-shaped model (no download)",
        description="Erase concepts from a small seeded model shaped like SD1.5/SD2.1/SDXL's cross-attention, "
                    "with a seeded CLIP-shaped text encoder, and print the erasure report. The model's weights "
                    "are random: the report shows the method working, not what it does to a real checkpoint.")
    demo.add_argument("--arch", choices=sorted(ARCHITECTURES), default="sd15",
                      help="shape of the model: its cross-attention matrices and text width (default sd15)")
    demo.add_argument("--concept", action="append",
                      help="a concept to erase (repeatable; default: nudity)")
    demo.add_argument("--guide", default="",
                      help="what the concepts should become (default: empty = unconditional, as in the paper)")
    demo.add_argument("--preserve", action="append", default=[],
                      help="a prompt to keep unchanged (repeatable)")
    demo.add_argument("--kind", choices=KINDS, default="nudity",
                      help="the paper's reg (ρ) and rounds for this kind of concept; custom = --reg/--rounds "
                           "(default nudity: ρ=0.1, 3 rounds)")
    demo.add_argument("--reg", type=float, default=None, help="ρ, overrides the kind's (default: the kind's)")
    demo.add_argument("--rounds", type=int, default=None, help="RECE rounds, overrides the kind's")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the random model and text encoder (default 0)")
    return parser, demo


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    args = parser.parse_args(argv)

    _, d = ARCHITECTURES[args.arch]
    encoder = ToyTextEncoder(d, seed=args.seed)
    concepts = [c.strip() for c in (args.concept or ["nudity"])]
    if not all(concepts):
        parser.error("--concept is empty; give the concept to erase, e.g. --concept nudity")
    for label, text in [("--concept", c) for c in concepts] + [("--guide", args.guide)] + [
            ("--preserve", p) for p in args.preserve]:
        if _word_tokens(text) > MAX_WORD_TOKENS:
            parser.error(f"{label} {text[:40]!r}… is longer than one 77-token chunk ({_word_tokens(text)} word "
                         f"tokens, at most {MAX_WORD_TOKENS}); shorten it (the nodes refuse it too)")
    preset = PRESETS.get(args.kind, PRESETS["nudity"])
    reg = preset.reg if args.reg is None else args.reg
    rounds = preset.epochs if args.rounds is None else args.rounds
    weights = cross_attention_weights(args.arch, seed=args.seed)
    try:
        erasure = rece(weights, encoder, concepts, args.guide, args.preserve, reg=reg, epochs=rounds)
    except ValueError as exc:
        print(f"python -m rece_core demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.arch}: {len(weights)} cross-attention matrices, text width {d}; a random model and text "
          f"encoder (seed {args.seed}): the figures show the method at work, not a real checkpoint's")
    print(erasure.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
