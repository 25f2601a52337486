"""The derive step: the embedding that makes the edited model reproduce the concept anyway."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from .transform import LowRankTransform, spd_solve
from .validation import check_matrix, check_scale, check_weights

__all__ = ["Derivation", "derive_embedding", "derive_with_transform", "gram", "pull_back", "reach", "weighted_norm2"]


def gram(weights: Iterable[Tensor], *, device: torch.device | None = None, blocks: int = 4) -> Tensor:
    """``S = Σ WᵀW: [d, d]`` in float64, accumulated from float32 (or better) products.

    ``S`` is symmetric: with ``d`` split into ``blocks`` bands only the blocks on and above the
    diagonal are multiplied (``(b + 1) / 2b`` of the work; 4 bands measured fastest on CPU).
    Raises ``ValueError`` if any weight holds NaN or Inf (they surface in ``S``).
    """
    acc: Tensor | None = None
    bands: list[tuple[int, int]] = []
    for w in weights:
        w = w.to(device=device or w.device)
        w = w if w.dtype in (torch.float32, torch.float64) else w.float()
        if acc is None:
            d = w.shape[1]
            n = max(1, min(blocks, d))
            cuts = [round(i * d / n) for i in range(n + 1)]
            bands = list(zip(cuts[:-1], cuts[1:]))
            acc = torch.zeros(d, d, dtype=w.dtype, device=w.device)
        w = w.to(acc.dtype)
        wt = w.T
        for i, (a0, a1) in enumerate(bands):
            for b0, b1 in bands[i:]:
                acc[a0:a1, b0:b1].addmm_(wt[a0:a1], w[:, b0:b1])
    if acc is None:
        raise ValueError("no weights to form the Gram matrix from")
    for i, (a0, a1) in enumerate(bands):
        # BLAS does not promise an exactly symmetric product: mirror each diagonal block's upper
        # triangle, and each upper block into the lower one, so S = Sᵀ exactly on any machine
        block = acc[a0:a1, a0:a1]
        block.copy_(block.triu() + block.triu(1).T)
        for b0, b1 in bands[i + 1:]:
            acc[b0:b1, a0:a1] = acc[a0:a1, b0:b1].T
    s = acc.to(torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("cross-attention weights contain NaN or Inf (or overflow)")
    return s


def weighted_norm2(x: Tensor, s: Tensor, sizes: list[int] | None = None) -> Tensor:
    """``Σ_layers ‖W x‖²`` summed over rows ``x: [n, d]``, as ``tr(x S xᵀ)``.

    With ``sizes``, one sum per consecutive block of rows: ``[len(sizes)]``.
    """
    x = x.to(s.dtype)
    per_row = ((x @ s) * x).sum(dim=1)
    if sizes is None:
        return per_row.sum()
    return torch.stack([b.sum() for b in per_row.split(sizes)])


def pull_back(a: Tensor, step: LowRankTransform) -> Tensor:
    """``Qᵀ A Q`` for symmetric ``a: [d, d]`` and ``Q = I + u v`` (``step``), exactly symmetric.

    ``Qᵀ A Q = A + L + Lᵀ`` with ``L = (A u + ½ vᵀ (uᵀ A u)) v``: two ``d × d × r`` products.
    """
    u, v = step.up.to(a), step.down.to(a)
    k = a @ u  # A u: [d, r]
    if step.is_dense:  # v = I
        low = k + 0.5 * (u.T @ k)
        return a + low + low.T
    k.addmm_(v.T, u.T @ k, alpha=0.5)
    low = k @ v
    return a + low + low.T


class Derivation:
    """The derive step for fixed concept rows on an erasure ``P`` that grows step by step.

    Holds ``S = Σ WᵀW`` of the weights before any erasure (float64 ``[d, d]``), ``c S``, ``P`` and
    ``Σ W'ᵀW' = PᵀSP``. Composing a step ``Q`` (``P ↦ P Q``) updates ``PᵀSP ↦ Qᵀ(PᵀSP)Q`` at the
    cost of the step's rank, not of the whole erasure's.
    """

    def __init__(self, s: Tensor, concept: Tensor | None, *, reg: float) -> None:
        self.s = s.to(torch.float64)
        self.reg = check_scale("reg", reg)
        if concept is None:  # only the map K is wanted (rows streamed by the caller)
            concept = self.s.new_zeros(self.s.shape[0] + 1, self.s.shape[0])
        self.concept = concept.to(device=self.s.device, dtype=torch.float64)
        # more rows than d: solve for the [d, d] map K once and apply it, instead of n right-hand sides
        self.by_map = self.concept.shape[0] > self.s.shape[0]
        self.target = self.s if self.by_map else self.concept @ self.s  # c S: [n, d] (by map: S)
        self.p = LowRankTransform.identity(s.shape[0], device=s.device)
        self.system = self.s

    def then(self, step: LowRankTransform) -> "Derivation":
        """Compose ``step`` after the current erasure (in place); returns ``self``."""
        step = step.to(device=self.s.device, dtype=torch.float64)
        if step.rank > step.dim:
            step = step.compressed()  # dense P − I: pulling back costs d³, not d²·rank
        if step.rank:
            self.system = pull_back(self.system, step)
            p = self.p.then(step)
            self.p = p.compressed() if p.rank > p.dim else p
        return self

    def _solve(self) -> Tensor:
        a = self.system.clone()
        a.diagonal().add_(self.reg)
        rhs = self.p.apply_weight(self.target).T  # (c S P)ᵀ = Pᵀ S cᵀ (by map: Pᵀ S)
        return spd_solve(a, rhs, "the derivation system ΣW'ᵀW' + ρI")

    def map(self) -> Tensor:
        """``K = (PᵀSP + ρI)⁻¹ PᵀS``: float64 ``[d, d]``; derived rows are ``c Kᵀ``."""
        if not self.by_map:
            raise ValueError("this derivation solves for its concept rows, not for the map")
        return self._solve()

    def derive(self) -> Tensor:
        """``c' = c · Kᵀ``, ``K = (PᵀSP + ρI)⁻¹ PᵀS``, for the concept rows ``[n, d]``; float64 ``[n, d]``."""
        x = self._solve()
        return self.concept @ x.T if self.by_map else x.T


