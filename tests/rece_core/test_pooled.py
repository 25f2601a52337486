"""RECE over one vector per prompt (the pooled text space), against literal transcriptions of its closed forms."""

from __future__ import annotations

import torch

from conftest import load_pack

load_pack()
from rece_comfyui.nodes.host.weights import narrowed, widened  # noqa: E402
from rece_comfyui.rece_core.pooled import rece_vectors  # noqa: E402
from rece_comfyui.rece_core.transform import LowRankTransform  # noqa: E402


def setup(d=24, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, d, generator=g, dtype=torch.float64) / d ** 0.5
    e, guide = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(1, d, generator=g, dtype=torch.float64)
    r = torch.randn(2, d, generator=g, dtype=torch.float64)
    return w, e, guide.expand(n, -1), {"": guide[:1], "cat": r[:1]}, guide[:1]


def test_erase_step_is_the_uce_closed_form():
    """epochs 0: P = I + s (G − E)ᵀ E M⁻¹, M = λI + s EᵀE + p RᵀR, written out."""
    w, e, g, preserved, blank = setup()
    lamb, s, p = 0.1, 1.0, 0.1
    got, rounds = rece_vectors(w.T @ w, e, g, preserved, blank, lamb=lamb, erase_scale=s, preserve_scale=p, reg=0.1,
                               epochs=0)
    r = torch.cat(list(preserved.values()))
    m = lamb * torch.eye(e.shape[1], dtype=torch.float64) + s * e.T @ e + p * r.T @ r
    literal = torch.eye(e.shape[1], dtype=torch.float64) + s * (g - e).T @ e @ torch.linalg.inv(m)
    assert torch.allclose(got.dense(), literal, atol=1e-10) and len(rounds) == 1


def test_rounds_lower_reach_and_keep_the_concept_erased():
    w, e, g, preserved, blank = setup()
    _, rounds = rece_vectors(w.T @ w, e, g, preserved, blank, lamb=0.01, erase_scale=1.0, preserve_scale=0.1,
                             reg=0.1, epochs=3)
    assert max(rounds[-1].reach) < max(rounds[0].reach)
    assert max(rounds[-1].guide_gap) < 0.2  # the concept's own vector stays on the guide's


def test_widened_transform_changes_only_the_pooled_columns():
    """SDXL's label_emb reads [pooled bigG | size embeddings]: W P changes the pooled columns only."""
    g = torch.Generator().manual_seed(1)
    k, width = 12, 30
    t = LowRankTransform(torch.randn(k, 3, generator=g, dtype=torch.float64),
                         torch.randn(3, k, generator=g, dtype=torch.float64))
    w = torch.randn(20, width, generator=g, dtype=torch.float64)
    out = widened(t, width).apply_weight(w)
    assert torch.allclose(out[:, :k], w[:, :k] @ t.dense(), atol=1e-12)
    assert torch.equal(out[:, k:], w[:, k:])
    assert torch.equal(narrowed(widened(t, width), k).dense(), t.dense())
