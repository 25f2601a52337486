"""Pooled text vectors of many prompts from few encoder calls (issue #21: 100 Flux concepts in at most 10 calls).

ComfyUI's CLIP encodes the chunks of a token list in one batch and returns the first chunk's pooled vector only;
``encoding.pooled_many`` reads every prompt's pooled vector from the family's CLIP sub-encoders (``clip_l`` /
``clip_g``) during one ``encode_from_tokens`` call. CI tier: ``DiTCLIP``'s sub-encoders are shaped like ComfyUI's
``SDClipModel``; the real tier runs the same tests with ComfyUI's own tokenizers, and
``tests/real/test_pooled_batching_comfyui.py`` with ComfyUI's own Flux, SD3 and SDXL text encoders.
"""

from __future__ import annotations

import pytest
import torch

from conftest import load_pack
from dit_factory import DiTCLIP, make_model

load_pack()
from rece_comfyui.nodes.host import architectures, encoding  # noqa: E402
from rece_comfyui.nodes.rece import RECEEraseConcept  # noqa: E402

PROMPTS = ["nudity", "Van Gogh", "a photo of a cat", "", " ", "(nudity:1.3) on a beach", "a dog " * 50]
POOLED = ["flux", "sd3", "hunyuan_video", "stable_cascade", "hidream"]


def counted(clip) -> list[dict]:
    """Every ``encode_from_tokens`` call's tokens, in order."""
    calls, encode = [], clip.encode_from_tokens

    def wrapper(tokens, *a, **kw):
        calls.append(tokens)
        return encode(tokens, *a, **kw)

    clip.encode_from_tokens = wrapper
    return calls


@pytest.mark.parametrize("family", POOLED)
def test_batched_pooled_vectors_equal_one_at_a_time(family):
    """Every prompt's pooled vector from one batched call equals the one CLIPTextEncode gives it alone
    (weighted and two-chunk prompts included), and all of them took one call plus the first batch's check."""
    arch = architectures.by_name(family)
    clip = DiTCLIP(family)
    alone = [clip.encode_from_tokens(clip.tokenize(t if t.strip() else ""), return_pooled=True)[1] for t in PROMPTS]
    calls = counted(clip)
    got = encoding.pooled_many(clip, PROMPTS, arch)
    assert len(calls) == 2  # the batch, and its last prompt alone (checked once per CLIP)
    for a, b in zip(got, alone):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert len({tuple(v.flatten().tolist()) for v in got}) > 3  # the prompts' vectors differ
    encoding.pooled_many(clip, PROMPTS, arch)
    assert len(calls) == 3  # checked: the next batch goes in one call
    assert "encode" not in vars(clip.cond_stage_model.clip_g)  # the sub-encoders' own encode is back


def test_a_clip_without_comfyuis_sub_encoders_is_encoded_one_prompt_at_a_time():
    """A text encoder that is not laid out as ComfyUI's (no ``clip_l``): one call per prompt, same vectors."""
    arch = architectures.by_name("flux")
    clip = DiTCLIP("flux")
    expected = encoding.pooled_many(clip, PROMPTS[:4], arch)
    plain = DiTCLIP("flux")
    del plain.cond_stage_model.clip_l
    calls = counted(plain)
    got = encoding.pooled_many(plain, PROMPTS[:4], arch)
    assert len(calls) == 4
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, expected))


def test_a_clip_whose_batches_differ_is_encoded_one_prompt_at_a_time_from_then_on():
    """A custom sub-encoder whose batched pooled vectors are not each prompt's own: refused after the first
    batch's check, remembered for that CLIP, and the vectors are the one-at-a-time ones."""
    arch = architectures.by_name("flux")
    clip = DiTCLIP("flux")
    sub = clip.cond_stage_model.clip_l
    own = sub.encode

    def mixing(tokens):  # every prompt's pooled vector leaks into the others' in a batch
        z, pooled = own(tokens)
        return z, pooled + (pooled.mean(0, keepdim=True) - pooled[:1]) * (len(tokens) > 1)

    sub.encode = mixing
    alone = [clip.encode_from_tokens(clip.tokenize(t), return_pooled=True)[1] for t in PROMPTS[:3]]
    calls = counted(clip)
    got = encoding.pooled_many(clip, PROMPTS[:3], arch)
    assert all(torch.equal(a, b) for a, b in zip(got, alone))
    assert len(calls) == 2 + 3  # the batch and its check, then one prompt per call
    encoding.pooled_many(clip, PROMPTS[:3], arch)
    assert len(calls) == 5 + 3  # remembered: no batch tried again
    assert vars(sub)["encode"] is mixing  # its own instance attribute is back after each call


