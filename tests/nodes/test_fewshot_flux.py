"""Few-shot Unlearn Concept on Flux (both tiers: the stand-in's Flux text path, or ComfyUI 0.3.64's own ``Flux``
model and ``FluxClipModel`` with CLIP-L and T5 classes, small and seeded).

Flux reads T5-XXL's rows (``txt_in``) and CLIP-L's pooled vector (``vector_in``), with the distilled guidance;
the node trains CLIP-L, T5 or both (``text_encoders``), and the loss is the flow (CONST) one.
"""

from __future__ import annotations

import pytest
import torch

import fewshot_dit_factory as fdf
import fewshot_factory as ff
from conftest import load_pack

CONCEPT = "zorblat tower"
SETTINGS = dict(concept=CONCEPT, concept_type="object", epochs=2, learning_rate=2e-3, seed=0,
                parameters="mlp-final-attn")


def run(clip, model, vae, imgs, **kw):
    return load_pack().nodes.fewshot.FewShotUnlearnConcept().unlearn(
        clip, model, vae=vae, images=imgs, resolution=64, **{**SETTINGS, **kw})["result"]


def flux_loss(clip, model, vae, imgs, caption: str = f"a photo of a {CONCEPT}") -> float:
    """The flow-matching loss of the images under ``caption``, through ComfyUI's own call of the loaded model
    (``apply_model`` with ``y`` = the pooled vector and Flux's default guidance 3.5), fixed noise and times."""
    from rece_core.train import denoising_mse, noise_latents

    import comfy.model_management

    with torch.no_grad():
        x0 = model.model.process_latent_in(vae.encode(imgs)).float()
        context, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
        comfy.model_management.load_models_gpu([model])
        ms = model.get_model_object("model_sampling")
        g = torch.Generator().manual_seed(123)
        b = x0.shape[0]
        total = 0.0
        for _ in range(4):
            noise = torch.randn(x0.shape, generator=g)
            sigma = ms.sigmas.float()[torch.randint(0, ms.sigmas.shape[0], (b,), generator=g)]
            x = noise_latents("flow", x0, noise, sigma)
            extra = {"guidance": torch.full((b,), 3.5)} if type(model.model.model_config).__name__ == "Flux" else {}
            d = model.model.apply_model(x, sigma, c_crossattn=context.float().expand(b, -1, -1),
                                        y=pooled.float().expand(b, -1), **extra)
            total += float(denoising_mse("flow", d, x, x0, noise, sigma))
    return total / 4


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def flux():
    clip, model, vae = fdf.make_flux(seed=0)
    return clip, model, vae, ff.images(2, 64)


def test_flux_unlearning_trains_clip_l_and_t5_and_raises_the_concept_loss(flux):
    clip, model, vae, imgs = flux
    clip_before, model_before = snapshot(clip.cond_stage_model), snapshot(model.model)
    before = flux_loss(clip, model, vae, imgs)
    out, u, report = run(clip, model, vae, imgs)
    assert u.family == "Flux" and u.parameterisation == "flow"
    encoders = {k.split(".")[0] for k in u.deltas}
    assert encoders == {"clip_l", "t5xxl"}
    assert any(".DenseReluDense." in k for k in u.deltas) and any(".SelfAttention." in k for k in u.deltas)
    # the loaded CLIP and MODEL: bit-identical, unpatched (before anything loads the patched clone)
    assert all(torch.equal(v, clip_before[k]) for k, v in snapshot(clip.cond_stage_model).items())
    assert all(torch.equal(v, model_before[k]) for k, v in snapshot(model.model).items())
    assert not clip.patcher.patches
    assert flux_loss(out, model, vae, imgs) > before * 1.01, report


@pytest.mark.parametrize("encoder", ["clip_l", "t5xxl"])
def test_flux_trains_only_the_chosen_encoder(flux, encoder):
    clip, model, vae, imgs = flux
    before = flux_loss(clip, model, vae, imgs)
    out, u, _ = run(clip, model, vae, imgs, text_encoders=encoder)
    assert u.deltas and all(k.startswith(f"{encoder}.") for k in u.deltas)
    assert flux_loss(out, model, vae, imgs) > before


def test_flux_refuses_an_encoder_it_does_not_have(flux):
    clip, model, vae, imgs = flux
    with pytest.raises(ValueError, match="this CLIP has no clip_g encoder"):
        run(clip, model, vae, imgs, text_encoders="clip_g")


@pytest.fixture(scope="module")
def sd3():
    clip, model, vae = fdf.make_flux(seed=0, family="SD3")
    return clip, model, vae, ff.images(2, 64)


