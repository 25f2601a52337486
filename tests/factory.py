"""Seeded MODEL and CLIP objects for node tests, built on whichever ComfyUI tier is on the path.

The MODEL is a real (or stand-in) ``ModelPatcher`` around a module whose parameters carry
ComfyUI's own key names; the CLIP is duck-typed like ``comfy.sd.CLIP`` (tokenize,
encode_from_tokens, tokenizer.clip_<name>.end_token) over rece_core's seeded toy encoder.
"""

from __future__ import annotations

import re

import torch
from torch import nn

import comfy.model_patcher
from rece_core.toy import ARCHITECTURES, ToyTextEncoder, cross_attention_weights, layer_names


def _config(name: str):
    return type(name, (), {})()


def _module_tree(state: dict[str, torch.Tensor]) -> nn.Module:
    root = nn.Module()
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    return root


def make_model(arch: str = "tiny", seed: int = 0, config: str | None = None, dtype=torch.float32,
               cross_attention: bool = True, storage=None, blocks: int | None = None):
    """A ModelPatcher whose model has every attn2.to_k/to_v (and a few other weights).

    ``storage(w)``, if given, wraps each attn2 weight (e.g. a quantized tensor type). ``blocks``: only the
    first ``blocks`` transformer blocks' to_k/to_v (same text width and key names, far fewer weights).
    """
    if blocks is None:
        state = cross_attention_weights(arch, seed=seed, dtype=dtype) if cross_attention else {}
    else:
        d = ARCHITECTURES[arch][1]
        g = torch.Generator().manual_seed(seed)
        attn = list(dict.fromkeys(k.rsplit(".", 2)[0] for k, _ in layer_names(arch)))[:blocks]
        state = {k: (torch.randn(out, d, generator=g) / d ** 0.5).to(dtype)
                 for k, out in layer_names(arch) if k.rsplit(".", 2)[0] in attn}
    if storage is not None:
        state = {k: storage(v) for k, v in state.items()}
    g = torch.Generator().manual_seed(seed + 1000)
    state["diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3, generator=g).to(dtype)
    if not cross_attention:
        state["diffusion_model.double_blocks.0.img_attn.qkv.weight"] = torch.randn(24, 8, generator=g).to(dtype)
    model = _module_tree(state)
    model.model_config = _config(config or {"sdxl": "SDXL", "sd21": "SD21"}.get(arch, "SD15"))
    model.device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


SPECIAL = ("<|startoftext|>", "<|endoftext|>")


class _Tokenizer:
    def __init__(self, enc: ToyTextEncoder) -> None:
        self.enc = enc
        self.start_token, self.end_token = enc.start, enc.end
        self.max_length = enc.tokens

    def token_ids(self, text: str) -> list[int]:
        """The toy ids, with a literal <|startoftext|>/<|endoftext|> read as the special token (as CLIP's)."""
        ids = [self.start_token]
        for piece in re.split(r"(<\|startoftext\|>|<\|endoftext\|>)", text):
            if piece in SPECIAL:
                ids.append(self.start_token if piece == SPECIAL[0] else self.end_token)
            elif piece.strip():
                words = self.enc.token_ids(piece)
                ids += words[1:words.index(self.end_token)]
        ids = ids[: self.max_length - 1] + [self.end_token]
        return ids + [self.end_token] * (self.max_length - len(ids))

    def tokenize_with_weights(self, text: str):
        words = text.split()
        chunks, ids = [], self.token_ids(text)
        # like ComfyUI: a prompt over 75 word tokens goes into further 77-token chunks
        n_words = sum((len(w) + 4) // 5 for w in words)
        for _ in range(max(1, -(-n_words // (self.max_length - 2)))):
            chunks.append([(i, 1.0, 0) for i in ids])
        return chunks


class FakeTokenizers:
    def __init__(self, names: list[str], encs: list[ToyTextEncoder]) -> None:
        self.names = names
        for name, enc in zip(names, encs):
            setattr(self, f"clip_{name}", _Tokenizer(enc))

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        return {name: getattr(self, f"clip_{name}").tokenize_with_weights(text) for name in self.names}


class FakeCLIP:
    """SD1/SD2: one encoder of width d; SDXL: CLIP-L (768) + bigG (1280) concatenated, with pooled."""

    def __init__(self, arch: str = "tiny", seed: int = 0, width: int | None = None) -> None:
        d = width or ARCHITECTURES[arch][1]
        if arch == "sdxl" and width is None:
            self.parts = [ToyTextEncoder(768, seed=seed), ToyTextEncoder(1280, seed=seed + 1)]
            self.tokenizer = FakeTokenizers(["g", "l"], [self.parts[1], self.parts[0]])
            self.pooled = True
        else:
            self.parts = [ToyTextEncoder(d, seed=seed)]
            self.tokenizer = FakeTokenizers(["l"], self.parts)
            self.pooled = False
        self.calls = 0
        self.prompts = 0  # one-chunk prompts encoded (chunks given to the encoder)

    def tokenize(self, text: str, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        """Like ComfyUI: every chunk encoded (one batch), rows concatenated; pooled of the first chunk."""
        self.calls += 1
        chunks = [[t[0] for t in chunk] for chunk in tokens[self.tokenizer.names[-1] if self.pooled else "l"]]
        self.prompts += len(chunks)
        per_chunk = [[enc.rows(ids) for enc in self.parts] for ids in chunks]
        cond = torch.cat([torch.cat(parts, dim=-1) for parts in per_chunk]).unsqueeze(0)
        first = chunks[0]
        pooled = per_chunk[0][-1][first.index(self.parts[-1].end)].unsqueeze(0) if self.pooled else None
        return (cond, pooled) if return_pooled else cond


def prepared_patches(model, key: str) -> list:
    """The patches of ``key`` as sampling gets them: on a current host (dynamic VRAM) every adapter
    is rebuilt as ``type(a)(a.loaded_keys, a.weights)`` with its tensors re-homed in one buffer."""
    import comfy.model_patcher

    low_vram = getattr(comfy.model_patcher, "LowVramPatch", None)
    if low_vram is None or not hasattr(low_vram, "prepare") or key not in model.patches:
        return model.patches.get(key, [])
    patch = low_vram(key, model.patches)
    buffer = torch.empty(patch.memory_required(), dtype=torch.uint8)
    return patch.prepare(buffer, None)


def effective_weights(model, keys=None) -> dict[str, torch.Tensor]:
    """The weights as sampling would use them, through ComfyUI's own calculate_weight."""
    import comfy.lora

    patches = model.get_key_patches("diffusion_model.")
    out = {}
    for key in keys or patches:
        w, convert = patches[key][0]
        if any(c.__name__ == "QuantizedTensor" for c in type(w).__mro__):
            w = w.dequantize()
        w = convert(w.detach().float().clone(), inplace=True)
        rest = prepared_patches(model, key)
        out[key] = comfy.lora.calculate_weight(rest, w, key, intermediate_dtype=torch.float32) if rest else w
    return out
