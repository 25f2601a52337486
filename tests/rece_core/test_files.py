"""Erasure files: exact round trip, and every bad file refused with a message naming it and the problem."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from rece_core import rece
from rece_core.files import fingerprint, load_erasure, lora_factors, lora_key, save_erasure
from rece_core.toy import ToyTextEncoder, cross_attention_weights, layer_names

W = cross_attention_weights("tiny", seed=3)


@pytest.fixture(scope="module")
def erasure():
    e = rece(W, ToyTextEncoder(64, seed=3), ["nudity", "blood"], "", ["a cat"], epochs=2)
    return dataclasses.replace(e, extra={"fingerprint": fingerprint(W), "kind": "nudity"})


def test_round_trip_is_exact(erasure, tmp_path):
    path = str(tmp_path / "e.safetensors")
    save_erasure(erasure, path, pack_version="test")
    back = load_erasure(path)
    assert torch.equal(back.transform.up, erasure.transform.up)
    assert torch.equal(back.transform.down, erasure.transform.down)
    assert back.concepts == erasure.concepts and back.preserve == erasure.preserve
    assert back.rounds == erasure.rounds and back.reg == erasure.reg and back.epochs == erasure.epochs
    assert back.extra["fingerprint"] == fingerprint(W) and back.extra["file"] == "e.safetensors"
    after, expected = back.apply(W), erasure.apply(W)
    assert all(torch.equal(after[k], expected[k]) for k in W)


def test_fingerprint_ignores_dtype_but_not_a_fine_tune():
    assert fingerprint(W) == fingerprint({k: w.half() for k, w in W.items()})
    tuned = {k: w + 0.01 for k, w in W.items()}
    assert fingerprint(tuned) != fingerprint(W)


def _good(erasure, tmp_path):
    path = tmp_path / "good.safetensors"
    save_erasure(erasure, str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def _write(tmp_path, tensors, meta, name="bad.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=meta)
    return str(path)


@pytest.mark.parametrize("mutate, message", [
    (lambda t, m: (t, {**m, "format": "lora"}), "not a RECE erasure file"),
    (lambda t, m: (t, {**m, "format_version": "99"}), "unknown erasure format version '99'"),
    (lambda t, m: (t, {**m, "rece": "{not json"}), "not valid JSON"),
    (lambda t, m: ({"transform.up": t["transform.up"]}, m), r"missing \['transform.down'\]"),
    (lambda t, m: ({**t, "extra": torch.zeros(1)}, m), r"unexpected \['extra'\]"),
    (lambda t, m: ({"transform.up": t["transform.up"], "transform.dn": t["transform.down"]}, m), "missing"),
    (lambda t, m: ({**t, "transform.up": t["transform.up"].half()}, m), "must be float32"),
    (lambda t, m: ({**t, "transform.up": t["transform.up"][:, :-1].contiguous()}, m), "has shape"),
    (lambda t, m: ({**t, "transform.up": t["transform.up"].clone().fill_(float("nan"))}, m), "NaN or Inf"),
    (lambda t, m: (t, {**m, "rece": json.dumps({**json.loads(m["rece"]), "dim": "64"})}), "'dim'"),
    (lambda t, m: (t, {**m, "rece": json.dumps({**json.loads(m["rece"]), "lamb": -1})}), "non-negative"),
    (lambda t, m: (t, {**m, "rece": json.dumps({**json.loads(m["rece"]), "rounds": [{"x": 1}]})}), "'rounds'"),
])
def test_bad_files_are_refused(erasure, tmp_path, mutate, message):
    tensors, meta = _good(erasure, tmp_path)
    path = _write(tmp_path, *mutate(tensors, meta))
    with pytest.raises(ValueError, match=message) as info:
        load_erasure(path)
    assert "bad.safetensors" in str(info.value)


def test_malformed_and_huge_headers_and_pickles_refused(tmp_path):
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ValueError, match="huge.safetensors: safetensors header .* absurdly large"):
        load_erasure(str(huge))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(struct.pack("<Q", 5) + b"{abc}" + b"\0" * 8)
    with pytest.raises(ValueError, match="broken.safetensors: malformed safetensors header"):
        load_erasure(str(broken))
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(ValueError, match="too short"):
        load_erasure(str(short))
    pickle_file = tmp_path / "e.pt"
    torch.save({"transform.up": torch.zeros(1)}, pickle_file)
    with pytest.raises(ValueError, match="only .safetensors"):
        load_erasure(str(pickle_file))


def test_truncated_data_refused(erasure, tmp_path):
    path = tmp_path / "cut.safetensors"
    save_erasure(erasure, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-16])
    with pytest.raises(ValueError, match="cut.safetensors: corrupt tensor data"):
        load_erasure(str(path))


def test_lora_keys_follow_kohya_diffusers_names():
    assert lora_key("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert lora_key("diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_v.weight") == \
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_v"
    assert lora_key("diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight") == \
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    assert lora_key("diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight") == \
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v"
    assert len({lora_key(k) for k, _ in layer_names("sdxl")}) == len(layer_names("sdxl"))


def test_lora_factors_exact_and_truncated(erasure):
    w = next(iter(W.values()))
    up, down, err = lora_factors(erasure, w)
    exact = erasure.apply({"w": w})["w"] - w
    assert err == 0.0 and torch.allclose(up @ down, exact, atol=1e-6)
    up2, down2, err2 = lora_factors(erasure, w, rank=4)
    assert up2.shape[1] == 4 and 0 < err2 < 1
    measured = float((up2 @ down2 - exact).norm() / exact.norm())
    assert abs(measured - err2) < 1e-4
