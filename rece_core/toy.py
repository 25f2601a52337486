"""Small seeded stand-ins for an SD model's cross-attention and text encoder (demo, tests, benchmarks).

A seeded text encoder carries no meaning: it only has the shape and token handling of CLIP
(start token, words, end token, padding to 77 rows, causal mixing so padding rows depend on the
prompt), which is all the erasure's token handling needs.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from .procedure import TextEmbedding

__all__ = ["ARCHITECTURES", "ToyTextEncoder", "cross_attention_weights", "layer_names"]

# (block prefix, channels, transformer depth) in UNet order, ComfyUI (ldm) key names.
_SD1 = ([("input_blocks.1.1", 320, 1), ("input_blocks.2.1", 320, 1), ("input_blocks.4.1", 640, 1),
         ("input_blocks.5.1", 640, 1), ("input_blocks.7.1", 1280, 1), ("input_blocks.8.1", 1280, 1),
         ("middle_block.1", 1280, 1)]
        + [(f"output_blocks.{i}.1", c, 1) for i, c in
           [(3, 1280), (4, 1280), (5, 1280), (6, 640), (7, 640), (8, 640), (9, 320), (10, 320), (11, 320)]])
_SDXL = ([("input_blocks.4.1", 640, 2), ("input_blocks.5.1", 640, 2), ("input_blocks.7.1", 1280, 10),
          ("input_blocks.8.1", 1280, 10), ("middle_block.1", 1280, 10)]
         + [(f"output_blocks.{i}.1", c, n) for i, c, n in
            [(0, 1280, 10), (1, 1280, 10), (2, 1280, 10), (3, 640, 2), (4, 640, 2), (5, 640, 2)]])
ARCHITECTURES: dict[str, tuple[list[tuple[str, int, int]], int]] = {
    "sd15": (_SD1, 768), "sd21": (_SD1, 1024), "sdxl": (_SDXL, 2048),
    "tiny": ([("input_blocks.1.1", 32, 1), ("middle_block.1", 64, 1), ("output_blocks.3.1", 32, 1)], 64),
}


def layer_names(arch: str) -> list[tuple[str, int]]:
    """``(key, out)`` of every ``attn2.to_v`` then ``attn2.to_k`` weight, ComfyUI key names."""
    blocks, _ = ARCHITECTURES[arch]
    attn = [(f"diffusion_model.{b}.transformer_blocks.{t}.attn2", c) for b, c, n in blocks for t in range(n)]
    return [(f"{a}.to_{kv}.weight", c) for kv in ("v", "k") for a, c in attn]


def cross_attention_weights(arch: str = "sd15", seed: int = 0, dtype: torch.dtype = torch.float32,
                            device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Seeded ``[out, d]`` key/value projections, fan-in scaled like a trained linear layer."""
    _, d = ARCHITECTURES[arch]
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(out, d, generator=g) / d ** 0.5).to(device=device, dtype=dtype)
            for k, out in layer_names(arch)}


class ToyTextEncoder:
    """A seeded CLIP-shaped encoder: words hash to token ids, 77 rows, causal mixing."""

    def __init__(self, d: int = 768, seed: int = 0, tokens: int = 77, vocab: int = 4096,
                 pad_with_end: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.d, self.tokens, self.vocab, self.pad_with_end = d, tokens, vocab, pad_with_end
        self.table = torch.randn(vocab + 2, d, generator=g)
        self.position = 0.1 * torch.randn(tokens, d, generator=g)
        self.mix = torch.randn(d, d, generator=g) / d ** 0.5
        self.start, self.end = vocab, vocab + 1

    def token_ids(self, text: str) -> list[int]:
        """Start token, one id per word piece (≤ 5 letters), end token, padding."""
        ids = [self.start]
        for word in text.lower().split():
            for i in range(0, len(word), 5):
                h = hashlib.sha256(word[i:i + 5].encode()).digest()
                ids.append(int.from_bytes(h[:4], "little") % self.vocab)
        ids = ids[: self.tokens - 1] + [self.end]
        pad = self.end if self.pad_with_end else 0
        return ids + [pad] * (self.tokens - len(ids))

    def rows(self, ids: list[int]) -> Tensor:
        """``[tokens, d]`` output rows of a padded id sequence."""
        x = self.table[ids] + self.position
        # causal running mean, then a fixed nonlinearity: later rows depend on the whole prefix
        x = torch.cumsum(x, 0) / torch.arange(1, self.tokens + 1).unsqueeze(1)
        return x + torch.tanh(x @ self.mix)

    def __call__(self, text: str) -> TextEmbedding:
        ids = self.token_ids(text)
        return TextEmbedding(self.rows(ids), max(ids.index(self.end) - 1, 0))
