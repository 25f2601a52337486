"""Where the text enters each model family: the one place to read, and to extend for a new one.

A RECE erasure is one transform ``P`` of the rows a model's text readers see: every linear layer
that reads the text encoder's rows is edited as ``W' = W P``. Everything downstream of those
layers only sees what they produce, so this is exact for the whole model. A bias is left alone
(``W'c + b = Wg + b`` on the guide), since only ``.weight`` keys are patched.

Each ``Architecture`` says:
- ``readers``: the weight keys (``diffusion_model.`` stripped) of the layers reading the text rows;
- ``encoder``: the key in ComfyUI's tokens dict (``clip.tokenize(text)``) whose token ids align the
  rows (``None``: the first key, as SD/SDXL's ``l``/``g``);
- ``norm``: an RMSNorm (with weight) applied to the rows before the readers. The norm is per row,
  so the embedding space of ``P`` is the normed one: rows are normed before RECE sees them;
- ``template_end``: the token closing the user's words in a chat template (Qwen's ``<|im_end|>``);
  otherwise the tokenizer's own end token, otherwise the prompt's last token;
- ``pooled``: the layer reading the pooled text, where there is one (not edited: see README);
- ``guidance``: a conditioning key the model reads (Flux's distilled guidance);
- ``space``: erasures apply between families of the same space and width.
- ``ffn_out``: the feed-forward output layers (weight keys, ``diffusion_model.`` stripped) that
  ConceptPrune records and prunes (``""``: ConceptPrune refuses the family); ``ffn_split``: those
  among them whose input is the attention output then the MLP's (Flux's ``single_blocks.*.linear2``,
  ``Linear(hidden + mlp, hidden)``): only the MLP columns, from ``out`` on, are the feed-forward's.

Token alignment, whatever the encoder: the last word token is the one before the end token (CLIP's
first end token, T5's ``</s>``, Qwen's last ``<|im_end|>``), counted in the rows the model sees (a
template head ComfyUI strips, as Qwen-Image's system prompt, is subtracted); CLIP has a start token,
T5/Llama/Qwen do not. T5 in ComfyUI pads to a minimum length (Flux 256, Wan's UMT5 512, SD3 77,
HiDream 128) and never splits a prompt into chunks; Chroma's T5, Qwen and Gemma do not pad, so two
prompts can have different lengths (``rece_core.erase_rows`` / ``fit_rows`` pair them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ARCHITECTURES", "Architecture", "NOT_TEXT_CONDITIONED", "by_name", "detect", "rms_norm"]

IM_END = 151645  # Qwen2.5 / Qwen3 "<|im_end|>"


@dataclass(frozen=True)
class Architecture:
    name: str
    title: str
    readers: str
    configs: tuple[str, ...] = ()
    signature: tuple[str, ...] = ()
    encoder: str | None = None
    template_end: int | None = None
    norm: str | None = None
    norm_eps: float = 1e-6
    pooled: str | None = None
    guidance: float | None = None
    space: str = ""
    last_reader_only: bool = False
    note: str = ""
    ffn_out: str = ""
    ffn_split: str = ""

    def ffn_keys(self, keys: list[str]) -> list[str]:
        """The ``diffusion_model.*`` feed-forward output weight keys among a model's keys (sorted)."""
        if not self.ffn_out:
            return []
        pattern = re.compile(self.ffn_out)
        return sorted(k for k in keys if k.startswith("diffusion_model.")
                      and pattern.search(k.removeprefix("diffusion_model.")))

    def ffn_columns(self, key: str, shape: tuple[int, int]) -> tuple[int, int] | None:
        """The input columns ``[start, end)`` of ``key`` that are the feed-forward's (``None``: all)."""
        if self.ffn_split and re.search(self.ffn_split, key.removeprefix("diffusion_model.")):
            return shape[0], shape[1]
        return None

    def reader_keys(self, keys: list[str]) -> list[str]:
        """The ``diffusion_model.*`` weight keys this architecture edits, among a model's keys."""
        pattern = re.compile(self.readers)
        found = [k for k in keys if k.startswith("diffusion_model.")
                 and pattern.search(k.removeprefix("diffusion_model."))]
        if self.last_reader_only and found:
            found = [max(found, key=lambda k: [int(x) for x in re.findall(r"\d+", k)])]
        return found


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "unet", "SD1.x / SD2.x / SDXL UNet (every cross-attention attn2.to_k / to_v)",
        readers=r"attn2\.to_[kv]\.weight$", signature=("attn2",), space="unet", ffn_out=r"\.ff\.net\.2\.weight$"),
    Architecture(
        "qwen_image", "Qwen-Image (txt_in after txt_norm, Qwen2.5-VL rows)",
        readers=r"^txt_in\.weight$", configs=("QwenImage",), signature=("txt_norm.weight", "txt_in.weight"),
        encoder="qwen25_7b", template_end=IM_END, norm="txt_norm.weight", norm_eps=1e-6, space="qwen_image",
        ffn_out=r"^transformer_blocks\.\d+\.(img|txt)_mlp\.net\.2\.weight$"),
    Architecture(
        "flux", "Flux (txt_in, T5-XXL rows)",
        readers=r"^txt_in\.weight$", configs=("Flux", "FluxInpaint", "FluxSchnell"),
        signature=("txt_in.weight", "vector_in.in_layer.weight"), encoder="t5xxl",
        pooled="vector_in.in_layer.weight", guidance=3.5, space="t5xxl",
        ffn_out=r"^(double_blocks\.\d+\.(img|txt)_mlp\.2|single_blocks\.\d+\.linear2)\.weight$",
        ffn_split=r"^single_blocks\.\d+\.linear2\.weight$"),
    Architecture(
        "chroma", "Chroma (txt_in, T5-XXL rows)",
        readers=r"^txt_in\.weight$", configs=("Chroma", "ChromaRadiance"),
        signature=("txt_in.weight", "distilled_guidance_layer.in_proj.weight"), encoder="t5xxl", space="t5xxl"),
    Architecture(
        "sd3", "SD3.x (context_embedder, CLIP-L+G rows then T5-XXL rows)",
        readers=r"^context_embedder\.weight$", configs=("SD3",), signature=("context_embedder.weight",),
        encoder="l", pooled="y_embedder.mlp.0.weight", space="sd3",
        note="rows are aligned on CLIP-L's tokens; the T5 rows follow the CLIP rows",
        ffn_out=r"^joint_blocks\.\d+\.(x_block|context_block)\.mlp\.fc2\.weight$"),
    Architecture(
        "wan", "Wan 2.x (text_embedding.0, UMT5-XXL rows)",
        readers=r"^text_embedding\.0\.weight$", signature=("text_embedding.0.weight",),
        configs=("WAN21_T2V", "WAN21_I2V", "WAN21_FunControl2V", "WAN21_Camera", "WAN22_Camera", "WAN21_Vace",
                 "WAN21_HuMo", "WAN22_S2V", "WAN22_Animate", "WAN22_T2V"),
        encoder="umt5xxl", space="umt5xxl",
        ffn_out=r"^blocks\.\d+\.ffn\.2\.weight$"),
    Architecture(
        "hidream", "HiDream (caption_projection of the T5-XXL rows)",
        readers=r"^caption_projection\.\d+\.linear\.weight$", configs=("HiDream",),
        signature=("caption_projection.0.linear.weight",), encoder="t5xxl", last_reader_only=True,
        space="hidream_t5",
        note="only the T5 path is edited: each other caption_projection reads a different Llama-3 layer "
             "(conditioning_llama3), another embedding space"),
    Architecture(
        "lumina2", "Lumina 2 / Z-Image (cap_embedder.1 after its RMSNorm)",
        readers=r"^cap_embedder\.1\.weight$", configs=("Lumina2", "ZImage"),
        signature=("cap_embedder.0.weight", "cap_embedder.1.weight"), template_end=IM_END,
        norm="cap_embedder.0.weight", norm_eps=1e-5, space="lumina2"),
)

