"""A RECE erasure as one transform of the text-embedding space.

Every closed-form edit maps each cross-attention projection by the same right-multiplication
``W' = W P`` (the targets ``W g`` and ``W r`` are the layer's own projections), so a whole
erasure is a single ``d × d`` matrix ``P = I + U Vᵀ`` whose perturbation of the identity is
kept as two thin factors ``up = U: [d, r]`` and ``down = Vᵀ: [r, d]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["LowRankTransform", "spd_solve"]


def spd_solve(a: Tensor, b: Tensor, what: str) -> Tensor:
    """Solve ``a x = b`` for symmetric positive-definite ``a: [d, d]`` in float64 (Cholesky)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    # Cholesky reads the lower triangle only: a tiny asymmetry from round-off does no harm
    chol, info = torch.linalg.cholesky_ex(a64)
    if int(info) != 0:
        raise ValueError(
            f"{what} is singular or not positive definite; increase the regularisation "
            "(lamb for the erase step, reg for the derivation)"
        )
    x = torch.cholesky_solve(b64, chol)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} is too ill-conditioned to solve; increase the regularisation")
    return x


@dataclass(frozen=True)
class LowRankTransform:
    """``P = I + up @ down`` with ``up: [d, r]``, ``down: [r, d]``; weights map as ``W ↦ W P``."""

    up: Tensor
    down: Tensor

    @property
    def dim(self) -> int:
        return self.up.shape[0]

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    @cached_property
    def is_dense(self) -> bool:
        """``down`` is the identity and ``up`` all of ``P − I`` (full rank): one product applies it."""
        return self.rank == self.dim and bool(torch.equal(
            self.down, torch.eye(self.dim, dtype=self.down.dtype, device=self.down.device)))

    @classmethod
    def identity(cls, d: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64) -> "LowRankTransform":
        z = torch.zeros(d, 0, device=device, dtype=dtype)
        return cls(z, z.T.clone())

    @classmethod
    def from_edit(cls, erase: Tensor, guide: Tensor, preserve: Tensor, *, lamb: float,
                  erase_scale: float, preserve_scale: float) -> "LowRankTransform":
        """The UCE edit as a transform.

        ``W' = (λW + s W Gᵀ E + p W Rᵀ R) M⁻¹ = W (I + s (G − E)ᵀ E M⁻¹)``,
        ``M = λI + s EᵀE + p RᵀR``; ``erase, guide: [n, d]`` paired row by row, ``preserve: [m, d]``.
        With fewer rows than ``d`` and ``λ > 0``, ``E M⁻¹`` comes from the small
        ``[n+m, n+m]`` system (Woodbury): ``E M⁻¹ = (E − E Xᵀ (λ C⁻¹ + X Xᵀ)⁻¹ X) / λ``,
        ``X = [E; R]``, ``C = diag(s, p)``.
        """
        d = erase.shape[1]
        e = erase.to(torch.float64)
        gap = guide.to(torch.float64) - e  # G − E
        r = preserve.to(torch.float64) if preserve_scale > 0 else preserve[:0].to(torch.float64)
        n_rows = e.shape[0] + r.shape[0]
        x = torch.cat([e, r])
        # the Woodbury form subtracts two nearly equal terms when λ is tiny next to the rows: keep
        # it to where float64 keeps ≥ 8 digits
        scale = float((x * x).sum(dim=1).max()) * max(erase_scale, preserve_scale) if n_rows else 0.0
        what = "the erase system λI + s·Σeeᵀ + p·Σrrᵀ"
        if 2 * n_rows <= d and lamb > 0 and erase_scale > 0 and lamb >= 1e-8 * scale:
            weights = torch.cat([torch.full((e.shape[0],), lamb / erase_scale, dtype=x.dtype, device=x.device),
                                 torch.full((r.shape[0],), lamb / max(preserve_scale, 1e-300),
                                            dtype=x.dtype, device=x.device)])
            small = x @ x.T
            small.diagonal().add_(weights)
            down = (e - spd_solve(small, x @ e.T, what).T @ x) / lamb
        else:
            m = lamb * torch.eye(d, dtype=torch.float64, device=e.device)
            m = m + erase_scale * (e.T @ e) + preserve_scale * (r.T @ r)
            if e.shape[0] >= d:  # P − I of full rank: keep it dense, s·(M⁻¹ Eᵀ(G − E))ᵀ, d right-hand sides
                delta = erase_scale * spd_solve(m, e.T @ gap, what).T
                return cls(delta.contiguous(), torch.eye(d, dtype=torch.float64, device=e.device))
            down = spd_solve(m, e.T, what).T  # E M⁻¹ (M symmetric)
        return cls((erase_scale * gap.T).contiguous(), down.contiguous())

    def then(self, other: "LowRankTransform") -> "LowRankTransform":
        """The transform of applying ``self`` and then ``other``: ``P_self · P_other``."""
        up = torch.cat([self.up, self.apply_columns(other.up)], dim=1)
        return LowRankTransform(up, torch.cat([self.down, other.down], dim=0))

    def apply_columns(self, x: Tensor) -> Tensor:
        """``P x`` for ``x: [d, k]``."""
        return self.apply_rows(x.T).T

    def apply_rows(self, x: Tensor) -> Tensor:
        """``x Pᵀ`` for embedding rows ``x: [n, d]``: what ``W'`` sees equals ``W`` on these rows."""
        x = x.to(self.up.dtype)
        return x + (x @ self.up.T if self.is_dense else (x @ self.down.T) @ self.up.T)

    def apply_weight(self, w: Tensor) -> Tensor:
        """``W P`` for ``w: [out, d]``, computed as ``W + (W U) Vᵀ`` in the factors' dtype."""
        w64 = w.to(self.up.dtype)
        return w64 + self.delta_weight(w64)

    def delta_weight(self, w: Tensor) -> Tensor:
        """``W (P − I) = (W U) Vᵀ`` for ``w: [out, d]`` in ``w``'s dtype (one product when dense)."""
        wu = w @ self.up.to(w.dtype)
        return wu if self.is_dense else wu @ self.down.to(w.dtype)

    def dense(self) -> Tensor:
        """``P: [d, d]``."""
        return torch.eye(self.dim, dtype=self.up.dtype, device=self.up.device) + self.up @ self.down

    def compressed(self, rtol: float = 1e-10) -> "LowRankTransform":
        """The same ``P`` with the fewest factors.

        Rank below ``d``: thin QR of both factors and an SVD of the small core, dropping singular
        values of ``U Vᵀ`` under ``rtol · σ_max`` (exact cancellations, i.e. round-off).
        Rank ``d`` or more: the dense ``P − I`` with ``down = I``, exact and no larger than ``P``.
        """
        if self.rank == 0:
            return self
        if self.rank >= self.dim:
            eye = torch.eye(self.dim, dtype=self.up.dtype, device=self.up.device)
            return LowRankTransform((self.up @ self.down).contiguous(), eye)
        qu, ru = torch.linalg.qr(self.up)
        qv, rv = torch.linalg.qr(self.down.T)
        u, s, vh = torch.linalg.svd(ru @ rv.T)
        keep = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
        up = (qu @ u[:, :keep]) * s[:keep]
        down = vh[:keep] @ qv.T
        return LowRankTransform(up.contiguous(), down.contiguous())

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "LowRankTransform":
        return LowRankTransform(self.up.to(device=device, dtype=dtype),
                                self.down.to(device=device, dtype=dtype))