def test_sd3_unlearning_trains_its_three_encoders_and_exports_with_sd3_lora_names(sd3):
    """SD3 reads CLIP-L+G's rows and T5's rows (one sequence) and the pooled CLIP-L+G through ``y``: all three
    encoders are trained, the concept loss rises, the loaded CLIP and MODEL stay bit-identical; the LoRA names
    are ``lora_te1_`` / ``lora_te2_`` / ``lora_te3_`` (real tier: mapped by ComfyUI's own loader to the weights
    the node patched, with the same conditioning)."""
    m = load_pack().nodes.fewshot
    clip, model, vae, imgs = sd3
    clip_before, model_before = snapshot(clip.cond_stage_model), snapshot(model.model)
    before = flux_loss(clip, model, vae, imgs)
    out, u, report = run(clip, model, vae, imgs)
    assert u.family == "SD3" and u.parameterisation == "flow"
    assert {k.split(".")[0] for k in u.deltas} == {"clip_l", "clip_g", "t5xxl"}
    assert all(torch.equal(v, clip_before[k]) for k, v in snapshot(clip.cond_stage_model).items())
    assert all(torch.equal(v, model_before[k]) for k, v in snapshot(model.model).items())
    assert flux_loss(out, model, vae, imgs) > before * 1.01, report
    lora = {}
    for k, d in u.deltas.items():
        name, kind = m.lora_te_key(k, "SD3")
        lora[f"{name}.{kind}"] = d
    assert {n.split("_")[1] for n in lora} == {"te1", "te2", "te3"}
    assert all(n.startswith("lora_te3_encoder_block_") for n in lora if "DenseReluDense" in n)
    if ff.REAL:
        import comfy.sd

        lora_clip = comfy.sd.load_lora_for_models(None, clip, lora, 0.0, 1.0)[1]
        assert set(lora_clip.patcher.patches) == set(u.deltas)
        text = f"a photo of a {CONCEPT}"
        a = lora_clip.encode_from_tokens(lora_clip.tokenize(text), return_pooled=True)
        b = out.encode_from_tokens(out.tokenize(text), return_pooled=True)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_flux_unlearning_saves_loads_and_exports_with_the_flux_lora_names(flux, tmp_path, monkeypatch):
    """T5 weights in the unlearning file load back identically; the LoRA names are the ones ComfyUI's loader maps
    on a Flux CLIP (``lora_te1_`` CLIP-L, ``lora_te2_`` T5-XXL); real tier: through ComfyUI's own loader the LoRA
    gives the same conditioning and pooled vector as the node's patch."""
    from safetensors.torch import load_file

    m = load_pack().nodes.fewshot
    from rece_core.fewshot import load_unlearning, save_unlearning

    clip, model, vae, imgs = flux
    out, u, _ = run(clip, model, vae, imgs, epochs=1)
    path = tmp_path / "flux_unlearning.safetensors"
    save_unlearning(u, str(path))
    back = load_unlearning(str(path))
    assert set(back.deltas) == set(u.deltas) and all(torch.equal(back.deltas[k], u.deltas[k]) for k in u.deltas)
    lora = {}
    for k, d in u.deltas.items():
        name, kind = m.lora_te_key(k, "Flux")
        lora[f"{name}.{kind}"] = d
    assert {n.split("_")[1] for n in lora} == {"te1", "te2"}
    assert all(n.startswith("lora_te2_encoder_block_") for n in lora if "DenseReluDense" in n or "SelfAttention" in n)
    if ff.REAL:
        import comfy.sd

        lora_clip = comfy.sd.load_lora_for_models(None, clip, lora, 0.0, 1.0)[1]
        assert set(lora_clip.patcher.patches) == set(u.deltas)  # every key mapped by ComfyUI
        for text in (f"a photo of a {CONCEPT}", "a bowl of soup"):
            a = lora_clip.encode_from_tokens(lora_clip.tokenize(text), return_pooled=True)
            b = out.encode_from_tokens(out.tokenize(text), return_pooled=True)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    else:
        assert path.exists() and load_file(str(path))


def test_flux_gradient_through_the_frozen_model_matches_finite_differences():
    """Through ComfyUI's Flux blocks, which add into their inputs in place (``txt += ...``), the gradient of the
    denoised output with respect to a T5 and a CLIP-L weight equals finite differences (CI tier: the stand-in)."""
    diffusion = load_pack().nodes.host.diffusion
    clip, model, _ = fdf.make_flux(seed=1)
    te = diffusion.TextEncoder(clip, torch.device("cpu"))
    den = diffusion.Denoiser(model, torch.device("cpu"))
    tokens = clip.tokenize(f"a photo of a {CONCEPT}")
    g = torch.Generator().manual_seed(0)
    x, probe = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    sigma = torch.tensor([0.7])
    keys = [k for k in te.params if k.endswith("layer.1.DenseReluDense.wo.weight")][-1:] + \
        [k for k in te.params if k.startswith("clip_l.") and k.endswith("mlp.fc1.weight")][-1:]

    def f(ws):
        rows, pooled = te.encode(tokens, dict(zip(keys, ws)))
        with den.checkpointing(True):
            return (den.denoised(x, sigma, rows, pooled=pooled) * probe).sum()

    with torch.inference_mode(False):
        ws = [te.params[k].clone().requires_grad_(True) for k in keys]
        f(ws).backward()
        for i, w in enumerate(ws):
            d = torch.randn(w.shape, generator=torch.Generator().manual_seed(10 + i))
            eps = 1e-3
            with torch.no_grad():
                plus = [v + eps * d if j == i else v for j, v in enumerate(ws)]
                minus = [v - eps * d if j == i else v for j, v in enumerate(ws)]
                fd = (f(plus) - f(minus)) / (2 * eps)
            assert float((w.grad * d).sum()) == pytest.approx(float(fd), rel=2e-3), keys[i]