def derive_with_transform(s: Tensor, p: LowRankTransform, concept: Tensor, *, reg: float) -> Tensor:
    """``c' = c · [(PᵀSP + ρI)⁻¹ PᵀS]ᵀ`` for ``concept: [n, d]``; returns float64 ``[n, d]``.

    ``S = Σ WᵀW`` of the weights before any erasure, ``W' = W P`` the edited ones.
    """
    return Derivation(s, concept, reg=reg).then(p).derive()


def reach(s: Tensor, p: LowRankTransform, concept: Tensor, derived: Tensor, guide: Tensor,
          sizes: list[int] | None = None, *, scale: Tensor | None = None) -> Tensor:
    """How much of the concept the derived embedding still reaches on the edited model, in ``[0, 1]``.

    ``1 − Σ‖W'c' − Wc‖² / Σ‖Wc − Wg‖²`` (all ``[n, d]`` rows; ``g`` the guide's): 1 means the
    edited model reproduces the concept's original keys and values exactly, 0 that the derived
    embedding misses them by at least as much as the guide differs from the concept.
    With ``sizes`` (rows of several concepts stacked), one value per concept. ``scale``: the
    denominator ``weighted_norm2(c − g, s, sizes)`` when already known (it does not change with ``P``).
    """
    c = concept.to(device=s.device, dtype=torch.float64)
    if scale is None:
        scale = weighted_norm2(c - guide.to(device=s.device, dtype=torch.float64), s, sizes)
    miss = weighted_norm2(p.apply_rows(derived.to(s.device)) - c, s, sizes)
    return (1.0 - miss / scale.clamp_min(torch.finfo(torch.float64).tiny)).clamp(0.0, 1.0)


def derive_embedding(edited: Mapping[str, Tensor], original: Mapping[str, Tensor], concept: Tensor, *,
                     reg: float) -> Tensor:
    """``c' = argmin Σ‖W'c' − W c‖² + ρ‖c'‖²`` over all matrices together.

    ``edited``/``original``: the same names → ``[out, d]``; ``concept: [n, d]``.
    Returns ``[n, d]`` float32 (float64 if the concept is float64).
    """
    d = check_weights(edited)
    if check_weights(original) != d or set(edited) != set(original):
        raise ValueError("edited and original weights must have the same names and width")
    check_matrix("concept", concept, d)
    reg = check_scale("reg", reg)
    dev = concept.device
    a = torch.zeros(d, d, dtype=torch.float64, device=dev)
    b = torch.zeros(d, d, dtype=torch.float64, device=dev)
    for k, we in edited.items():
        wo = original[k]
        if wo.shape != we.shape:
            raise ValueError(f"weight {k!r}: edited {tuple(we.shape)} vs original {tuple(wo.shape)}")
        we64, wo64 = we.to(dev, torch.float64), wo.to(dev, torch.float64)
        a += we64.T @ we64
        b += we64.T @ wo64
    a += reg * torch.eye(d, dtype=torch.float64, device=dev)
    out = spd_solve(a, b @ concept.T.to(torch.float64), "the derivation system ΣW'ᵀW' + ρI").T
    return out.to(torch.float64 if concept.dtype == torch.float64 else torch.float32)
