"""A prompt's text-encoder rows, and how the erase step pairs a concept's rows with its guide's."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["TextEmbedding", "erase_rows"]


@dataclass(frozen=True)
class TextEmbedding:
    """A prompt's text-encoder output ``rows: [tokens, d]``.

    ``last_token`` is the index of the prompt's last word token (the tokenizer's attention-mask
    sum minus 2); an empty prompt has ``last_token = 0``, its start token.
    """

    rows: Tensor
    last_token: int



def erase_rows(concept: TextEmbedding, guide: TextEmbedding) -> tuple[Tensor, Tensor]:
    """The erase step's paired rows: each prompt from its last word token on, cut to one length.

    As the authors' ``train_uce.edit_model``: with ``f = max(fᶜ, fᵍ)`` over both last-token
    indices, the concept gives rows ``[fᶜ, T − (f − fᶜ))`` and the guide ``[fᵍ, T − (f − fᵍ))``.
    """
    t = concept.rows.shape[0]
    if guide.rows.shape[0] != t:
        raise ValueError(f"concept has {t} token rows but guide has {guide.rows.shape[0]}")
    fc, fg = int(concept.last_token), int(guide.last_token)
    if not (0 <= fc < t and 0 <= fg < t):
        raise ValueError(f"last_token out of range: concept {fc}, guide {fg}, tokens {t}")
    far = max(fc, fg)
    return concept.rows[fc:t - (far - fc)], guide.rows[fg:t - (far - fg)]
