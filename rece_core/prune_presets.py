"""ConceptPrune's prompt sets and settings (Chavhan et al., ICLR 2025), as facts.

Transcribed from the authors' repository ``ruchikachavhan/concept-prune``:
- prompt templates from ``utils/prompts.py`` (``get_prompts``): artists ('art'), nudity ('naked')
  and the objects of Imagenette ('object');
- the word lists from ``datasets/things.txt`` (20 things), ``datasets/humans.txt`` (18 humans) and
  ``datasets/common_scenes.txt`` (12 scenes), every line read (the issue counted 19/17/11);
- ``seed: 0`` and ``skill_ratio: 0.01`` from ``configs/wanda_config.yaml``; 50 sampling steps (the
  diffusers pipeline's default, which the authors call without ``num_inference_steps``), guidance 7.5;
- ``tau`` (the union of the first τ steps): the paper's settings per kind (artists 0.01 / τ 10,
  nudity 0.01 / τ 9, objects 0.02 / τ 10). The repository passes them on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HUMANS", "PRUNE_PRESETS", "PrunePreset", "SCENES", "THINGS", "prompt_pairs"]

THINGS = ("cat", "dog", "mouse", "bear", "car", "chair", "bag", "door", "rabbit", "ball", "bat", "horse", "bird",
          "flower", "bowl", "bottle", "wall", "building", "chicken", "duck")
HUMANS = ("man", "woman", "girl", "boy", "child", "couple", "guy", "doctor", "nurse", "teacher", "lawyer", "mother",
          "father", "kid", "professor", "student", "group of friends", "celebrity")
SCENES = ("road", "garden", "beach", "room", "park", "street", "shelter", "chair", "table", "bag", "tree", "forest")


@dataclass(frozen=True)
class PrunePreset:
    """A concept kind: prompt templates (``{concept}``, ``{x}``), the words ``{x}`` runs over, settings."""

    base: str
    concept: str
    words: tuple[str, ...]
    skill_ratio: float
    tau: int
    steps: int = 50
    cfg: float = 7.5
    seed: int = 0


PRUNE_PRESETS: dict[str, PrunePreset] = {
    "artist": PrunePreset("a photo of a {x}", "a {x} in the style of {concept}", THINGS, 0.01, 10),
    "nudity": PrunePreset("a photo of a {x}", "a photo of a {concept} {x}", HUMANS, 0.01, 9),
    "object": PrunePreset("a {x}", "a {concept} in a {x}", SCENES, 0.02, 10),
}
"""The nudity kind's concept word is the authors' target ``naked`` (their ``'a photo of a naked {human}'``)."""


def prompt_pairs(kind: str, concept: str) -> tuple[list[str], list[str]]:
    """``(base prompts, concept prompts)`` of a preset kind for ``concept``, paired by index."""
    preset = PRUNE_PRESETS[kind]
    return ([preset.base.format(x=x, concept=concept) for x in preset.words],
            [preset.concept.format(x=x, concept=concept) for x in preset.words])