def test_flux_trains_the_same_with_checkpointing_on_or_off_and_with_its_blocks_streamed(flux, monkeypatch):
    """Flux has no checkpoint blocks (its blocks add in place, see host/diffusion.py): gradient_checkpointing
    changes nothing and the report says so. low_vram=on streams each block's weights from CPU memory as it runs
    and keeps them, for the backward pass, as references to the CPU copies: the same change, bit for bit
    (real tier: ComfyUI's DoubleStreamBlock / SingleStreamBlock; CI tier: the stand-in network as one block)."""
    diffusion = load_pack().nodes.host.diffusion
    if not ff.REAL:
        monkeypatch.setattr(diffusion, "_block_classes", lambda _: (("ToyFluxNet",), False))
    streamed_saves = []
    real_pack = diffusion._SavedTensors.__init__

    def spy(self, moved, copy, device):
        real_pack(self, moved, copy, device)
        pack = self.pack_hook

        def counting(t):
            out = pack(t)
            streamed_saves.append(isinstance(out, tuple) and out[0] is diffusion._STREAMED)
            return out

        self.pack_hook = counting

    monkeypatch.setattr(diffusion._SavedTensors, "__init__", spy)
    clip, model, vae, imgs = flux
    _, off, report_off = run(clip, model, vae, imgs, epochs=1, gradient_checkpointing=False, low_vram="off")
    _, on, report_on = run(clip, model, vae, imgs, epochs=1, gradient_checkpointing=True, low_vram="off")
    assert not any(streamed_saves)
    _, streamed, report = run(clip, model, vae, imgs, epochs=1, low_vram="on")
    assert "gradient checkpointing: off" in report_on and "gradient checkpointing: off" in report_off
    assert "held in CPU memory" in report and sum(streamed_saves) >= (8 if ff.REAL else 2)
    for other in (on, streamed):
        assert other.epoch_losses == off.epoch_losses
        assert all(torch.equal(other.deltas[k], off.deltas[k]) for k in off.deltas)


@pytest.mark.skipif(not ff.REAL, reason="real tier: ComfyUI's own cast layers (the stand-in's are plain torch layers)")
def test_untrained_encoders_keep_their_stored_dtype_and_encode_the_same():
    """Training CLIP-L on Flux, T5's copies keep the dtype ComfyUI stores T5 in (bf16 here; T5-XXL is 19 GB in
    float32): the shadow's layers cast them to the input's dtype, so the rows and pooled vector are bit-identical
    to those from float32 copies of the same weights."""
    diffusion = load_pack().nodes.host.diffusion
    clip = fdf.real_flux_clip(seed=2)
    clip.cond_stage_model.t5xxl.to(torch.bfloat16)
    trained = [k for k in clip.cond_stage_model.state_dict() if k.startswith("clip_l.") and ".mlp." in k]
    lean = diffusion.TextEncoder(clip, torch.device("cpu"), float32=trained)
    full = diffusion.TextEncoder(clip, torch.device("cpu"))
    assert {lean.params[k].dtype for k in lean.params if k.startswith("t5xxl.") and k.endswith("weight")} == \
        {torch.bfloat16}
    assert all(lean.params[k].dtype == torch.float32 for k in trained)
    tokens = clip.tokenize(f"a photo of a {CONCEPT}")
    with torch.no_grad():
        (a_rows, a_pooled), (b_rows, b_pooled) = lean.encode(tokens), full.encode(tokens)
    assert torch.equal(a_rows, b_rows) and torch.equal(a_pooled, b_pooled)


def test_out_of_memory_on_flux_names_t5_and_the_way_out(flux, monkeypatch):
    """Training T5-XXL needs about 50 GB: out of memory, the message says how much of the training is T5's and
    that text_encoders = clip_l trains CLIP-L alone."""
    m = load_pack().nodes.fewshot
    from rece_comfyui.rece_core.train import TrainingOutOfMemory  # the pack's own class, as the node raises it

    def full(*args, **kwargs):
        raise TrainingOutOfMemory("out of memory on cuda at step 1 of 2 while training ...")

    monkeypatch.setattr(m, "unlearn", full)
    clip, model, vae, imgs = flux
    with pytest.raises(TrainingOutOfMemory, match="text_encoders = clip_l trains CLIP-L alone") as full_run:
        run(clip, model, vae, imgs, epochs=1)
    assert str(full_run.value).startswith("Few-shot Unlearn Concept: out of memory")
    assert "of the trained parameters are T5-XXL" in str(full_run.value)
    with pytest.raises(TrainingOutOfMemory) as clip_only:
        run(clip, model, vae, imgs, epochs=1, text_encoders="clip_l")
    assert "T5-XXL" not in str(clip_only.value)
