"""A prompt's text-encoder rows, and how the erase step pairs a concept's rows with its guide's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TextEmbedding", "erase_rows", "fit_rows"]


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
    Encoders that do not pad (T5 without padding, Qwen, Gemma) give prompts of different lengths:
    then the two tails are paired row by row up to the shorter one (the same rule when both are ``T``).
    """
    tc, tg = concept.rows.shape[0], guide.rows.shape[0]
    fc, fg = int(concept.last_token), int(guide.last_token)
    if not (0 <= fc < tc and 0 <= fg < tg):
        raise ValueError(f"last_token out of range: concept {fc} of {tc} rows, guide {fg} of {tg}")
    n = min(tc - fc, tg - fg)
    return concept.rows[fc:fc + n], guide.rows[fg:fg + n]


def fit_rows(rows: Tensor, n: int) -> Tensor:
    """``rows: [m, d]`` cut or extended (with copies of its last row) to ``[n, d]``.

    Pairs a guide's full embedding with a concept of another length (encoders that do not pad);
    the identity when both have the same number of rows, as with CLIP's 77.
    """
    m = rows.shape[0]
    if m >= n:
        return rows[:n]
    return torch.cat([rows, rows[-1:].expand(n - m, -1)])
