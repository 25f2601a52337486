"""Erasing on quantized weights: GGUF files as ComfyUI-GGUF loads them (CI stand-in ``gguf_standin``),
current ComfyUI's ``QuantizedTensor`` (comfy-kitchen's, ``RECE_HOST=current``), and clear refusals.

A GGUF / quantized model must give the erasure the same float model gives from the dequantized
weights, read each reader once, keep the text width of the logical matrix, and stay bit-identical.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import COMFYUI_PATH, load_pack
from factory import FakeCLIP, effective_weights, make_model
import gguf_standin
from gguf_standin import make_gguf_model, sampled_weight

load_pack()
from rece_comfyui.nodes.files import ExportErasureAsLoRA, LoadErasedWeights, SaveErasedWeights, resolve  # noqa: E402
from rece_comfyui.nodes.host import weights  # noqa: E402
from rece_comfyui.nodes.patch import ErasurePatch  # noqa: E402
from rece_comfyui.nodes.rece import ApplyErasedWeights, RECEDeriveEmbedding, RECEEraseConcept  # noqa: E402
from rece_comfyui.rece_core.toy import layer_names  # noqa: E402
from measure import rel  # noqa: E402

DEFAULTS = dict(concepts="nudity", guide="", preserve="a castle", concept_kind="nudity", rounds=1, reg=0.1,
                lamb=0.1, erase_scale=1.0, preserve_scale=0.1)
KEYS = [k for k, _ in layer_names("tiny")]
MIXED = {k: ("BF16" if i % 2 else "Q8_0") for i, k in enumerate(KEYS)}  # readers partly kept in BF16
LAYOUTS = {"Q8_0": "Q8_0", "F16": "F16", "F32": "F32", "BF16": "BF16", "mixed": MIXED}
has_kitchen = importlib.util.find_spec("comfy_kitchen") is not None


def erase(model, **kw):
    out = RECEEraseConcept().erase(model, FakeCLIP(), **(DEFAULTS | kw))["result"]
    return out[0], out[1]


def float_model(dequantized: dict[str, torch.Tensor]):
    """The same tiny model as plain float32 weights: the GGUF file's dequantized values."""
    model = make_model()
    for key, w in dequantized.items():
        model.model.state_dict()[key].copy_(w)
    return model


def stored_bytes(model) -> dict[str, torch.Tensor]:
    """Every stored tensor's bytes (GGUF: the packed blocks), copied."""
    return {n: p.as_subclass(torch.Tensor).detach().clone() for n, p in model.model.named_parameters()}


# ---------------------------------------------------------------- GGUF (ComfyUI-GGUF's GGMLTensor)

