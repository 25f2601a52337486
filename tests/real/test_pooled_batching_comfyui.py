"""Pooled vectors of many prompts per encoder call through ComfyUI 0.3.64's own text encoders (real tier).

ComfyUI's own ``comfy.sd.CLIP`` around its Flux (CLIP-L + T5-XXL), SD3 (CLIP-L + G + T5-XXL) and SDXL (CLIP-L +
bigG) text encoder classes and tokenizers (SD3's without T5, whose rows it pads to 4096 wide), with tiny configs (ComfyUI's own ``<name>_model_config`` option) and
seeded weights: every prompt's pooled vector read from one batched ``encode_from_tokens`` call equals the
one CLIPTextEncode gives it alone, and RECE Erase Concept with 100 concepts on Flux takes at most 10 encoder calls.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import load_pack

load_pack()  # the pack as ComfyUI loads it (rece_comfyui), also when this file runs alone

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="real tier: set COMFYUI_PATH")

CLIP_CONFIG = {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 2, "num_hidden_layers": 3,
               "projection_dim": 48}
T5_CONFIG = {"d_model": 256, "d_ff": 64, "d_kv": 16, "num_heads": 4, "num_layers": 1}
OPTIONS = {"clip_l_model_config": CLIP_CONFIG, "clip_g_model_config": CLIP_CONFIG, "t5xxl_model_config": T5_CONFIG}
PROMPTS = ["nudity", "Van Gogh", "a photo of a cat", "", " ", "(nudity:1.3) on a beach, embedding-free",
           "a dog " * 60]


def comfy_clip(family: str, options: dict | None = None):
    """ComfyUI's CLIP for ``family`` (its own classes and tokenizers), tiny and seeded; ``sd3_t5``: SD3 with its
    T5 (4096 wide, as SD3's encoder pads its CLIP rows to 4096 and puts the T5 rows after them)."""
    import sys
    from pathlib import Path

    import comfy.sd
    import comfy.sdxl_clip
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip

    sys.path.insert(0, str(Path(__file__).parent))
    from checkpoint import seed_module

    target = {"flux": (comfy.text_encoders.flux.flux_clip(), comfy.text_encoders.flux.FluxTokenizer),
              "sd3": (comfy.text_encoders.sd3_clip.sd3_clip(t5=False), comfy.text_encoders.sd3_clip.SD3Tokenizer),
              "sd3_t5": (comfy.text_encoders.sd3_clip.sd3_clip(), comfy.text_encoders.sd3_clip.SD3Tokenizer),
              "sdxl": (comfy.sdxl_clip.SDXLClipModel, comfy.sdxl_clip.SDXLTokenizer)}[family]

    class Target:
        clip, tokenizer = target
        params: dict = {}

    clip = comfy.sd.CLIP(target=Target(), tokenizer_data={"t5xxl_min_length": 16},
                         model_options=OPTIONS | (options or {}) | {"dtype": torch.float32})
    with torch.no_grad():
        seed_module(clip.cond_stage_model, torch.Generator().manual_seed(1))
    return clip


def arch_of(family: str):
    from rece_comfyui.nodes.host import architectures

    return architectures.by_name("unet" if family == "sdxl" else family)


@pytest.mark.parametrize("family", ["flux", "sd3", "sdxl"])
def test_batched_pooled_vectors_equal_comfyuis_one_at_a_time(family):
    from rece_comfyui.nodes.host import encoding

    clip = comfy_clip(family)
    alone = [clip.encode_from_tokens(clip.tokenize(t if t.strip() else ""), return_pooled=True)[1] for t in PROMPTS]
    calls, encode = [], clip.encode_from_tokens
    clip.encode_from_tokens = lambda tokens, *a, **kw: calls.append(tokens) or encode(tokens, *a, **kw)
    got = encoding.pooled_many(clip, PROMPTS, arch_of(family))
    assert len(calls) == 2  # the batch, and its last prompt alone (the CLIP's first batch is checked)
    width = {"flux": 48, "sd3": 48 + 48, "sdxl": 48}[family]  # ComfyUI projects the pooled CLIP hidden → hidden
    for text, a, b in zip(PROMPTS, got, alone):
        assert a.shape == b.shape == (1, width), text
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5 * float(b.abs().max())), text
    assert len({tuple(v.flatten().tolist()) for v in got}) >= 5  # the prompts' vectors differ
    for name in ("clip_l", "clip_g"):
        sub = getattr(clip.cond_stage_model, name, None)
        assert sub is None or "encode" not in vars(sub)  # ComfyUI's own encode is back


def test_a_hundred_flux_concepts_take_at_most_ten_encoder_calls_with_comfyuis_flux_encoder(monkeypatch):
    from rece_comfyui.nodes.host import encoding

    class Instant(encoding.EncoderCalls):  # an encoder that takes no time: the count does not depend on the load
        def __init__(self, **kw):
            super().__init__(clock=lambda: 0.0, **kw)

    monkeypatch.setattr(encoding, "EncoderCalls", Instant)
    from dit_factory import make_model
    from rece_comfyui.nodes.rece import RECEEraseConcept

    model, clip = make_model("flux"), comfy_clip("flux")
    calls, encode = [], clip.encode_from_tokens
    clip.encode_from_tokens = lambda tokens, *a, **kw: calls.append(tokens) or encode(tokens, *a, **kw)
    names = [f"concept number {i}" for i in range(100)]
    with torch.inference_mode():
        out, erasure, report = RECEEraseConcept().erase(model, clip, "\n".join(names), "", "", "custom", 1, 0.1, 0.1,
                                                        1.0, 0.1)["result"]
    assert erasure.spaces["pooled"].concepts == tuple(names), report
    assert len(calls) <= 10, [len(t["t5xxl"][0]) for t in calls]


def test_sd3_rows_batched_equal_comfyuis_one_at_a_time():
    """ComfyUI's own SD3 encoder (CLIP-L + G + T5) gives every chunk's CLIP-L+G rows, then every chunk's T5 rows:
    the rows of several prompts from one call, each picked from both blocks, equal each prompt encoded alone
    (weighted and long prompts included; prompts of another length go in their own call)."""
    from dit_factory import make_model
    from rece_comfyui.nodes.host import encoding

    t5 = {"t5xxl_model_config": T5_CONFIG | {"d_model": 4096}}  # SD3's rows are 4096 wide
    clip, model = comfy_clip("sd3_t5", t5), make_model("sd3")
    arch = arch_of("sd3")
    texts = [t for t in PROMPTS if len(t) < 100] + [f"concept number {i}" for i in range(8)]
    calls, encode = [], clip.encode_from_tokens
    clip.encode_from_tokens = lambda tokens, *a, **kw: calls.append(tokens) or encode(tokens, *a, **kw)
    with torch.no_grad():
        got = encoding.encode_many(clip, texts, arch, model)
        n_batched = len(calls)
        alone = [encoding.encode(clip, t, torch.device("cpu"), arch, model)[0] for t in texts]
    assert n_batched < len(texts) / 2, n_batched
    for text, a, b in zip(texts, got, alone):
        assert a.rows.shape == b.rows.shape and a.rows.shape[0] == 77 + 16, text
        assert a.last_token == b.last_token
        assert torch.allclose(a.rows.float(), b.rows, rtol=1e-4, atol=1e-5 * float(b.rows.abs().max())), text
    assert len({tuple(e.rows[-1, :8].tolist()) for e in got}) >= 5  # the prompts' T5 rows differ
