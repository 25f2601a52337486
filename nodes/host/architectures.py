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
  so the embedding space of ``P`` is the normed one: rows are normed before RECE sees them.
  ``norm_zero_centred``: the stored weight is ``scale − 1`` (Qwen-Image 2.1's ``text_norm``);
  ``norm_optional``: the norm is there only in some checkpoints (a Flux-family ``txt_norm``);
- ``template_end``: the token closing the user's words in a chat template (Qwen's ``<|im_end|>``);
  otherwise the tokenizer's own end token, otherwise the prompt's last token;
- ``pooled``: the layers (regex) reading the pooled text vector (``pooled_output``), where there is one:
  its own text space, erased by its own transform. ``pooled_columns``: the pooled vector's columns
  of that layer when it reads more (SDXL's ``label_emb`` reads the pooled bigG, then the size
  embeddings: only the first 1280 columns change); ``pooled_configs``: the config classes that have it
  (SD1.x/SD2.x have no pooled path, SD2.1 unCLIP's ``label_emb`` reads an image embedding);
  ``pooled_encoders``: the keys of the tokens dict whose CLIP gives the pooled vector, in the order
  ComfyUI concatenates them (Flux ``l``, SD3 ``l`` then ``g``, SDXL ``g``); ComfyUI's sub-encoder is the
  text encoder's attribute ``clip_<key>``. Where it is given, the pooled vectors of many prompts come from
  one encoder call (``encoding.pooled_many``); otherwise one prompt per call;
- ``excludes``: substrings no key of the family has (key detection of look-alike families);
- ``refused``: families whose text is read inside the diffusion model itself: refused with the reason;
- ``batch_encode``: ComfyUI's text encoder for the family (T5 alone, or Flux's CLIP-L + T5) encodes the
  chunks of a token list in one batch and concatenates their rows, so several prompts of one length go
  in one call (as CLIP's); encoders that strip a template do not; ``batch_blocks``: where the encoder
  combines kinds of rows, the tokens-dict keys whose rows it puts one kind after another, each kind for every
  chunk of the call (SD3: every chunk's CLIP-L+G rows, then every chunk's T5 rows);
- ``guidance``: a conditioning key the model reads (Flux's distilled guidance);
- ``space``: erasures apply between families of the same space and width.
- ``left_alone``: layers (regex) that read another text space this pack does not edit (the Erase report lists
  those the model has, less the edited readers); ``left_alone_layers``: the model config's list of the encoder
  layer each of them reads, in order (HiDream's ``llama_layers``);
- ``layers``: a second encoder whose every hidden layer is its own text space (HiDream's Llama-3.1):
  ``LayerSpaces`` says which conditioning entry holds them (``[1, layers, T, d]``), which tokens align them,
  and which readers read which layer (``reader_of(i)`` reads the config's ``layers_config[i]``); each layer
  ``L`` is the space ``<prefix>.<L>``, erased by its own transform over that layer's rows;
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

__all__ = ["ARCHITECTURES", "Architecture", "LayerSpaces", "NOT_TEXT_CONDITIONED", "REFUSED", "by_name", "detect", "norm_key",
           "rms_norm"]

IM_END = 151645  # Qwen2.5 / Qwen3 / Qwen3-VL "<|im_end|>"
EOT = 128009  # Llama-3 "<|eot_id|>" (HunyuanVideo's text encoder)
SDXL_CONFIGS = ("SDXL", "SDXLRefiner", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B", "SDXL_instructpix2pix")
FLUX_NORM = r"^txt_norm\.(weight|scale)$"


@dataclass(frozen=True)
class LayerSpaces:
    """An encoder whose every hidden layer is its own text space (HiDream's Llama-3.1: ``conditioning_llama3``).

    ``key``: the conditioning entry ``[1, layers, T, d]`` (every layer's rows of the prompt, start token
    included: ComfyUI's HiDream encoder drops the embedding layer, not a token); ``encoder``: the key of the
    tokens dict whose ids align the rows (a start token, words, then ``pad`` tokens; no end token);
    ``reader``: the reader key of projection ``i`` (``{i}``); ``config``: the model config's list of the
    encoder layer each projection reads, in order (projection ``i`` reads layer ``config[i]``); ``prefix``: the
    spaces' names, ``<prefix>.<layer>``; ``title``: for reports."""

    key: str
    encoder: str
    reader: str
    config: str
    prefix: str
    title: str
    pad: int

    def readers(self, keys, config: dict | None) -> dict[str, list[str]]:
        """Space name → the ``diffusion_model.*`` reader keys of that layer among ``keys`` (config order)."""
        layers = (config or {}).get(self.config)
        if not isinstance(layers, (list, tuple)):
            return {}
        present = set(keys)
        out: dict[str, list[str]] = {}
        for i, layer in enumerate(layers):
            key = f"diffusion_model.{self.reader.format(i=i)}"
            if key in present:
                out.setdefault(f"{self.prefix}.{int(layer)}", []).append(key)
        return dict(sorted(out.items(), key=lambda kv: int(kv[0].rsplit(".", 1)[1])))

    def layer(self, space: str) -> int:
        """The encoder layer of space ``<prefix>.<layer>``."""
        return int(space.removeprefix(self.prefix + "."))


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
    norm_zero_centred: bool = False
    norm_optional: bool = False
    pooled: str | None = None
    pooled_columns: int | None = None
    pooled_configs: tuple[str, ...] | None = None
    pooled_encoders: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    refused: str = ""
    batch_encode: bool = False
    batch_blocks: tuple[str, ...] = ()
    guidance: float | None = None
    space: str = ""
    last_reader_only: bool = False
    note: str = ""
    ffn_out: str = ""
    ffn_split: str = ""
    left_alone: str = ""
    left_alone_layers: str = ""
    layers: LayerSpaces | None = None
    checkpoint_blocks: tuple[str, ...] = ()  # module classes recomputed in backward when training through the model
    offload_blocks: tuple[str, ...] = ()  # module classes whose weights low-VRAM training streams (not recomputable)

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

    def unedited(self, keys: list[str], edited: list[str], config: dict | None = None) -> str:
        """A report line naming the layers left alone that this model has (``""``: none), and, where the
        config says, the encoder layers they read."""
        if not self.left_alone:
            return ""
        pattern = re.compile(self.left_alone)
        found = sorted((k.removeprefix("diffusion_model.") for k in keys if k.startswith("diffusion_model.")
                        and k not in edited and pattern.search(k.removeprefix("diffusion_model."))),
                       key=lambda k: [int(x) for x in re.findall(r"\d+", k)])
        if not found:
            return ""
        named = found[0] if len(found) == 1 else f"{found[0]} … {found[-1]}"
        line = f"not edited: {len(found)} layer(s) reading other text spaces ({named})"
        layers = (config or {}).get(self.left_alone_layers) if self.left_alone_layers else None
        if isinstance(layers, (list, tuple)) and layers:
            line += (f", which read {len(set(layers))} encoder layer(s) ({self.left_alone_layers}: "
                     f"{min(layers)} … {max(layers)}), each its own embedding space")
        return line

    def pooled_keys(self, kind: str, keys: list[str]) -> list[str]:
        """The ``diffusion_model.*`` weight keys reading the pooled text vector (none where there is no pooled path)."""
        if self.pooled is None or (self.pooled_configs is not None and kind not in self.pooled_configs):
            return []
        pattern = re.compile(self.pooled)
        return [k for k in keys if k.startswith("diffusion_model.") and pattern.search(k.removeprefix("diffusion_model."))]


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "unet", "SD1.x / SD2.x / SDXL UNet (every cross-attention attn2.to_k / to_v)",
        readers=r"attn2\.to_[kv]\.weight$", signature=("attn2",), space="unet",
        pooled=r"^label_emb\.0\.0\.weight$", pooled_columns=1280, pooled_configs=SDXL_CONFIGS, pooled_encoders=("g",),
        ffn_out=r"\.ff\.net\.2\.weight$", checkpoint_blocks=("ResBlock", "SpatialTransformer")),
    Architecture(
        "qwen_image", "Qwen-Image (txt_in after txt_norm, Qwen2.5-VL rows)",
        readers=r"^txt_in\.weight$", configs=("QwenImage",), signature=("txt_norm.weight", "txt_in.weight"),
        excludes=("double_blocks.", "single_blocks."),
        encoder="qwen25_7b", template_end=IM_END, norm="txt_norm.weight", norm_eps=1e-6, space="qwen_image",
        ffn_out=r"^transformer_blocks\.\d+\.(img|txt)_mlp\.net\.2\.weight$"),
    Architecture(
        "qwen_image21", "Qwen-Image 2.1 (txt_in.in_layer after the zero-centred txt_in.text_norm, Qwen3-VL rows)",
        readers=r"^txt_in\.in_layer\.weight$", configs=("QwenImage21",),
        signature=("txt_in.text_norm.weight", "txt_in.in_layer.weight"), template_end=IM_END,
        norm="txt_in.text_norm.weight", norm_zero_centred=True, space="qwen_image21"),
    Architecture(
        "flux", "Flux (txt_in, T5-XXL rows; pooled CLIP-L into vector_in)",
        readers=r"^txt_in\.weight$", configs=("Flux", "FluxInpaint", "FluxSchnell"),
        signature=("txt_in.weight", "vector_in.in_layer.weight"), encoder="t5xxl",
        norm=FLUX_NORM, norm_optional=True,
        pooled=r"^vector_in\.in_layer\.weight$", pooled_encoders=("l",), guidance=3.5, space="t5xxl", batch_encode=True,
        ffn_out=r"^(double_blocks\.\d+\.(img|txt)_mlp\.2|single_blocks\.\d+\.linear2)\.weight$",
        ffn_split=r"^single_blocks\.\d+\.linear2\.weight$", offload_blocks=("DoubleStreamBlock", "SingleStreamBlock")),
    Architecture(
        "chroma", "Chroma (txt_in, T5-XXL rows)",
        readers=r"^txt_in\.weight$", configs=("Chroma", "ChromaRadiance"),
        signature=("txt_in.weight", "distilled_guidance_layer.in_proj.weight"), encoder="t5xxl", space="t5xxl", batch_encode=True),
    Architecture(
        "flux2", "Flux.2 dev / Klein (txt_in, Mistral-3 or Qwen3 rows; no pooled path)",
        readers=r"^txt_in\.weight$", configs=("Flux2",),
        signature=("txt_in.weight", "double_stream_modulation_img.lin.weight"), excludes=("vector_in.",),
        template_end=IM_END, norm=FLUX_NORM, norm_optional=True, space="flux2",
        note="Klein's Qwen3 rows are aligned on <|im_end|>; Flux.2 dev's Mistral rows on the prompt's last token"),
    Architecture(
        "longcat_image", "LongCat-Image (txt_in, Qwen2.5-VL rows; no pooled path)",
        readers=r"^txt_in\.weight$", configs=("LongCatImage",), signature=("txt_in.weight", "double_blocks.0.img_mod.lin.weight"),
        excludes=("vector_in.", "distilled_guidance_layer.", "double_stream_modulation_img."),
        template_end=IM_END, norm=FLUX_NORM, norm_optional=True, space="longcat_image"),
    Architecture(
        "sd3", "SD3.x (context_embedder, CLIP-L+G rows then T5-XXL rows; pooled CLIP-L+G into y_embedder)",
        readers=r"^context_embedder\.weight$", configs=("SD3",), signature=("context_embedder.weight",),
        encoder="l", pooled=r"^y_embedder\.mlp\.0\.weight$", pooled_encoders=("l", "g"), space="sd3",
        # comfy/text_encoders/sd3_clip.py: cat([CLIP-L+G rows of every chunk, T5 rows of every chunk], dim=-2)
        batch_encode=True, batch_blocks=("l", "t5xxl"),
        note="rows are aligned on CLIP-L's tokens; the T5 rows follow the CLIP rows",
        ffn_out=r"^joint_blocks\.\d+\.(x_block|context_block)\.mlp\.fc2\.weight$", offload_blocks=("JointBlock",)),
    Architecture(
        "wan", "Wan 2.x (text_embedding.0, UMT5-XXL rows)",
        readers=r"^text_embedding\.0\.weight$", signature=("text_embedding.0.weight",),
        configs=("WAN21_T2V", "WAN21_I2V", "WAN21_FunControl2V", "WAN21_Camera", "WAN22_Camera", "WAN21_Vace",
                 "WAN21_HuMo", "WAN22_S2V", "WAN22_Animate", "WAN22_T2V"),
        encoder="umt5xxl", space="umt5xxl", batch_encode=True,
        ffn_out=r"^blocks\.\d+\.ffn\.2\.weight$"),
    Architecture(
        "hidream", "HiDream (caption_projection of the T5-XXL rows and of every Llama-3 layer; pooled CLIP-L+G into p_embedder)",
        readers=r"^caption_projection\.\d+\.linear\.weight$", configs=("HiDream",),
        signature=("caption_projection.0.linear.weight",), encoder="t5xxl", last_reader_only=True,
        pooled=r"^p_embedder\.pooled_embedder\.linear_1\.weight$", pooled_encoders=("l", "g"), space="hidream_t5",
        left_alone=r"^caption_projection\.\d+\.linear\.weight$", left_alone_layers="llama_layers",
        # comfy/ldm/hidream/model.py: caption_projection[i] reads conditioning_llama3[:, llama_layers[i]] for
        # i < len(llama_layers); comfy/text_encoders/hidream.py: LLAMA3Tokenizer (start 128000, pad 128009 to 128)
        layers=LayerSpaces(key="conditioning_llama3", encoder="llama", reader="caption_projection.{i}.linear.weight",
                           config="llama_layers", prefix="llama3", title="Llama-3 layers", pad=128009)),
    Architecture(
        "lumina2", "Lumina 2 / Z-Image (cap_embedder.1 after its RMSNorm)",
        readers=r"^cap_embedder\.1\.weight$", configs=("Lumina2", "ZImage"),
        signature=("cap_embedder.0.weight", "cap_embedder.1.weight"), template_end=IM_END,
        norm="cap_embedder.0.weight", norm_eps=1e-5, space="lumina2"),
    Architecture(
        "kandinsky5", "Kandinsky 5 (text_embeddings.in_layer, Qwen2.5-VL rows; pooled CLIP-L into "
        "pooled_text_embeddings.in_layer)",
        readers=r"^text_embeddings\.in_layer\.weight$", configs=("Kandinsky5", "Kandinsky5Image"),
        signature=("text_embeddings.in_layer.weight", "pooled_text_embeddings.in_layer.weight"), encoder="qwen25_7b",
        template_end=IM_END, pooled=r"^pooled_text_embeddings\.in_layer\.weight$", space="kandinsky5"),
    Architecture(
        "hunyuan_video", "HunyuanVideo 1.0 (txt_in.input_embedder and txt_in.c_embedder.in_layer, Llama-3 rows; "
        "pooled CLIP-L into vector_in)",
        readers=r"^txt_in\.(input_embedder|c_embedder\.in_layer)\.weight$",
        configs=("HunyuanVideo", "HunyuanVideoI2V", "HunyuanVideoSkyreelsI2V"),
        signature=("txt_in.input_embedder.weight", "txt_in.c_embedder.in_layer.weight", "vector_in.in_layer.weight"),
        encoder="llama", template_end=EOT, pooled=r"^vector_in\.in_layer\.weight$", pooled_encoders=("l",),
        space="hunyuan_video",
        note="txt_in.c_embedder reads the mean of the rows, linear in them, so W P is exact there too"),
    Architecture(
        "hunyuan_image", "HunyuanImage 2.1 / HunyuanVideo 1.5 (txt_in.input_embedder and txt_in.c_embedder.in_layer, "
        "Qwen2.5-VL rows)",
        readers=r"^txt_in\.(input_embedder|c_embedder\.in_layer)\.weight$",
        configs=("HunyuanImage21", "HunyuanImage21Refiner", "HunyuanVideo15", "HunyuanVideo15_SR_Distilled"),
        signature=("txt_in.input_embedder.weight", "txt_in.c_embedder.in_layer.weight"), excludes=("vector_in.",),
        encoder="qwen25_7b", template_end=IM_END, space="hunyuan_image",
        note="the ByT5 glyph rows (byt5_in) are another text space and are not edited"),
    Architecture(
        "ideogram4", "Ideogram 4 (llm_cond_proj after llm_cond_norm, Qwen3-VL rows)",
        readers=r"^llm_cond_proj\.weight$", configs=("Ideogram4",),
        signature=("llm_cond_norm.weight", "llm_cond_proj.weight"), template_end=IM_END,
        norm="llm_cond_norm.weight", norm_eps=1e-6, space="ideogram4"),
    Architecture(
        "ernie_image", "ERNIE-Image (text_proj, Ministral-3 rows)",
        readers=r"^text_proj\.weight$", configs=("ErnieImage",), signature=("text_proj.weight", "x_embedder.proj.weight"),
        space="ernie_image"),
    Architecture(
        "joyimage", "JoyImage (condition_embedder.text_embedder.linear_1, Qwen3-VL rows)",
        readers=r"^condition_embedder\.text_embedder\.linear_1\.weight$", configs=("JoyImage",),
        signature=("condition_embedder.text_embedder.linear_1.weight",), template_end=IM_END, space="joyimage"),
    Architecture(
        "omnigen2", "OmniGen2 (time_caption_embed.caption_embedder.1 after its RMSNorm, Qwen2.5-VL rows)",
        readers=r"^time_caption_embed\.caption_embedder\.1\.weight$", configs=("Omnigen2",),
        signature=("time_caption_embed.caption_embedder.0.weight", "time_caption_embed.caption_embedder.1.weight"),
        template_end=IM_END, norm="time_caption_embed.caption_embedder.0.weight", norm_eps=1e-5, space="omnigen2"),
    Architecture(
        "anima", "Anima (llm_adapter.blocks.*.cross_attn.k_proj / v_proj, Qwen3 rows)",
        readers=r"^llm_adapter\.blocks\.\d+\.cross_attn\.[kv]_proj\.weight$", configs=("Anima",),
        signature=("llm_adapter.blocks.0.cross_attn.k_proj.weight",), encoder="qwen3_06b", template_end=IM_END,
        space="anima",
        note="the Cosmos blocks' cross-attention reads the adapter's output, not the text rows: left alone"),
    Architecture(
        "cosmos_predict2", "Cosmos Predict2 (blocks.*.cross_attn.k_proj / v_proj, T5-XXL rows)",
        readers=r"^blocks\.\d+\.cross_attn\.[kv]_proj\.weight$", configs=("CosmosT2IPredict2", "CosmosI2VPredict2"),
        signature=("blocks.0.cross_attn.k_proj.weight",), excludes=("llm_adapter.",), encoder="t5xxl",
        space="cosmos_t5", batch_encode=True),
    Architecture(
        "auraflow", "AuraFlow (cond_seq_linear, Pile-T5-XL rows)",
        readers=r"^cond_seq_linear\.weight$", configs=("AuraFlow",), signature=("cond_seq_linear.weight",),
        encoder="pile_t5xl", space="auraflow", batch_encode=True),
    Architecture(
        "pixart", "PixArt α / Σ (y_embedder.y_proj.fc1, T5-XXL rows)",
        readers=r"^y_embedder\.y_proj\.fc1\.weight$", configs=("PixArtAlpha", "PixArtSigma"),
        signature=("y_embedder.y_proj.fc1.weight",), encoder="t5xxl", space="pixart", batch_encode=True),
    Architecture(
        "ltxv", "LTX-Video (caption_projection.linear_1, T5-XXL rows)",
        readers=r"^caption_projection\.linear_1\.weight$", configs=("LTXV",),
        signature=("caption_projection.linear_1.weight",), encoder="t5xxl", space="ltxv", batch_encode=True),
    Architecture(
        "mochi", "Mochi (t5_yproj and the t5_y_embedder attention pool, T5-XXL rows)",
        readers=r"^(t5_yproj|t5_y_embedder\.to_kv|t5_y_embedder\.to_q)\.weight$", configs=("GenmoMochi",),
        signature=("t5_yproj.weight", "t5_y_embedder.to_kv.weight"), encoder="t5xxl", space="mochi",
        note="t5_y_embedder's query reads the masked mean of the rows, linear in them, so W P is exact there too", batch_encode=True),
    Architecture(
        "stable_cascade", "Stable Cascade stage C (clip_txt_mapper, CLIP-G rows; pooled CLIP-G into "
        "clip_txt_pooled_mapper)",
        readers=r"^clip_txt_mapper\.weight$", configs=("Stable_Cascade_C",),
        signature=("clip_txt_mapper.weight", "clip_txt_pooled_mapper.weight"), encoder="g",
        pooled=r"^clip_txt_pooled_mapper\.weight$", pooled_encoders=("g",), space="stable_cascade"),
)

# Families whose text is read inside the diffusion model itself (no layer reads an encoder's rows).
REFUSED = {
    "HiDreamO1": "HiDream-O1 reads the prompt's tokens inside its own language model (the diffusion model is the "
                 "text encoder), so there are no encoder rows for a closed-form edit to act on",
    "SenseNovaU15": "SenseNova-U reads the prompt's tokens inside its own language model (the diffusion model is the "
                    "text encoder), so there are no encoder rows for a closed-form edit to act on",
}

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
    if kind in REFUSED:
        raise ValueError(f"RECE cannot erase from this {kind} model: {REFUSED[kind]}.")
    if kind not in NOT_TEXT_CONDITIONED:
        named = [a for a in ARCHITECTURES if kind in a.configs]
        stripped = {k.removeprefix("diffusion_model.") for k in keys}
        by_keys = [a for a in ARCHITECTURES if a.signature and all(
            any(s in k for k in stripped) if a.name == "unet" else s in stripped for s in a.signature)
            and not any(x in k for x in a.excludes for k in stripped)]
        for arch in named + by_keys:
            found = arch.reader_keys(keys)
            if found:
                return arch, found
    raise ValueError(
        f"RECE erases concepts from the layers that read a text encoder's rows; this model is {kind}, which has "
        f"none of the text readers this pack knows ({_supported()}).")


def norm_key(arch: Architecture, keys) -> str | None:
    """The model's key (``diffusion_model.`` stripped) of ``arch``'s norm before the readers, ``None`` if it has none.

    ``arch.norm`` is a key, or a pattern (``^...$``) where checkpoints name it differently (Flux's
    ``txt_norm.scale`` / ``.weight``); an optional norm absent from ``keys`` gives ``None``.
    """
    if arch.norm is None:
        return None
    if not arch.norm.startswith("^"):
        return arch.norm
    pattern = re.compile(arch.norm)
    found = [k.removeprefix("diffusion_model.") for k in keys if pattern.search(k.removeprefix("diffusion_model."))]
    if found:
        return found[0]
    if arch.norm_optional:
        return None
    raise ValueError(f"this {arch.title} model has no norm {arch.norm} before its text readers")


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
