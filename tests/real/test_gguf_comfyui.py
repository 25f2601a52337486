"""GGUF files loaded by the real ComfyUI-GGUF (city96's ``Unet Loader (GGUF)``), erased, sampled (real tier).

Needs ``COMFYUI_PATH`` (ComfyUI), ``COMFYUI_GGUF_PATH`` (a ComfyUI-GGUF checkout, loaded as a custom node
package; never part of this repository) and the ``gguf`` package. A seeded SD1.5-format UNet (ComfyUI's
own class, 320 channels, one level: 26M parameters, 8 text readers [320, 768]) is written as ``.gguf``
in several layouts with the gguf package, loaded by ``UnetLoaderGGUF``, erased with RECE, and sampled
with ComfyUI's sampler. Each is compared with the same erasure on the float model holding the file's
dequantized weights (the format's own rounding left out), and on the original float32 weights.

Run: ``COMFYUI_PATH=/work/comfyui COMFYUI_GGUF_PATH=/work/comfyui-gguf python -m pytest -q -s
tests/real/test_gguf_comfyui.py`` (``-s`` prints the measured figures, docs/formats.md).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from measure import rel

GGUF_PATH = os.environ.get("COMFYUI_GGUF_PATH")
pytestmark = [
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="real tier: set COMFYUI_PATH"),
    pytest.mark.skipif(not GGUF_PATH or not Path(GGUF_PATH, "nodes.py").is_file(),
                       reason="set COMFYUI_GGUF_PATH to a ComfyUI-GGUF checkout (city96/ComfyUI-GGUF)"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed"),
]

CONCEPT, PRESERVED = "nudity", "a photo of a cat"
ERASE = dict(concepts=CONCEPT, guide="", preserve=PRESERVED, concept_kind="nudity", rounds=1, reg=0.1, lamb=0.1,
             erase_scale=1.0, preserve_scale=0.1)
READER = ("attn2.to_k.weight", "attn2.to_v.weight")
# layout: (type of the text readers, type of the other 2D weights); K-quants need rows of 256
LAYOUTS = {"Q8_0": ("Q8_0", "Q8_0"), "Q5_0": ("Q5_0", "Q5_0"), "Q6_K": ("Q6_K", "Q8_0"), "F16": ("F16", "F16"),
           "mixed_bf16_readers": ("BF16", "Q5_0")}


def gguf_pack():
    """ComfyUI-GGUF imported as ComfyUI imports a custom node folder (a package named after it)."""
    name = "ComfyUI_GGUF_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(GGUF_PATH, "__init__.py"),
                                                      submodule_search_locations=[GGUF_PATH])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K (GGML's K-quant layout, which the gguf package cannot write): per 256 values 16 int8 scales of
    16-value sub-blocks, a float16 ``d``, 6-bit ``q`` (low 4 bits in ``ql``, high 2 in ``qh``);
    value = ``d · scale · (q − 32)``."""
    rows = x.shape[0]
    sub = x.reshape(-1, 16, 16).astype(np.float32)
    scale_f = np.abs(sub).max(-1) / 31.0
    d = (scale_f.max(-1) / 127.0).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    sc = np.round(scale_f / np.where(df > 0, df, 1)).clip(-128, 127).astype(np.int8)
    step = (df * sc)[:, :, None]
    q = np.round(sub / np.where(step != 0, step, 1)) * (step != 0)
    q = (q.clip(-32, 31) + 32).astype(np.uint8).reshape(-1, 256)
    ql, qh, l = np.zeros((len(q), 128), np.uint8), np.zeros((len(q), 64), np.uint8), np.arange(32)
    for half in range(2):
        h = q[:, 128 * half:128 * half + 128]
        ql[:, 64 * half + l] = (h[:, l] & 15) | ((h[:, l + 64] & 15) << 4)
        ql[:, 64 * half + 32 + l] = (h[:, l + 32] & 15) | ((h[:, l + 96] & 15) << 4)
        qh[:, 32 * half + l] = ((h[:, l] >> 4) | ((h[:, l + 32] >> 4) << 2) | ((h[:, l + 64] >> 4) << 4)
                                | ((h[:, l + 96] >> 4) << 6))
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1).reshape(rows, -1)


