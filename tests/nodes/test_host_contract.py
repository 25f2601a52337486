"""The erasure adapter under what the host does with adapters: rebuild, bypass, quantized weights.

Runs on every tier; the parts that need a current host's own machinery (bypass hook, quantized
tensors) run where the host has it: the ``RECE_HOST=current`` stand-in, or a current ComfyUI.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import load_pack
from factory import FakeCLIP, effective_weights, make_model

load_pack()
from rece_comfyui.nodes.host import weights  # noqa: E402
from rece_comfyui.nodes.rece import ApplyErasedWeights, RECEDeriveEmbedding, RECEEraseConcept  # noqa: E402
from rece_comfyui.nodes.patch import ErasurePatch, is_erasure_patch  # noqa: E402
from rece_comfyui.rece_core.toy import layer_names  # noqa: E402
from measure import rel  # noqa: E402

DEFAULTS = dict(concepts="nudity", guide="", preserve="", concept_kind="nudity", rounds=2, reg=0.1, lamb=0.1,
                erase_scale=1.0, preserve_scale=0.1)
KEYS = [k for k, _ in layer_names("tiny")]
has_bypass_hook = importlib.util.find_spec("comfy.weight_adapter.bypass") is not None
has_quantized = importlib.util.find_spec("comfy.quant_ops") is not None


def erased(model=None, **kw):
    model = model or make_model()
    out = RECEEraseConcept().erase(model, FakeCLIP(), **(DEFAULTS | kw))["result"]
    return model, out[0], out[1]


def adapter_of(model, key=KEYS[0]):
    return next(p for p in model.patches[key] if is_erasure_patch(p[1]))


@pytest.mark.parametrize("concepts", ["nudity", "nudity\nblood\na castle"])  # low rank; dense (down = None)
def test_rebuilt_adapter_computes_the_same_weight(concepts):
    model, out, erasure = erased(concepts=concepts)
    strength, patch = adapter_of(out)[:2]
    assert (patch.weights[1] is None) == erasure.transform.is_dense
    # ComfyUI's dynamic-VRAM rebuild: the same class from (loaded_keys, weights) with re-homed tensors
    rebuilt = type(patch)(patch.loaded_keys, tuple(w.clone() if w is not None else None for w in patch.weights))
    assert patch.calculate_shape(KEYS[0]) is None and rebuilt.calculate_shape(KEYS[0]) is None
    for key, w in effective_weights(model, KEYS).items():
        a = patch.calculate_weight(w.clone(), key, strength, 1.0, None, None)
        b = rebuilt.calculate_weight(w.clone(), key, strength, 1.0, None, None)
        assert torch.equal(a, b)
    # and the model as sampled (rebuilt on a current host) carries W P
    after, base = effective_weights(out, KEYS), effective_weights(model, KEYS)
    p = erasure.transform.dense().double()
    assert max(rel(after[k], base[k].double() @ p.to(base[k].device)) for k in KEYS) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_patch_arithmetic_is_float32_with_one_cast_back(dtype):
    """Low-VRAM streaming hands the weight over in its own dtype; the error stays at storage rounding."""
    model, out, erasure = erased(make_model(dtype=dtype), erase_scale=5.0)
    strength, patch = adapter_of(out)[:2]
    w = model.model.state_dict()[KEYS[0]]
    got = patch.calculate_weight(w.clone(), KEYS[0], strength, 1.0, None, None, intermediate_dtype=dtype)
    exact = erasure.transform.to(device=w.device).apply_weight(w.double())
    assert got.dtype == dtype
    rounding = rel(exact.to(dtype), exact) if dtype != torch.float32 else 1e-7
    assert rel(got, exact) <= 1.5 * rounding


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
@torch.no_grad()
def test_bypass_forward_is_the_merged_layer(strength):
    model, out, _ = erased(concepts="nudity\nblood")
    patch = adapter_of(out)[1]
    merged = effective_weights(out, KEYS)
    base = effective_weights(model, KEYS)
    g = torch.Generator().manual_seed(3)
    for key in KEYS:
        w = base[key]
        layer = torch.nn.Linear(w.shape[1], w.shape[0]).to(w.device)
        layer.weight.data.copy_(w)
        x = torch.randn(2, 7, w.shape[1], generator=g).to(w.device)
        patch.multiplier = strength
        got = patch.bypass_forward(layer.forward, x)
        want_w = w + strength * (merged[key] - w)
        want = torch.nn.functional.linear(x, want_w, layer.bias)
        assert rel(got, want) <= 1e-4
    assert torch.equal(layer.weight, base[KEYS[-1]])  # the layer's weight was never touched


@pytest.mark.skipif(not has_bypass_hook, reason="host has no bypass mode (ComfyUI 0.3.64)")
@torch.no_grad()
def test_host_bypass_hook_runs_the_erasure_exactly():
    from comfy.weight_adapter.bypass import BypassForwardHook

    model, out, _ = erased()
    strength, patch = adapter_of(out)[:2]
    base, merged = effective_weights(model, KEYS), effective_weights(out, KEYS)
    w = base[KEYS[0]]
    layer = torch.nn.Linear(w.shape[1], w.shape[0]).to(w.device)
    layer.weight.data.copy_(w)
    hook = BypassForwardHook(layer, patch, multiplier=strength)
    hook.inject()
    try:
        x = torch.randn(3, w.shape[1]).to(w.device)
        got = layer(x)
    finally:
        hook.eject()
    assert rel(got, torch.nn.functional.linear(x, merged[KEYS[0]], layer.bias)) <= 1e-4
    assert torch.equal(layer.weight, w)


@pytest.mark.skipif(not has_quantized, reason="host has no quantized tensors (ComfyUI 0.3.64)")
def test_quantized_weights_are_read_dequantized_and_patched_exactly():
    from comfy.quant_ops import QuantizedTensor

    quant = make_model(storage=lambda w: QuantizedTensor.from_float(w, "TensorCoreFP8Layout"))
    plain = make_model()
    # what the quantized model really computes with: its dequantized weights
    for key in KEYS:
        plain.model.state_dict()[key].copy_(quant.model.state_dict()[key].dequantize())
    _, out_q, erasure_q = erased(quant)
    _, out_p, erasure_p = erased(plain)
    assert torch.allclose(erasure_q.transform.dense(), erasure_p.transform.dense(), atol=1e-5)
    after = effective_weights(out_q, KEYS)
    base = effective_weights(plain, KEYS)
    p = erasure_q.transform.dense().double()
    assert max(rel(after[k], base[k].double() @ p.to(base[k].device)) for k in KEYS) < 1e-5
    assert all(isinstance(quant.model.state_dict()[k], QuantizedTensor) for k in KEYS)  # storage untouched


class _PackedStorage(torch.Tensor):
    """Packed bytes with a GGUF type but no ComfyUI-GGUF to dequantize them (nor the gguf package here)."""

    tensor_type = "Q4_K"
    tensor_shape = None


@pytest.mark.parametrize("storage, message", [
    (lambda w: w.to(torch.uint8).as_subclass(_PackedStorage), "GGUF Q4_K"),
    (lambda w: w.to(torch.int8), "torch.int8 storage"),
])
def test_unreadable_storage_is_refused_by_name_before_anything_is_patched(storage, message):
    model = make_model(storage=storage)
    with pytest.raises(ValueError, match=message):
        RECEEraseConcept().erase(model, FakeCLIP(), **DEFAULTS)
    _, _, erasure = erased()
    with pytest.raises(ValueError, match=message):
        ApplyErasedWeights().apply(model, erasure, 1.0)
    assert model.patches == {}


def test_derive_finds_erasures_from_rebuilt_adapters():
    """Derive Embedding reads the erasures from the adapters' weights, not from a Python object."""
    model, out, erasure = erased()
    clone = out.clone()
    for key in KEYS:  # what a host does to every adapter: rebuild it from its weights
        clone.patches[key] = [(s, type(v)(v.loaded_keys, tuple(w.clone() if w is not None else None
                                                           for w in v.weights)), *rest)
                              if is_erasure_patch(v) else (s, v, *rest) for s, v, *rest in clone.patches[key]]
    found = weights.applied_erasures(clone)
    assert len(found) == 1 and found[0][1] == 1.0
    assert torch.allclose(found[0][0].dense(), erasure.transform.dense())
    a = RECEDeriveEmbedding().derive(out, FakeCLIP(), "nudity", 0.1)["result"]
    b = RECEDeriveEmbedding().derive(clone, FakeCLIP(), "nudity", 0.1)["result"]
    assert a[1] == pytest.approx(b[1], abs=1e-6)


def test_adapter_state_is_only_its_weights():
    _, out, erasure = erased()
    patch = adapter_of(out)[1]
    assert isinstance(patch, ErasurePatch)
    assert set(vars(patch)) <= {"loaded_keys", "weights", "multiplier"}
    assert len(patch.weights) == 2 and patch.weights[0].shape == (erasure.dim, erasure.rank)