# Models whose attn2 reads image (not text) embeddings.
NOT_TEXT_CONDITIONED = {"SVD_img2vid", "SV3D_u", "SV3D_p", "Stable_Zero123"}


def by_name(name: str) -> Architecture:
    for arch in ARCHITECTURES:
        if arch.name == name:
            return arch
    raise ValueError(f"unknown architecture {name!r}; this pack knows {', '.join(a.name for a in ARCHITECTURES)}")


def _supported() -> str:
    return "; ".join(a.title for a in ARCHITECTURES)


def detect(kind: str, keys: list[str]) -> tuple[Architecture, list[str]]:
    """The architecture of a model (its ``model_config`` class name ``kind``, its state-dict ``keys``)
    and the weight keys to edit; a clear ``ValueError`` naming the model otherwise."""
    if kind not in NOT_TEXT_CONDITIONED:
        named = [a for a in ARCHITECTURES if kind in a.configs]
        stripped = {k.removeprefix("diffusion_model.") for k in keys}
        by_keys = [a for a in ARCHITECTURES if a.signature and all(
            any(s in k for k in stripped) if a.name == "unet" else s in stripped for s in a.signature)]
        for arch in named + by_keys:
            found = arch.reader_keys(keys)
            if found:
                return arch, found
    raise ValueError(
        f"RECE erases concepts from the layers that read a text encoder's rows; this model is {kind}, which has "
        f"none of the text readers this pack knows ({_supported()}).")


def rms_norm(rows: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x²) + eps) · w`` per row, as ComfyUI's RMSNorm; float32 ``[n, d]``."""
    x = rows.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(x)


def rms_norm_preimage(rows: Tensor, weight: Tensor) -> Tensor:
    """Encoder rows whose RMSNorm points along ``rows`` (``rows / w``; the norm fixes the length).

    The norm only sees directions: a derived embedding off the norm's sphere is reached along its ray.
    """
    w = weight.to(rows)
    safe = torch.where(w.abs() > 1e-12, w, torch.ones_like(w))
    return rows / safe