def write_gguf(path: Path, state: dict[str, torch.Tensor], readers: str, others: str) -> Path:
    """``state`` as a GGUF file the way ComfyUI-GGUF's convert tool lays one out: 1D tensors F32, the
    text readers in ``readers``, other 2D weights in ``others`` where their rows fit the blocks, the rest F16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), arch="sd1")
    for key, t in state.items():
        x = t.float().numpy()
        kind = readers if key.endswith(READER) else others
        block = gguf.GGML_QUANT_SIZES[Q[kind]][0]
        if x.ndim == 1:
            writer.add_tensor(key, x)
        elif x.ndim != 2 or kind == "F16" or x.shape[-1] % block:
            writer.add_tensor(key, x.astype(np.float16))
        elif kind == "Q6_K":
            writer.add_tensor(key, quantize_q6_k(x), raw_dtype=Q.Q6_K)
        else:
            writer.add_tensor(key, gguf.quants.quantize(x, Q[kind]), raw_dtype=Q[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def unet_state():
    """A seeded SD1.5-format UNet's state dict (float32), small enough to quantize on a CPU."""
    sys.path.insert(0, str(Path(__file__).parent))
    import comfy.ops
    from checkpoint import SD15_UNET, seed_module
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = dict(SD15_UNET, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                  transformer_depth_output=[1, 1], transformer_depth_middle=1)
    unet = UNetModel(**config, operations=comfy.ops.disable_weight_init)
    seed_module(unet, torch.Generator().manual_seed(0))
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import folder_paths

    path = tmp_path_factory.mktemp("diffusion_models")
    folder_paths.add_model_folder_path("diffusion_models", str(path))
    gguf_pack()  # registers unet_gguf over the diffusion_models folders
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()
    return path


def load_gguf(folder: Path, name: str):
    return gguf_pack().nodes.UnetLoaderGGUF().load_unet(name)[0]


def dequantized_float_model(path: Path):
    """The file's weights dequantized by ComfyUI-GGUF (as its layers compute with them), as a float model."""
    import comfy.sd

    pack = gguf_pack()
    sd = pack.loader.gguf_sd_loader(str(path))
    plain = {k: pack.dequant.dequantize_tensor(v, torch.float32).as_subclass(torch.Tensor).float().clone()
             for k, v in sd.items()}
    return comfy.sd.load_diffusion_model_state_dict(plain)


def float_model(state):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in state.items()})


def clip():
    from factory import FakeCLIP

    return FakeCLIP("sd15")


def sample(model, prompt: str) -> torch.Tensor:
    import comfy.sample

    c = clip()
    positive = [[c.encode_from_tokens(c.tokenize(prompt)), {}]]
    negative = [[c.encode_from_tokens(c.tokenize("")), {}]]
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(42))
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, 3, 5.0, "euler", "normal", positive, negative, torch.zeros_like(noise),
                                   denoise=1.0, seed=42, disable_pbar=True).float()


def stored(model) -> dict[str, torch.Tensor]:
    return {n: p.as_subclass(torch.Tensor).detach().clone() for n, p in model.model.named_parameters()}


def erase(model):
    from conftest import load_pack

    load_pack()
    from rece_comfyui.nodes.rece import RECEEraseConcept

    out = RECEEraseConcept().erase(model, clip(), **ERASE)["result"]
    return out[0], out[1]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gguf_erase_samples_like_the_float_erasure(layout, unet_state, folder):
    path = write_gguf(folder / f"tiny_sd15_{layout}.gguf", unet_state, *LAYOUTS[layout])
    model = load_gguf(folder, path.name)
    assert any(k.endswith("temp.weight") for k in model.model.state_dict()) == (layout != "F16")
    before = stored(model)
    orig_c = sample(model, CONCEPT)
    out, erasure = erase(model)
    er_c, er_p, orig_p = sample(out, CONCEPT), sample(out, PRESERVED), sample(model, PRESERVED)
    assert erasure.dim == 768
    # the loaded model: bit-identical, and samples as before
    assert all(torch.equal(before[n], v) for n, v in stored(model).items())
    assert torch.equal(sample(model, CONCEPT), orig_c)
    concept, preserved = rel(er_c, orig_c), rel(er_p, orig_p)
    assert concept > 1e-2 and concept > 3 * preserved
    # the same erasure on the file's dequantized weights as a float model: equal up to float32 arithmetic
    deq = dequantized_float_model(path)
    deq_out, deq_erasure = erase(deq)
    vs_dequantized = rel(er_c, sample(deq_out, CONCEPT))
    transform = rel(erasure.transform.dense(), deq_erasure.transform.dense())
    # and on the original float32 weights: the format's own rounding
    flo_out, _ = erase(float_model(unet_state))
    vs_float = rel(er_c, sample(flo_out, CONCEPT))
    print(f"\n{layout}: concept moved {concept:.4f}, preserved {preserved:.4f}; erased sample vs the same erasure on "
          f"the dequantized float model {vs_dequantized:.2e} (P differs {transform:.1e}), vs the float32 "
          f"original's erasure {vs_float:.2e}")
    assert transform < 1e-4 and vs_dequantized < 1e-3