def test_a_cancel_check_comes_before_every_encoder_call():
    """Cancel is checked before each encoder call of the pooled pass (calls sized small here: 2 prompts)."""
    arch = architectures.by_name("flux")
    clip, log = DiTCLIP("flux"), []
    encode = clip.encode_from_tokens
    clip.encode_from_tokens = lambda tokens, *a, **kw: log.append("call") or encode(tokens, *a, **kw)
    ticks = iter(range(10**6))
    calls = encoding.EncoderCalls(seconds=1.0, first=2, check=lambda: log.append("check"),
                                  clock=lambda: float(next(ticks)))  # every call "takes" 1 s: 2 prompts per call
    got = encoding.pooled_many(clip, [f"concept {i}" for i in range(9)], arch, calls)
    assert len(got) == 9 and log.count("call") == 5 + 1  # 2+2+2+2+1, and the first batch's check
    assert all(log[i - 1] == "check" for i, x in enumerate(log) if x == "call")

    class Cancelled(Exception):
        pass

    def cancel_on_second():
        log.append("check")
        if log.count("check") == 2:
            raise Cancelled

    log.clear()
    with pytest.raises(Cancelled):
        encoding.pooled_many(clip := DiTCLIP("flux"), [f"concept {i}" for i in range(9)], arch,
                             encoding.EncoderCalls(first=2, check=cancel_on_second))
    assert "encode" not in vars(clip.cond_stage_model.clip_l)


def test_a_hundred_flux_concepts_take_at_most_ten_encoder_calls(monkeypatch):
    """Issue #21's goal: RECE Erase Concept with 100 concepts on Flux (T5 rows and pooled CLIP-L) in at most 10
    encoder calls on a fresh CLIP (its batches checked once), rows and pooled vectors together."""
    from rece_comfyui.nodes.host import encoding

    class Instant(encoding.EncoderCalls):  # an encoder that takes no time: the count does not depend on the load
        def __init__(self, **kw):
            super().__init__(clock=lambda: 0.0, **kw)

    monkeypatch.setattr(encoding, "EncoderCalls", Instant)
    model, clip = make_model("flux"), DiTCLIP("flux")
    calls = counted(clip)
    names = [f"concept number {i}" for i in range(100)]
    out, erasure, report = RECEEraseConcept().erase(model, clip, "\n".join(names), "", "", "custom", 1, 0.1, 0.1,
                                                    1.0, 0.1)["result"]
    assert "pooled" in erasure.spaces and erasure.spaces["pooled"].concepts == tuple(names)
    pooled_only = [t for t in calls if len(t["t5xxl"][0]) == 1]
    assert len(calls) <= 10 and len(pooled_only) >= 1, (len(calls), len(pooled_only))


def test_the_pooled_erasure_is_the_same_as_from_one_prompt_at_a_time():
    """The batched pooled pass gives the pooled transform the one-at-a-time pass gives."""
    model = make_model("flux")
    names = "nudity\nVan Gogh\na red car"
    fast = RECEEraseConcept().erase(model, DiTCLIP("flux"), names, "", "a photo of a cat", "custom", 1, 0.1, 0.1,
                                    1.0, 0.1)["result"][1]
    plain = DiTCLIP("flux")
    del plain.cond_stage_model.clip_l
    slow = RECEEraseConcept().erase(model, plain, names, "", "a photo of a cat", "custom", 1, 0.1, 0.1,
                                    1.0, 0.1)["result"][1]
    a, b = fast.spaces["pooled"].transform.dense().double(), slow.spaces["pooled"].transform.dense().double()
    assert float((a - b).norm() / b.norm()) < 1e-5
    assert float((a - torch.eye(a.shape[0], dtype=a.dtype)).norm()) > 1e-3  # it is an edit