@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gguf_erase_equals_the_float_erasure_and_the_file_stays_untouched(layout):
    model, dequantized = make_gguf_model(LAYOUTS[layout])
    before = stored_bytes(model)
    out, erasure = erase(model)
    _, float_erasure = erase(float_model(dequantized))
    # the same edit as on the dequantized float model (only float32 summation order differs)
    assert rel(erasure.transform.dense(), float_erasure.transform.dense()) < 1e-5
    p = erasure.transform.dense().double()
    for key in KEYS:  # what ComfyUI-GGUF samples with: its dequantized weight, patched by our adapter
        want = dequantized[key].double() @ p
        got = sampled_weight(out, key)
        assert rel(got, want) < (2e-3 if LAYOUTS[layout] == "F16" or layout == "F16" else 1e-5), key
        assert torch.equal(sampled_weight(model, key), sampled_weight(model, key))
    after = stored_bytes(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # nothing written into the GGUF tensors
    assert model.patches == {} and all(not getattr(p, "patches", []) for p in model.model.parameters())
    assert erasure.dim == 64 and erasure.extra["fingerprint"] == weights.base_fingerprint(model, KEYS)


def test_gguf_width_is_the_logical_one_and_each_reader_is_dequantized_once():
    model, _ = make_gguf_model("Q8_0")
    packed = weights.stored_weight(model, KEYS[0])[0]
    assert packed.size(1) == 68 and weights.text_width(model, KEYS) == 64  # 2 blocks of 34 bytes; 64 wide
    assert any(k.endswith(".temp.weight") for k in model.model.state_dict())  # the key that used to crash
    gguf_standin.DEQUANTIZE_CALLS.clear()
    erase(model, rounds=2)
    full = [s for s in gguf_standin.DEQUANTIZE_CALLS if s[0] > 3]  # fingerprints dequantize 3 rows a reader
    assert sorted(full) == sorted(tuple(weights.logical_shape(weights.stored_weight(model, k)[0])) for k in KEYS)


def test_adapter_handed_a_ggml_tensor_writes_through_it():
    """ComfyUI-GGUF patches an F16/F32 weight through a float32 GGMLTensor copy (copy_ that only warns)."""
    _, erasure = erase(make_gguf_model("F32")[0])
    w = torch.randn(32, 64)
    held = gguf_standin.gguf_tensor(w, "F32").to(torch.float32, copy=True)
    patch = ErasurePatch.of(erasure.transform)
    got = patch.calculate_weight(held, KEYS[0], 1.0, 1.0, None, None)
    assert type(got) is torch.Tensor  # the GGMLTensor class does not travel on
    assert rel(got, w.double() @ erasure.transform.dense().double()) < 1e-6


def test_derive_apply_save_load_export_on_gguf(models_dir):
    model, dequantized = make_gguf_model(MIXED)
    out, erasure = erase(model)
    reach = RECEDeriveEmbedding().derive(out, FakeCLIP(), "nudity", 0.1)["result"][1]
    float_out, float_erasure = erase(float_model(dequantized))
    float_reach = RECEDeriveEmbedding().derive(float_out, FakeCLIP(), "nudity", 0.1)["result"][1]
    assert reach == pytest.approx(float_reach, abs=1e-4)
    SaveErasedWeights().save(erasure, "rece/gguf")
    loaded = LoadErasedWeights().load("rece/gguf_00001.safetensors")["result"][0]
    applied, report = ApplyErasedWeights().apply(model, loaded, 1.0)["result"]
    assert "another base model" not in report
    p = erasure.transform.dense().double()
    for key in KEYS:
        assert rel(sampled_weight(applied, key), dequantized[key].double() @ p) < 1e-5
    ExportErasureAsLoRA().export(model, erasure, "rece/gguf_lora", 0, "fp32")
    from safetensors.torch import load_file

    lora = load_file(resolve("loras", "rece/gguf_lora_00001.safetensors"))
    float_model_ = float_model(dequantized)
    lora_model = float_model_.clone()
    from rece_comfyui.nodes.files import lora_key

    for key in KEYS:
        name = lora_key(key, "unet")
        lora_model.add_patches({key: ("diff", (lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"],))})
    via_lora = effective_weights(lora_model, KEYS)
    for key in KEYS:
        assert rel(via_lora[key], dequantized[key].double() @ p) < 1e-5


def test_a_weight_patched_in_place_is_read_from_comfyuis_backup():
    """While ComfyUI has a patched clone loaded, the shared layer holds the patched weight and the
    original sits in ``model.backup``: reading must give the original (as get_key_patches would)."""
    import collections

    model = make_model()
    key = KEYS[0]
    original = model.model.state_dict()[key].clone()
    layer = comfy_get(model.model, key.rsplit(".", 1)[0])
    model.backup[key] = collections.namedtuple("Dimension", ["weight", "inplace_update"])(original, False)
    layer.weight = torch.nn.Parameter(original + 1.0, requires_grad=False)
    assert torch.equal(weights.effective_weight(model, key, torch.device("cpu")), original)
    assert weights.base_fingerprint(model, KEYS) == weights.base_fingerprint(make_model(), KEYS)


# ---------------------------------------------------------------- refusals

class Params4bit(torch.Tensor):
    """bitsandbytes' NF4/FP4 parameter: packed uint8 bytes and a ``quant_state``."""

    quant_state = object()


class Int8Params(torch.Tensor):
    """bitsandbytes' LLM.int8 parameter: int8 rows and their scales ``SCB``."""

    SCB = None


@pytest.mark.parametrize("storage, message", [
    (lambda w: w.to(torch.uint8).reshape(-1, 1).as_subclass(Params4bit), "bitsandbytes NF4/FP4"),
    (lambda w: w.to(torch.int8).as_subclass(Int8Params), "bitsandbytes LLM.int8"),
    (lambda w: w.to(torch.int8), "torch.int8 storage"),
    (lambda w: gguf_standin.gguf_tensor(torch.zeros(w.shape[0], 256), "IQ1_M"), "GGUF IQ1_M"),
])
def test_unreadable_storage_is_refused_by_name_before_anything_is_patched(storage, message):
    model = make_model(storage=storage)
    _, erasure = erase(make_model())
    for run in (lambda: erase(model), lambda: ApplyErasedWeights().apply(model, erasure, 1.0),
                lambda: RECEDeriveEmbedding().derive(model, FakeCLIP(), "nudity", 0.1),
                lambda: weights.gram_of(model, KEYS, torch.device("cpu"))):
        with pytest.raises(ValueError, match=message) as exc:
            run()
        assert "instead" in str(exc.value)
    assert model.patches == {}


def test_a_weight_never_loaded_is_refused():
    model = make_model(storage=lambda w: w.to("meta"))
    with pytest.raises(ValueError, match="never loaded"):
        erase(model)


# ---------------------------------------------------------------- current ComfyUI's QuantizedTensor

def quantized_model(layouts: dict[str, str] | str):
    """The tiny model with readers held as current ComfyUI's quantized Linear holds them: a Parameter
    around a ``QuantizedTensor``, and a state dict of the packed storage (``weight``, ``weight_scale``...,
    ``comfy_quant``), as ``MixedPrecisionOps.Linear.state_dict`` writes it."""
    from comfy.quant_ops import QuantizedTensor

    plain = make_model()
    layouts = layouts if isinstance(layouts, dict) else {k: layouts for k in KEYS}
    model = make_model()
    for key in KEYS:
        path, _ = key.rsplit(".", 1)
        parent_path, leaf = path.rsplit(".", 1)
        parent = comfy_get(model.model, parent_path)
        w = plain.model.state_dict()[key]
        layout = layouts[key]
        weight = w if layout is None else QuantizedTensor.from_float(w, layout)
        parent._modules[leaf] = QuantizedLinear(weight)
    return model


def comfy_get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class QuantizedLinear(torch.nn.Module):
    """A linear layer whose ``state_dict`` writes quantized weights as packed storage (current ComfyUI)."""

    def __init__(self, weight) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def state_dict(self, *args, destination=None, prefix="", **kwargs):
        sd = destination if destination is not None else {}
        if hasattr(self.weight, "state_dict") and callable(self.weight.state_dict):
            sd.update(self.weight.state_dict(f"{prefix}weight"))
            sd[f"{prefix}comfy_quant"] = torch.tensor(list(b'{"format": "x"}'), dtype=torch.uint8)
        else:
            sd[f"{prefix}weight"] = self.weight
        return sd

    def convert_weight(self, weight, inplace=False, **kwargs):
        """Current ComfyUI's: a QuantizedTensor dequantized, anything else as it is."""
        return weight.dequantize() if hasattr(weight, "dequantize") else weight


def patched(model, key: str) -> torch.Tensor:
    """The weight as a current host samples with it: dequantized, then the (rebuilt) patches applied."""
    import comfy.lora
    from factory import prepared_patches

    w = comfy_get(model.model, key)
    w = (w.dequantize() if hasattr(w, "dequantize") else w).float().clone()
    return comfy.lora.calculate_weight(prepared_patches(model, key), w, key, intermediate_dtype=torch.float32)


KITCHEN_LAYOUTS = ["TensorCoreFP8Layout", "TensorWiseINT8Layout", "TensorCoreNVFP4Layout"]


@pytest.mark.skipif(not importlib.util.find_spec("comfy.quant_ops"), reason="host has no QuantizedTensor (0.3.64)")
@pytest.mark.skipif(not has_kitchen and not COMFYUI_PATH, reason="comfy-kitchen not installed (scripts/test.sh installs it)")
@pytest.mark.parametrize("layout", KITCHEN_LAYOUTS + ["mixed"])
def test_quantized_tensor_erase_equals_the_float_erasure(layout):
    layouts = {k: (None if i % 2 else "TensorCoreNVFP4Layout") for i, k in enumerate(KEYS)} if layout == "mixed" \
        else layout
    model = quantized_model(layouts)
    sd = model.model.state_dict()
    if layout == "TensorCoreNVFP4Layout":
        assert sd[KEYS[0]].shape[1] == 32  # the packed storage: two 4-bit values a byte
    assert weights.text_width(model, KEYS) == 64
    before = {k: v.clone() for k, v in sd.items()}
    out, erasure = erase(model)
    dequantized = {k: weights.to_float(weights.stored_weight(model, k)[0], torch.device("cpu")) for k in KEYS}
    _, float_erasure = erase(float_model(dequantized))
    assert rel(erasure.transform.dense(), float_erasure.transform.dense()) < 1e-5
    p = erasure.transform.dense().double()
    after = {k: patched(out, k) for k in KEYS}
    assert max(rel(after[k], dequantized[k].double() @ p) for k in KEYS) < 1e-5
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())  # storage untouched
    # the format's own rounding: against the same erasure on the float32 original
    original = make_model()
    _, orig_erasure = erase(original)
    want = effective_weights(original, KEYS)
    q = orig_erasure.transform.dense().double()
    vs_float = max(rel(after[k], want[k].double() @ q) for k in KEYS)
    print(f"\n{layout}: erased weights vs the float32 original's erasure {vs_float:.2e}; "
          f"stored weight vs original {max(rel(dequantized[k], want[k]) for k in KEYS):.2e}")