def test_derive_apply_save_load_export_on_gguf(unet_state, folder, models_dir):
    from conftest import load_pack

    load_pack()
    from rece_comfyui.nodes.files import ExportErasureAsLoRA, LoadErasedWeights, SaveErasedWeights
    from rece_comfyui.nodes.rece import ApplyErasedWeights, RECEDeriveEmbedding

    path = write_gguf(folder / "tiny_sd15_apply.gguf", unet_state, "Q8_0", "Q8_0")
    model = load_gguf(folder, path.name)
    before = stored(model)
    out, erasure = erase(model)
    reach = RECEDeriveEmbedding().derive(out, clip(), CONCEPT, 0.1)["result"][1]
    deq_out, _ = erase(dequantized_float_model(path))
    assert reach == pytest.approx(RECEDeriveEmbedding().derive(deq_out, clip(), CONCEPT, 0.1)["result"][1], abs=1e-3)
    SaveErasedWeights().save(erasure, "rece/gguf")
    loaded = LoadErasedWeights().load("rece/gguf_00001.safetensors")["result"][0]
    applied, report = ApplyErasedWeights().apply(model, loaded, 1.0)["result"]
    assert "another base model" not in report
    assert rel(sample(applied, CONCEPT), sample(out, CONCEPT)) < 1e-5
    report = ExportErasureAsLoRA().export(model, erasure, "rece/gguf_lora", 0, "fp32")["result"][0]
    assert "exact" in report
    assert all(torch.equal(before[n], v) for n, v in stored(model).items())


def test_fewshot_unlearning_trains_through_a_gguf_unet_as_through_its_dequantized_weights(unet_state, folder):
    """Few-shot unlearning with the frozen model a Q8_0 GGUF file loaded by ComfyUI-GGUF: the same training as on
    the file's weights dequantized into a float model (up to float32 arithmetic), the GGUF weights untouched."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import fewshot_factory as ff
    from conftest import load_pack

    path = write_gguf(folder / "tiny_fewshot_q8.gguf", unet_state, "Q8_0", "Q8_0")
    model = load_gguf(folder, path.name)
    assert any(type(p).__name__ == "GGMLTensor" and str(p.tensor_type.name) == "Q8_0"
               for p in model.model.parameters())
    before = stored(model)
    node = load_pack().nodes.fewshot.FewShotUnlearnConcept()
    args = dict(concept="zorblat", concept_type="object", epochs=1, learning_rate=1e-4, seed=0,
                parameters="mlp-final-attn", resolution=64, batch_size=2)
    imgs = ff.images(2, 64)
    with torch.inference_mode():
        _, on_gguf, _ = node.unlearn(ff.real_clip(0, width=768), model, vae=ff.ToyVAE(0), images=imgs, **args)["result"]
        _, on_float, _ = node.unlearn(ff.real_clip(0, width=768), dequantized_float_model(path), vae=ff.ToyVAE(0), images=imgs,
                                      **args)["result"]
    assert on_gguf.epoch_losses == pytest.approx(on_float.epoch_losses, rel=1e-4)
    a = torch.cat([on_gguf.deltas[k].flatten() for k in sorted(on_gguf.deltas)])
    b = torch.cat([on_float.deltas[k].flatten() for k in sorted(on_gguf.deltas)])
    assert float((a - b).norm() / b.norm()) < 1e-3 and float(b.norm()) > 0
    assert all(torch.equal(before[n], v) for n, v in stored(model).items())
