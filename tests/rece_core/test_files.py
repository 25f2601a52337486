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
    assert_refused(erasure, tmp_path, mutate, message)


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
    assert err < 1e-6 and torch.allclose(up @ down, exact, atol=1e-6)
    up2, down2, err2 = lora_factors(erasure, w, rank=4)
    assert up2.shape[1] == 4 and 0 < err2 < 1
    measured = float((up2 @ down2 - exact).norm() / exact.norm())
    assert abs(measured - err2) < 1e-4


def _rece_meta(meta, **fields):
    return {**meta, "rece": json.dumps({**json.loads(meta["rece"]), **fields})}


def _raw_header_file(tmp_path, tensors, header_edit, name="bad.safetensors"):
    """A file whose safetensors header JSON is edited by ``header_edit(header_dict) -> str``."""
    good = tmp_path / "src.safetensors"
    save_file(tensors[0], str(good), metadata=tensors[1])
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    raw = header_edit(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return str(path)


@pytest.mark.parametrize("mutate, message", [
    (lambda t, m: (t, _rece_meta(m, extra=[1, 2])), "'extra' is not a JSON object"),
    (lambda t, m: (t, _rece_meta(m, seconds="soon")), "'seconds' is not a finite number"),
    (lambda t, m: (t, _rece_meta(m, lamb=10**400)), "'lamb' is not a finite number"),
    (lambda t, m: (t, _rece_meta(m, concepts=[{"a": 1}])), "'concepts' must be a list of strings"),
    (lambda t, m: (t, _rece_meta(m, epochs=-1)), "'epochs' is negative"),
    (lambda t, m: (t, {**m, "rece": m["rece"].replace('"reg": 0.1', '"reg": NaN')}), "NaN"),
    (lambda t, m: (t, {**m, "rece": "[" * 200_000 + "]" * 200_000}), "nested absurdly deep"),
    (lambda t, m: ({"transform.up": t["transform.up"][:, :0].contiguous(),
                    "transform.down": t["transform.down"][:0].contiguous()}, _rece_meta(m, rank=0)), "rank 0"),
    (lambda t, m: ({k: v * 1e30 for k, v in t.items()}, m), "absurdly large"),
    (lambda t, m: ({**t, "transform.up": t["transform.up"] * 1e12}, m), "absurdly large"),
])
def test_more_bad_files_are_refused_naming_the_file(erasure, tmp_path, mutate, message):
    assert_refused(erasure, tmp_path, mutate, message)


def assert_refused(erasure, tmp_path, mutate, message) -> None:
    """The file made by ``mutate(tensors, metadata)`` of a good one is refused, naming it and ``message``."""
    tensors, meta = _good(erasure, tmp_path)
    path = _write(tmp_path, *mutate(tensors, meta))
    with pytest.raises(ValueError, match=message) as info:
        load_erasure(path)
    assert "bad.safetensors" in str(info.value)


@pytest.mark.parametrize("edit, message", [
    (lambda h: json.dumps({**h, "transform.up": [1, 2]}), "entry 'transform.up' is not a tensor"),
    (lambda h: json.dumps({**h, "transform.up": {"dtype": "F32"}}), "is not a tensor"),
    (lambda h: json.dumps({**h, "__metadata__": [1]}), "__metadata__ is not an object"),
    (lambda h: json.dumps({**h, "__metadata__": {**h["__metadata__"], "format": 5}}), "__metadata__"),
    (lambda h: "[" * 200_000 + "]" * 200_000, "nested absurdly deep"),
    (lambda h: json.dumps(h)[:-1] + ', "x": NaN}', "NaN"),
])
def test_malformed_header_entries_refused_naming_the_file(erasure, tmp_path, edit, message):
    path = _raw_header_file(tmp_path, _good(erasure, tmp_path), edit)
    with pytest.raises(ValueError, match=message) as info:
        load_erasure(path)
    assert "bad.safetensors" in str(info.value)


def test_fuzzed_headers_only_ever_raise_a_value_error_naming_the_file(erasure, tmp_path):
    """Many mutations of a good file's header (values swapped for other JSON types, fields dropped,
    bytes flipped): every outcome is a clean load or a ValueError naming the file."""
    import random

    tensors, meta = _good(erasure, tmp_path)
    rng = random.Random(13)
    junk = [None, True, -1, 0, 1.5, 10**30, "x", "", [], [1, 2], {}, {"a": [1]}, [[[[]]]], "NaN", -1e308]
    info = json.loads(meta["rece"])

    def header_edits(h):
        key = rng.choice(list(h))
        value = h[key]
        choice = rng.randrange(4)
        if choice == 0:
            h[key] = rng.choice(junk)
        elif choice == 1 and isinstance(value, dict) and value:
            value[rng.choice(list(value))] = rng.choice(junk)
        elif choice == 2 and isinstance(value, dict) and value:
            del value[rng.choice(list(value))]
        else:
            h.pop(key)
        return json.dumps(h)

    outcomes = {"loaded": 0, "refused": 0}
    for i in range(150):
        name = f"fuzz{i}.safetensors"
        kind = i % 3
        if kind == 0:  # the 'rece' metadata JSON
            field = rng.choice(list(info))
            mutated = dict(info)
            mutated[field] = rng.choice(junk) if rng.random() < 0.8 else mutated.pop(field, None)
            path = _write(tmp_path, tensors, {**meta, "rece": json.dumps(mutated)}, name)
        elif kind == 1:  # the safetensors header's structure
            path = _raw_header_file(tmp_path, (tensors, meta), header_edits, name)
        else:  # flipped bytes anywhere in the header
            src = tmp_path / "src.safetensors"
            save_file(tensors, str(src), metadata=meta)
            data = bytearray(src.read_bytes())
            (n,) = struct.unpack("<Q", data[:8])
            for _ in range(rng.randrange(1, 4)):
                data[8 + rng.randrange(n)] = rng.randrange(256)
            (tmp_path / name).write_bytes(bytes(data))
            path = str(tmp_path / name)
        try:
            load_erasure(path)
            outcomes["loaded"] += 1
        except ValueError as exc:
            assert name in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100


def test_saving_a_rank_zero_erasure_is_refused(erasure, tmp_path):
    from rece_core import LowRankTransform

    empty = dataclasses.replace(erasure, transform=LowRankTransform.identity(64, dtype=torch.float32))
    with pytest.raises(ValueError, match="rank 0"):
        save_erasure(empty, str(tmp_path / "e.safetensors"))


@pytest.mark.parametrize("erase_scale", [1e4, 1e5])
def test_fp16_lora_factors_are_balanced_finite_and_their_error_measured(erase_scale):
    e = rece(W, ToyTextEncoder(64, seed=3), ["nudity"], "", [], erase_scale=erase_scale, epochs=1)
    for w in W.values():
        exact = (w.double() @ e.transform.up.double()) @ e.transform.down.double()
        up, down, err = lora_factors(e, w, 0, torch.float16)
        assert up.dtype == down.dtype == torch.float16
        assert torch.isfinite(up).all() and torch.isfinite(down).all()
        measured = float((up.double() @ down.double() - exact).norm() / exact.norm())
        assert abs(measured - err) <= 1e-3 * measured + 1e-9  # the error reported is the error written
        assert 1e-5 < err < 1e-2  # fp16 rounding: not exact, but not broken either
        # balanced: each component's norm sits in both factors, not all in up
        assert float(up.double().norm(dim=0).max()) < 1e3


def test_fp16_lora_factors_that_overflow_are_refused():
    e = rece(W, ToyTextEncoder(64, seed=3), ["nudity"], "", [], epochs=0)
    w = next(iter(W.values())) * 1e12  # a delta of ~1e12: no balancing fits it in float16
    with pytest.raises(ValueError, match="overflow float16; export with precision fp32"):
        lora_factors(e, w, 0, torch.float16)
    up, down, err = lora_factors(e, w, 0, torch.float32)
    assert torch.isfinite(up).all() and err < 1e-6


def test_llama_layer_spaces_round_trip_and_unknown_spaces_are_refused(erasure, tmp_path):
    """HiDream's Llama-3 layer spaces (``llama3.<layer>``) are written and read back exactly, next to the pooled
    space; a space name this pack does not know is refused on save and, in a file, on load, naming it."""
    g = torch.Generator().manual_seed(3)
    space = lambda d, r: dataclasses.replace(  # noqa: E731
        erasure, transform=dataclasses.replace(erasure.transform, up=torch.randn(d, r, generator=g) * 0.01,
                                               down=torch.randn(r, d, generator=g) * 0.01))
    spaces = {"pooled": space(8, 2), "llama3.0": space(erasure.dim, 3), "llama3.31": space(erasure.dim, 1)}
    path = str(tmp_path / "llama.safetensors")
    save_erasure(dataclasses.replace(erasure, spaces=spaces), path)
    loaded = load_erasure(path)
    assert set(loaded.spaces) == set(spaces)
    for name, e in spaces.items():
        assert torch.equal(loaded.spaces[name].transform.up, e.transform.up)
        assert torch.equal(loaded.spaces[name].transform.down, e.transform.down)
    with pytest.raises(ValueError, match="unknown text space 'llama3.x'"):
        save_erasure(dataclasses.replace(erasure, spaces={"llama3.x": space(8, 1)}), str(tmp_path / "x.safetensors"))
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8:8 + n].decode().replace("llama3.31", "llama4.31")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header.encode())) + header.encode() + raw[8 + n:])
    with pytest.raises(ValueError, match=r"bad.safetensors: metadata field 'spaces' must map text spaces \(pooled, "
                                         r"llama3.<layer>\)"):
        load_erasure(str(bad))
