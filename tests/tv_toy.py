"""A seeded toy ε-prediction denoiser with cross-attention to text rows, and a toy differentiable text
encoder, for the task-vector and Diverse Inversion tests (pure torch, runs in milliseconds)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call

C, H, W, D_TOK, D, T = 4, 4, 4, 16, 16, 8


class ToyDenoiser(nn.Module):
    """``ε_θ(x_t, t, cond)``: a per-pixel MLP whose hidden state reads the text rows by cross-attention."""

    def __init__(self, seed: int = 0, hidden: int = 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj_in = nn.Linear(C + 1, hidden)
        self.to_q = nn.Linear(hidden, hidden, bias=False)
        self.to_k = nn.Linear(D, hidden, bias=False)
        self.to_v = nn.Linear(D, hidden, bias=False)
        self.mid = nn.Linear(hidden, hidden)
        self.proj_out = nn.Linear(hidden, C)
        with torch.no_grad():
            for p in self.parameters():
                fan_in = p.shape[1] if p.ndim == 2 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        b = x.shape[0]
        p = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        h = torch.nn.functional.silu(self.proj_in(torch.cat([p, t.view(b, 1, 1).expand(b, p.shape[1], 1)], -1)))
        q, k, v = self.to_q(h), self.to_k(cond), self.to_v(cond)
        h = h + torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1) @ v
        h = h + torch.nn.functional.silu(self.mid(h))
        return self.proj_out(h).transpose(1, 2).reshape(x.shape)


def alpha_bar(t: Tensor) -> Tensor:
    return torch.cos(0.5 * math.pi * (0.02 + 0.96 * t)) ** 2


def loss_of(model: nn.Module, params: dict[str, Tensor] | None = None):
    """The per-sample ε loss of ``model`` (with ``params`` in place of its own, if given)."""

    def loss(cond: Tensor, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a = alpha_bar(t).view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = model(xt, t, cond) if params is None else functional_call(model, params, (xt, t, cond))
        return (pred - noise).pow(2).flatten(1).mean(1)

    return loss


class ToyEncoder:
    """``V [B, d_tok] → cond [B, T, d]``: a fixed template whose second row is the embedding, mixed causally."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed + 100)
        self.template = torch.randn(T, D_TOK, generator=g)
        self.mix = torch.randn(D_TOK, D, generator=g) / math.sqrt(D_TOK)
        self.word = torch.randn(D_TOK, generator=g)  # the concept word's token embedding

    def rows(self, tokens: Tensor) -> Tensor:
        x = torch.cumsum(tokens, 1) / torch.arange(1, T + 1).view(1, T, 1)
        return torch.tanh(x @ self.mix) + x @ self.mix

    def __call__(self, v: Tensor) -> Tensor:
        tokens = self.template.expand(v.shape[0], T, D_TOK).clone()
        tokens[:, 1] = v
        return self.rows(tokens)

    def neutral(self) -> Tensor:
        """The empty prompt: the template with no word (its own second row)."""
        return self.rows(self.template.unsqueeze(0))


def concept_latents(n: int = 4, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed + 200)
    pattern = 1.5 * torch.randn(C, H, W, generator=g)
    return pattern + 0.1 * torch.randn(n, C, H, W, generator=g)


def finetune(model: nn.Module, latents: Tensor, cond: Tensor, steps: int = 40, lr: float = 1e-2, seed: int = 0,
             frozen: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The authors' prompt-agnostic fine-tune in small: Adam on the ε loss of the concept latents with the
    empty caption; returns the fine-tuned parameters (the model itself is left as it was)."""
    params = {k: p.detach().clone().requires_grad_(k not in frozen) for k, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in params.values() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    loss = loss_of(model, params)
    for _ in range(steps):
        x0 = latents[torch.randint(latents.shape[0], (4,), generator=g)]
        noise, t = torch.randn(x0.shape, generator=g), torch.rand(4, generator=g)
        value = loss(cond.expand(4, -1, -1), x0, noise, t).mean()
        opt.zero_grad()
        value.backward()
        opt.step()
    return {k: p.detach() for k, p in params.items()}
