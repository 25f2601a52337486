"""Few-shot Unlearn Concept on seeded tiny models (both tiers: stand-in shapes, or ComfyUI 0.3.64's own classes).

What a user would notice: the concept caption no longer helps the model denoise the images (its
denoising loss went up), the concept prompt's conditioning moved more than an unrelated prompt's,
the loaded CLIP and MODEL are bit-identical, the same seed gives the same result, bad input is refused.
"""

from __future__ import annotations

import pytest
import torch

import fewshot_factory as ff
from conftest import load_pack

CONCEPT = "zorblat tower"
UNRELATED = "a bowl of green soup"
SETTINGS = dict(concept=CONCEPT, concept_type="object", epochs=3, learning_rate=2e-3, seed=0,
                parameters="mlp-final-attn")


def node():
    return load_pack().nodes.fewshot.FewShotUnlearnConcept()


def run(clip, model, vae, imgs, **kw):
    args = {**SETTINGS, **kw}
    return node().unlearn(clip, model, vae=vae, images=imgs, resolution=64, **args)["result"]


def encode(clip, text: str) -> torch.Tensor:
    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(text)).float()


def concept_loss(clip, model, vae, imgs, concept=CONCEPT, sdxl: bool = False) -> float:
    """Denoising MSE of the images under 'a photo of a <concept>' (fixed noise and timesteps, the model's loss)."""
    from rece_core.train import denoising_mse, noise_latents

    import comfy.model_management

    kind = load_pack().nodes.fewshot.parameterisation(model)[0]
    with torch.no_grad():
        x0 = model.model.process_latent_in(vae.encode(imgs)).float()
        g = torch.Generator().manual_seed(123)
        ms = model.get_model_object("model_sampling")
        with torch.no_grad():
            context, pooled = clip.encode_from_tokens(clip.tokenize(f"a photo of a {concept}"), return_pooled=True)
        context = context.float()
        extra = {}
        if sdxl:
            size = imgs.shape[1]
            extra["y"] = model.model.encode_adm(pooled_output=pooled.float().expand(x0.shape[0], -1), width=size,
                                                height=size, crop_w=0, crop_h=0, target_width=size, target_height=size)
        comfy.model_management.load_models_gpu([model])
        total = 0.0
        for _ in range(4):
            noise = torch.randn(x0.shape, generator=g)
            sigma = ms.sigmas.float()[torch.randint(0, 1000, (x0.shape[0],), generator=g)]
            x = noise_latents(kind, x0, noise, sigma)
            d = model.model.apply_model(x, sigma, c_crossattn=context.expand(x0.shape[0], -1, -1), **extra)
            total += float(denoising_mse(kind, d, x, x0, noise, sigma))
    return total / 4


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def trained():
    clip, model, vae = ff.make(seed=0)
    imgs = ff.images(4, 64)
    before = {"clip": snapshot(clip.cond_stage_model), "model": snapshot(model.model),
              "clip_patches": dict(clip.patcher.patches), "model_patches": dict(model.patches),
              "concept": encode(clip, f"a photo of a {CONCEPT}"), "unrelated": encode(clip, UNRELATED),
              "loss": concept_loss(clip, model, vae, imgs),
              "model_grad": [v.requires_grad for v in model.model.parameters()]}
    out, unlearning, report = run(clip, model, vae, imgs)
    return clip, model, vae, imgs, before, out, unlearning, report


def test_concept_caption_loss_went_up(trained):
    clip, model, vae, imgs, before, out, unlearning, report = trained
    after = concept_loss(out, model, vae, imgs)
    assert after > before["loss"] * 1.01, (before["loss"], after)  # fixed noise and timesteps: no chance in it
    assert "loss per epoch" in report and "mlp-final-attn" in report


def test_loaded_clip_and_model_bit_identical(trained):
    clip, model, vae, imgs, before, out, unlearning, report = trained
    encode(out, "anything")  # the patched clone has been used since
    assert torch.equal(encode(clip, f"a photo of a {CONCEPT}"), before["concept"])
    for k, v in snapshot(clip.cond_stage_model).items():
        assert torch.equal(v, before["clip"][k]), k
    for k, v in snapshot(model.model).items():
        assert torch.equal(v, before["model"][k]), k
    assert dict(clip.patcher.patches) == before["clip_patches"] and dict(model.patches) == before["model_patches"]
    assert [v.requires_grad for v in model.model.parameters()] == before["model_grad"]


def prompt_rows(clip, text: str) -> torch.Tensor:
    """The rows of ``text``'s conditioning that differ between prompts: its word tokens up to and including
    the end token (not the start row, the same for every prompt under causal attention, nor the padding)."""
    ids = [t[0] for t in next(iter(clip.tokenize(text).values()))[0]]
    end = next(i for i in range(1, len(ids)) if ids[i] == ids[-1])
    return encode(clip, text)[0, 1:end + 1]


def test_concept_conditioning_moved(trained):
    """The concept prompt's conditioning moved (and only through the output CLIP), on its own word rows too.

    On these random tiny models specificity does not show (a random UNet barely reads the text: the
    images' loss is 2.71 vs 2.67 under two captions; whole conditioning moved 0.97 vs 0.96), so only
    the weak statement is asserted here: the concept prompt's word rows moved by at least 0.8× an
    unrelated prompt's (seed 0: 0.83 vs 0.75 CI, 0.83 vs 0.66 real). The issue's claim is asserted on a
    model that reads its text: test_unlearning_is_specific_on_a_model_that_reads_its_text.
    """
    clip, model, vae, imgs, before, out, unlearning, report = trained
    moved = float((encode(out, f"a photo of a {CONCEPT}") - before["concept"]).norm() / before["concept"].norm())
    assert moved > 1e-2, moved
    assert torch.equal(encode(clip, f"a photo of a {CONCEPT}"), before["concept"])

    def rows_moved(text: str) -> float:
        a, b = prompt_rows(out, text), prompt_rows(clip, text)
        return float((a - b).norm() / b.norm())

    concept, unrelated = rows_moved(f"a photo of a {CONCEPT}"), rows_moved(UNRELATED)
    assert concept > 1e-2 and concept > 0.8 * unrelated, (concept, unrelated)


# pre-training that makes the seeded tiny UNet (and CLIP) read the class words: benchmarks/fewshot_specificity.py.
# CI tier: eps-prediction, every timestep. Real tier: ComfyUI's SD1 UNet tells the classes apart from the
# noisy image at all but the highest noise, where only a v-prediction loss still rewards reading the caption:
# v-prediction, pre-trained (and its loss measured) on the top 30 % of the schedule (docs/fewshot.md).
if ff.REAL:
    PREDICTION, READS_TEXT, NOISE, UNLEARN_LR = "v", dict(steps=300, lr=2e-3, clip_lr=1e-3, t_min=0.7), 0.7, 2e-3
else:
    PREDICTION, READS_TEXT, NOISE, UNLEARN_LR = "eps", dict(steps=500, lr=1e-2, clip_lr=1e-3), 0.0, 1e-4


def test_unlearning_is_specific_on_a_model_that_reads_its_text():
    """The issue's claim, on a tiny model that reads its text (a random one barely does, see above):
    the seeded UNet and CLIP pre-trained on two synthetic image classes, each captioned with its own
    made-up word ('a photo of a zorblat' / '... quintaveer'). Unlearning 'zorblat' from four new
    zorblat images (3 epochs) then (a) raises the zorblat caption's loss on them, (b) moves
    the zorblat prompt's conditioning more than the quintaveer prompt's, and (c) raises the quintaveer
    images' loss under their own caption by clearly less than (a). CI tier (lr 1e-4), seeds 0-5
    (docs/fewshot.md): (a) ×1.05-1.36, (b) 1.14-2.5× the other prompt's move, (c) at most 0.78× the
    rise of (a); seed 0 is the weakest and is the one run here. Real tier (v-prediction, lr 2e-3,
    losses at the top 30 % of noise), seeds 0-5: (a) ×1.07-37.6, (b) 1.53-3.59×, (c) at most 0.21×;
    seed 0 (×1.52, 1.65×, 0.00) run here."""
    clip, model, vae = ff.make(seed=0, prediction=PREDICTION)
    ff.make_text_sensitive(clip, model, vae, seed=0, **READS_TEXT)

    def loss(clip, imgs, text):
        return ff.caption_loss(clip, model, vae, imgs, text, t_min=NOISE)

    w0, w1 = ff.CLASS_WORDS[:2]
    concept, other = f"a photo of a {w0}", f"a photo of a {w1}"
    imgs0, imgs1 = ff.class_images(0, 4, seed=100), ff.class_images(1, 4, seed=100)
    loss0, loss1 = loss(clip, imgs0, concept), loss(clip, imgs1, other)
    # the precondition: each class's images are denoised clearly better under their own caption
    assert loss0 < 0.7 * loss(clip, imgs0, other), loss0
    assert loss1 < 0.7 * loss(clip, imgs1, concept), loss1
    before = ff.caption_conditioning(clip, [concept, other])
    out = run(clip, model, vae, imgs0, concept=w0, learning_rate=UNLEARN_LR)[0]
    after = ff.caption_conditioning(out, [concept, other])
    rise0 = loss(out, imgs0, concept) / loss0 - 1
    rise1 = loss(out, imgs1, other) / loss1 - 1
    moved = ((after - before).flatten(1).norm(dim=1) / before.flatten(1).norm(dim=1)).tolist()
    assert rise0 > 0.03, rise0                                      # (a)
    assert moved[0] > 1.1 * moved[1], moved                         # (b) whole 77-row conditioning
    assert rise1 < 0.85 * rise0, (rise0, rise1)                     # (c)


def test_trained_keys_are_the_paper_default(trained):
    clip, model, vae, imgs, before, out, unlearning, report = trained
    keys = set(unlearning.deltas)
    last = max(int(k.split("layers.")[1].split(".")[0]) for k in keys)
    assert all(".mlp.fc" in k or f"layers.{last}.self_attn." in k for k in keys)
    assert any(f"layers.{last}.self_attn.q_proj.weight" in k for k in keys)
    assert any("layers.0.mlp.fc1.weight" in k for k in keys) and not any("layers.0.self_attn" in k for k in keys)
    assert set(out.patcher.patches) == keys


def test_same_seed_same_result_other_seed_differs():
    imgs = ff.images(2, 64)
    clip, model, vae = ff.make(seed=1)
    a = run(clip, model, vae, imgs, epochs=1)[1]
    b = run(clip, model, vae, imgs, epochs=1)[1]
    c = run(clip, model, vae, imgs, epochs=1, seed=5)[1]
    assert a.epoch_losses == b.epoch_losses
    assert all(torch.equal(a.deltas[k], b.deltas[k]) for k in a.deltas)
    assert any(not torch.equal(a.deltas[k], c.deltas[k]) for k in a.deltas)


def test_zero_shot_runs_without_images():
    clip, model, vae = ff.make(seed=2)
    res = node().unlearn(clip, model, zero_shot=True, resolution=64, batch_size=2, **{**SETTINGS, "epochs": 1})
    out, u, report = res["result"]
    ui = res["ui"]["rece_report"][0]  # what web/report.js shows
    assert ui["concept"] == CONCEPT and ui["parameter_set"] == "mlp-final-attn" and ui["parameters"] == u.n_parameters
    assert ui["epoch_losses"] == u.epoch_losses and {"seconds", "device"} <= set(ui)
    assert u.zero_shot and u.images == 0 and "zero-shot" in report and len(u.epoch_losses) == 1
    assert any(d.abs().max() > 0 for d in u.deltas.values())


@pytest.mark.parametrize("kw, match", [
    (dict(concept="  "), "concept name is empty"),
    (dict(images=None), "connect images"),
    (dict(parameters="everything"), "parameters to train"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(concept_type="person"), "concept_type"),
    (dict(resolution=100), "multiple of 8"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_input_refused(kw, match):
    clip, model, vae = ff.make(seed=0)
    args = {**SETTINGS, "vae": vae, "images": ff.images(2, 64), "resolution": 64, **kw}
    with pytest.raises(ValueError, match=match):
        node().unlearn(clip, model, **args)


@pytest.mark.skipif(ff.REAL, reason="CI tier: the unsupported family is a stand-in config")
def test_unsupported_family_refused():
    clip, model, vae = ff.make(seed=0, config=type("QwenImage", (), {}))
    with pytest.raises(ValueError, match="QwenImage model is not supported.*SD1.x, SD2.x, SDXL, Flux and SD3.*LLM"):
        run(clip, model, vae, ff.images(2, 64))


@pytest.mark.parametrize("moment", ["reading the weights", "inside the first step"])
def test_cancel_within_training_leaves_inputs_untouched(monkeypatch, moment):
    """Cancel is checked for every weight read into the training copies and inside each step (between the
    encoder and the model); either way the loaded CLIP and MODEL are left as they were."""
    import comfy.model_management

    clip, model, vae = ff.make(seed=0)
    imgs = ff.images(4, 64)
    ref_clip, ref_model = snapshot(clip.cond_stage_model), snapshot(model.model)
    reads = len(list(model.model.diffusion_model.parameters())) + len(list(clip.cond_stage_model.parameters()))
    at = 2 if moment == "reading the weights" else reads + 2  # one check per weight read, then the steps
    calls = []
    real = comfy.model_management.throw_exception_if_processing_interrupted

    def interrupt():
        calls.append(1)
        if len(calls) == at:
            raise comfy.model_management.InterruptProcessingException()
        return real()

    monkeypatch.setattr(comfy.model_management, "throw_exception_if_processing_interrupted", interrupt)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(clip, model, vae, imgs)
    assert len(calls) == at
    assert all(torch.equal(v, ref_clip[k]) for k, v in snapshot(clip.cond_stage_model).items())
    assert all(torch.equal(v, ref_model[k]) for k, v in snapshot(model.model).items())


@pytest.mark.parametrize("prediction", ["v", "flow"])
def test_v_and_flow_models_train_with_their_own_target(prediction):
    """The report names the parameterisation and the concept loss (in the model's own target) goes up."""
    clip, model, vae = ff.make(seed=4, prediction=prediction)
    imgs = ff.images(2, 64)
    before = concept_loss(clip, model, vae, imgs)
    out, u, report = run(clip, model, vae, imgs, epochs=2)
    assert u.parameterisation == prediction and f"{prediction} loss" in report
    assert concept_loss(out, model, vae, imgs) > before * 1.01


def test_save_load_roundtrip_and_bad_files_refused(trained, models_dir):
    clip, model, vae, imgs, before, out, unlearning, report = trained
    m = load_pack().nodes.fewshot
    m.SaveUnlearning().save(unlearning, "rece/u")
    path = models_dir / "rece" / "rece" / "u_00001.safetensors"
    assert path.is_file()
    loaded_clip, u, text = m.LoadUnlearning().load(clip, "rece/u_00001.safetensors", 1.0)["result"]
    assert u.concept == CONCEPT and u.epoch_losses == unlearning.epoch_losses and "loaded" in text
    assert all(torch.equal(u.deltas[k], unlearning.deltas[k]) for k in unlearning.deltas)
    assert torch.equal(encode(loaded_clip, f"a photo of a {CONCEPT}"), encode(out, f"a photo of a {CONCEPT}"))
    half = m.LoadUnlearning().load(clip, "rece/u_00001.safetensors", 0.0)["result"][0]
    assert torch.equal(encode(half, f"a photo of a {CONCEPT}"), before["concept"])
    # bad files: named in the message
    (models_dir / "rece" / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="junk.safetensors: not a safetensors file"):
        m.LoadUnlearning().load(clip, "junk.safetensors", 1.0)
    from safetensors.torch import save_file
    save_file({"delta.x": torch.zeros(2)}, str(models_dir / "rece" / "other.safetensors"), metadata={"format": "x"})
    with pytest.raises(ValueError, match="other.safetensors: not a few-shot unlearning file"):
        m.LoadUnlearning().load(clip, "other.safetensors", 1.0)
    bad = {f"delta.{k}": v.clone() for k, v in unlearning.deltas.items()}
    next(iter(bad.values())).view(-1)[0] = float("nan")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(bad, str(models_dir / "rece" / "nan.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="nan.safetensors: tensor .* contains NaN"):
        m.LoadUnlearning().load(clip, "nan.safetensors", 1.0)
    # another encoder: refused by name
    other = {k.replace("clip_l.", "clip_h."): v for k, v in unlearning.deltas.items()}
    save_file({f"delta.{k}": v for k, v in other.items()}, str(models_dir / "rece" / "h.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="made for another text encoder"):
        m.LoadUnlearning().load(clip, "h.safetensors", 1.0)


def test_export_as_lora_writes_te_diff_keys(trained, models_dir):
    clip, model, vae, imgs, before, out, unlearning, report = trained
    from safetensors.torch import load_file

    m = load_pack().nodes.fewshot
    text = m.ExportUnlearningAsLoRA().export(unlearning, "rece/ul", "fp32")["result"][0]
    assert "exact" in text
    sd = load_file(str(models_dir / "loras" / "rece" / "ul_00001.safetensors"))
    assert len(sd) == len(unlearning.deltas)
    for k, d in unlearning.deltas.items():
        name, kind = m.lora_te_key(k)
        assert name.startswith("lora_te_text_model_encoder_layers_") and torch.equal(sd[f"{name}.{kind}"], d)


@pytest.mark.skipif(not ff.REAL, reason="real tier: ComfyUI's own LoRA loader")
def test_exported_lora_through_comfyuis_loader_equals_the_patch(trained, models_dir):
    import comfy.sd
    import comfy.utils

    clip, model, vae, imgs, before, out, unlearning, report = trained
    m = load_pack().nodes.fewshot
    m.ExportUnlearningAsLoRA().export(unlearning, "rece/ul", "fp32")
    lora = comfy.utils.load_torch_file(str(models_dir / "loras" / "rece" / "ul_00001.safetensors"), safe_load=True)
    _, lora_clip = comfy.sd.load_lora_for_models(model, clip, lora, 0.0, 1.0)
    for text in (f"a photo of a {CONCEPT}", UNRELATED):
        assert torch.equal(encode(lora_clip, text), encode(out, text))
    assert set(lora_clip.patcher.patches) == set(unlearning.deltas)


@pytest.mark.skipif(not ff.REAL, reason="real tier: ComfyUI's own CLIP classes")
def test_gradient_through_comfyuis_clip_matches_finite_differences():
    """ComfyUI's CLIP layers add in place; under ``saved_copies`` the gradient is still the true one."""
    clip = ff.real_clip(0)
    te = load_pack().nodes.host.diffusion.TextEncoder(clip, torch.device("cpu"))
    key = "clip_l.transformer.text_model.encoder.layers.1.mlp.fc1.weight"
    tokens = clip.tokenize(f"a photo of a {CONCEPT}")
    with torch.inference_mode(False):
        w = te.params[key].clone().requires_grad_(True)
        direction = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
        probe = torch.randn(1, 77, ff.WIDTH, generator=torch.Generator().manual_seed(1))  # (a norm is ~constant)

        def f(weight):
            return (te.encode(tokens, {key: weight})[0] * probe).sum()

        value = f(w)
        value.backward()
        eps = 1e-2
        with torch.no_grad():
            fd = (f(w + eps * direction) - f(w - eps * direction)) / (2 * eps)
    assert torch.equal(value.detach(), f(te.params[key]).detach())  # the same forward as ComfyUI's encode
    assert torch.equal(value.detach(), (clip.encode_from_tokens(tokens) * probe).sum())
    assert float((w.grad * direction).sum()) == pytest.approx(float(fd), rel=2e-2)


def test_runs_under_comfyuis_inference_mode():
    """ComfyUI builds models and runs nodes under ``torch.inference_mode()`` (execution.py)."""
    with torch.inference_mode():
        clip, model, vae = ff.make(seed=6)
        imgs = ff.images(2, 64)
        assert all(p.is_inference() for p in model.model.parameters())
        ref = snapshot(model.model)
        out, u, report = run(clip, model, vae, imgs, epochs=1)
    assert any(d.abs().max() > 0 for d in u.deltas.values()) and not any(d.is_inference() for d in u.deltas.values())
    assert all(torch.equal(v, ref[k]) for k, v in snapshot(model.model).items())
    with torch.inference_mode():
        assert not torch.equal(encode(out, f"a photo of a {CONCEPT}"), encode(clip, f"a photo of a {CONCEPT}"))


@pytest.mark.skipif(not ff.REAL, reason="real tier: ComfyUI's own SD2 classes (CLIP-H, v-prediction)")
def test_sd2_clip_h_v_prediction(models_dir):
    """SD2.x: CLIP-H read at its penultimate layer, a v-prediction model; the export maps through ComfyUI's loader."""
    import comfy.sd
    import comfy.utils

    clip, model, vae = ff.real_clip_h(0), ff.real_model(0, "v", "SD20"), ff.ToyVAE(0)
    imgs = ff.images(2, 64)
    before = concept_loss(clip, model, vae, imgs)
    out, u, report = run(clip, model, vae, imgs, epochs=2)
    assert u.family == "SD2.x" and u.parameterisation == "v" and all(k.startswith("clip_h.") for k in u.deltas)
    assert concept_loss(out, model, vae, imgs) > before * 1.01
    m = load_pack().nodes.fewshot
    m.ExportUnlearningAsLoRA().export(u, "rece/h", "fp32")
    lora = comfy.utils.load_torch_file(str(models_dir / "loras" / "rece" / "h_00001.safetensors"), safe_load=True)
    lora_clip = comfy.sd.load_lora_for_models(None, clip, lora, 0.0, 1.0)[1]
    assert torch.equal(encode(lora_clip, f"a photo of a {CONCEPT}"), encode(out, f"a photo of a {CONCEPT}"))


@pytest.mark.skipif(ff.REAL, reason="CI tier: a stand-in model reading another text width")
def test_clip_of_another_width_refused():
    clip, model, vae = ff.make(seed=0)
    model.model.model_config.unet_config = {"context_dim": 1024}
    with pytest.raises(ValueError, match="32-wide text but this SD1.x model reads 1024-wide"):
        run(clip, model, vae, ff.images(2, 64))


@pytest.mark.skipif(ff.REAL, reason="CI tier: an image-conditioned stand-in model")
def test_inpainting_model_refused():
    clip, model, vae = ff.make(seed=0)
    model.model.concat_keys = ("mask", "masked_image")
    with pytest.raises(ValueError, match="inpainting or image-conditioned"):
        run(clip, model, vae, ff.images(2, 64))


def test_sdxl_trains_both_encoders_through_the_size_conditioning(models_dir):
    """SDXL: CLIP-L and bigG both trained (bigG's pooled output reaches the model through y); the LoRA
    export names them lora_te1_ / lora_te2_ (through ComfyUI's own loader in the real tier)."""
    clip, model, vae = ff.make(seed=8, config=ff.SDXL)
    imgs = ff.images(2, 64)
    before = concept_loss(clip, model, vae, imgs, sdxl=True)
    out, u, report = run(clip, model, vae, imgs, epochs=2)
    assert u.family == "SDXL" and "SDXL model" in report
    assert {k.split(".")[0] for k in u.deltas} == {"clip_l", "clip_g"}
    assert concept_loss(out, model, vae, imgs, sdxl=True) > before * 1.01
    m = load_pack().nodes.fewshot
    m.ExportUnlearningAsLoRA().export(u, "rece/xl", "fp32")
    from safetensors.torch import load_file
    sd = load_file(str(models_dir / "loras" / "rece" / "xl_00001.safetensors"))
    assert {k.split("_text_model")[0] for k in sd} == {"lora_te1", "lora_te2"}
    if ff.REAL:
        import comfy.sd

        lora_clip = comfy.sd.load_lora_for_models(None, clip, dict(sd), 0.0, 1.0)[1]
        assert set(lora_clip.patcher.patches) == set(u.deltas)
        assert torch.equal(encode(lora_clip, f"a photo of a {CONCEPT}"), encode(out, f"a photo of a {CONCEPT}"))
    sd1_clip = ff.make(seed=0)[0]
    with pytest.raises(ValueError, match="1 text encoder.*SDXL model reads 2"):
        run(sd1_clip, model, vae, imgs)


def test_gradient_checkpointing_gives_the_same_result(monkeypatch):
    """With and without checkpointing the model's blocks, the trained change is bit-identical; the blocks
    really were checkpointed (real tier: ComfyUI's ResBlocks and SpatialTransformers; CI tier: the
    stand-in UNet as one block), and the loaded model is left without instance forwards."""
    if not ff.REAL:  # the stand-in UNet as one block
        monkeypatch.setattr(load_pack().nodes.host.diffusion, "_block_classes", lambda _: (("ToyUNet",), True))
    clip, model, vae = ff.make(seed=3)
    imgs = ff.images(2, 64)
    _, off, report_off = run(clip, model, vae, imgs, epochs=1, gradient_checkpointing=False)
    _, on, report_on = run(clip, model, vae, imgs, epochs=1, gradient_checkpointing=True)
    n = int(report_on.split("gradient checkpointing: ")[1].split(" ")[0])
    assert n >= (8 if ff.REAL else 1) and "gradient checkpointing: off" in report_off
    assert off.epoch_losses == on.epoch_losses
    assert all(torch.equal(off.deltas[k], on.deltas[k]) for k in off.deltas)
    assert not any("forward" in vars(mod) for mod in model.model.modules())
    with pytest.raises(ValueError, match="gradient_checkpointing must be true or false"):
        run(clip, model, vae, imgs, epochs=1, gradient_checkpointing="yes")


def test_bf16_autocast_runs_close_to_float32_with_float32_masters(monkeypatch):
    """precision=bf16: the models run under bfloat16 autocast, the trained masters stay float32, the concept
    loss still goes up and the change stays close to the float32 run's."""
    m = load_pack().nodes.fewshot
    seen = []
    real_unlearn = m.unlearn

    def spy(*args, **kwargs):
        result = real_unlearn(*args, **kwargs)
        seen.append((kwargs["autocast_dtype"], {v.dtype for v in result.trained.values()}))
        return result

    monkeypatch.setattr(m, "unlearn", spy)
    clip, model, vae = ff.make(seed=5)
    imgs = ff.images(2, 64)
    before = concept_loss(clip, model, vae, imgs)
    _, f32, _ = run(clip, model, vae, imgs, epochs=2)
    out, bf16, report = run(clip, model, vae, imgs, epochs=2, precision="bf16")
    assert seen == [(None, {torch.float32}), (torch.bfloat16, {torch.float32})]
    assert "precision: bf16" in report and all(d.dtype == torch.float32 for d in bf16.deltas.values())
    assert concept_loss(out, model, vae, imgs) > before * 1.01
    a = torch.cat([f32.deltas[k].flatten() for k in f32.deltas])
    b = torch.cat([bf16.deltas[k].flatten() for k in f32.deltas])
    cos = float(a @ b / (a.norm() * b.norm()))
    assert cos > 0.9 and 0.8 < float(b.norm() / a.norm()) < 1.25, (cos, float(b.norm() / a.norm()))
    assert bf16.epoch_losses == pytest.approx(f32.epoch_losses, rel=0.05)
    with pytest.raises(ValueError, match="precision must be one of float32, bf16"):
        run(clip, model, vae, imgs, epochs=1, precision="fp8")


def test_low_vram_keeps_the_models_blocks_in_cpu_memory_and_gives_the_same_result(monkeypatch):
    """low_vram=on: the frozen model's checkpoint blocks are held in CPU memory and moved to the compute device
    block by block (recomputed in the backward pass, so on even with gradient_checkpointing off); the trained
    change is bit-identical to the run that holds every weight on the device."""
    diffusion = load_pack().nodes.host.diffusion
    if not ff.REAL:  # the stand-in UNet as one block
        monkeypatch.setattr(diffusion, "_block_classes", lambda _: (("ToyUNet",), True))
    clip, model, vae = ff.make(seed=4)
    imgs = ff.images(2, 64)
    moved = []
    real_checkpointed = diffusion.checkpointed

    def spy(blocks, device=None):
        moved.append((len(blocks), device))
        return real_checkpointed(blocks, device=device)

    monkeypatch.setattr(diffusion, "checkpointed", spy)
    _, held, report_held = run(clip, model, vae, imgs, epochs=1, gradient_checkpointing=False, low_vram="off")
    _, streamed, report = run(clip, model, vae, imgs, epochs=1, gradient_checkpointing=False, low_vram="on")
    assert moved[0] == (0, None) and moved[1][0] >= (8 if ff.REAL else 1) and moved[1][1] is not None
    assert "low VRAM" in report and "low VRAM" not in report_held
    assert streamed.epoch_losses == held.epoch_losses
    assert all(torch.equal(held.deltas[k], streamed.deltas[k]) for k in held.deltas)
    den = diffusion.Denoiser(model, torch.device("cpu"), offload=True)
    in_blocks = {".".join(filter(None, ("m.diffusion_model", n, p)))
                 for n, m in den.module.diffusion_model.named_modules()
                 if any(m is b for b in den.blocks) for p, _ in m.named_parameters()}
    assert in_blocks and all(den.params[k].device.type == "cpu" for k in in_blocks)
    with pytest.raises(ValueError, match="low_vram must be one of auto, on, off"):
        run(clip, model, vae, imgs, epochs=1, low_vram="yes")


def _merged(model, key: str, delta: torch.Tensor):
    """A fresh copy of ``model``'s module whose ``key`` weight has ``delta`` added, in a new patcher."""
    import copy

    import comfy.model_patcher
    import comfy.utils

    module = copy.deepcopy(model.model)
    with torch.no_grad():
        comfy.utils.get_attr(module, key).add_(delta)
    return comfy.model_patcher.ModelPatcher(module, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def test_trains_against_the_model_as_patched_whether_or_not_it_is_loaded():
    """A LoRA-like patch on the MODEL (not loaded, so not in its weights) is seen by the loss exactly as if it
    were merged into the weights; the loaded model stays bit-identical and unpatched."""
    clip, model, vae = ff.make(seed=6)
    imgs = ff.images(2, 64)
    key = next(k for k, v in model.model.state_dict().items()
               if k.startswith("diffusion_model.") and k.endswith("weight") and v.ndim == 2 and "to_v" in k)
    w = model.model.state_dict()[key]
    delta = 0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(9)) * w.std()
    patched = model.clone()
    patched.add_patches({key: ("diff", (delta,))}, 1.0)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    _, on_patch, _ = run(clip, patched, vae, imgs, epochs=1)
    _, on_merged, _ = run(clip, _merged(model, key, delta), vae, imgs, epochs=1)
    _, on_plain, _ = run(clip, model, vae, imgs, epochs=1)
    assert on_patch.epoch_losses == pytest.approx(on_merged.epoch_losses, rel=1e-5)
    assert on_patch.epoch_losses != pytest.approx(on_plain.epoch_losses, rel=1e-3)  # the patch matters
    for k in on_patch.deltas:
        torch.testing.assert_close(on_patch.deltas[k], on_merged.deltas[k], rtol=1e-4, atol=1e-9)
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())


@pytest.mark.skipif(ff.REAL, reason="CI tier: the GGUF stand-in's layers on the stand-in UNet; the real tier loads "
                                    "a GGUF file with ComfyUI-GGUF (tests/real/test_gguf_comfyui.py)")
def test_trains_through_a_gguf_quantized_unet():
    """The UNet's text readers as ComfyUI-GGUF's Q8_0 layers: the run equals the run on a float model holding
    the dequantized weights, and the GGUF weights are left as they were."""
    import copy

    import comfy.model_patcher
    from gguf_standin import GGMLLinear, dequantize_tensor, gguf_tensor

    clip, model, vae = ff.make(seed=7)
    imgs = ff.images(2, 64)
    plain = copy.deepcopy(model.model)
    quantized = copy.deepcopy(model.model)
    for name in ("to_k", "to_v"):  # the text readers ([16, 32]: Q8_0 blocks are 32 wide)
        w = getattr(model.model.diffusion_model, name).weight.detach()
        t = gguf_tensor(w, "Q8_0")
        setattr(quantized.diffusion_model, name, GGMLLinear(t))
        with torch.no_grad():
            getattr(plain.diffusion_model, name).weight.copy_(dequantize_tensor(t, torch.float32).as_subclass(torch.Tensor))
    patcher = lambda m: comfy.model_patcher.ModelPatcher(m, load_device=torch.device("cpu"),  # noqa: E731
                                                         offload_device=torch.device("cpu"))
    stored = {n: p.as_subclass(torch.Tensor).clone() for n, p in quantized.named_parameters()}
    _, on_gguf, _ = run(clip, patcher(quantized), vae, imgs, epochs=1)
    _, on_float, _ = run(clip, patcher(plain), vae, imgs, epochs=1)
    assert on_gguf.epoch_losses == pytest.approx(on_float.epoch_losses, rel=1e-6)
    for k in on_gguf.deltas:
        torch.testing.assert_close(on_gguf.deltas[k], on_float.deltas[k], rtol=1e-5, atol=1e-10)
    assert all(torch.equal(stored[n], p.as_subclass(torch.Tensor)) for n, p in quantized.named_parameters())


@pytest.mark.skipif(not ff.REAL, reason="real tier: ComfyUI's own partial (low-VRAM) load of a patched model")
def test_a_partially_loaded_patched_model_is_read_with_its_patch_once():
    """ComfyUI's low-VRAM load leaves a patched weight unmerged and applies the patch in the layer's forward
    (``weight_function``). The training copy must compute with the patch once, as ComfyUI samples: the same
    denoised output as from the model not loaded at all, and as ComfyUI's own partially loaded forward."""
    diffusion = load_pack().nodes.host.diffusion
    _, model, _ = ff.make(seed=2)
    key = next(k for k in model.model.state_dict() if k.endswith("attn2.to_v.weight"))
    w = model.model.state_dict()[key]
    delta = torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) * w.std()
    patched = model.clone()
    patched.add_patches({key: ("diff", (delta,))}, 1.0)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, ff.WIDTH, generator=g)
    sigma = torch.tensor([2.0])
    with torch.inference_mode():
        reference = diffusion.Denoiser(patched, torch.device("cpu")).denoised(x, sigma, cond)
    patched.load(torch.device("cpu"), lowvram_model_memory=1)  # ComfyUI's partial load: nothing fits
    try:
        layer = comfy_layer(patched, key)
        assert layer.weight_function and layer.comfy_cast_weights  # the patch lives in the forward now
        with torch.inference_mode():
            comfy_out = patched.model.apply_model(x, sigma, c_crossattn=cond)
            ours = diffusion.Denoiser(patched, torch.device("cpu")).denoised(x, sigma, cond)
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
        torch.testing.assert_close(ours, comfy_out.float(), rtol=1e-5, atol=1e-6)
        assert layer.weight_function and layer.comfy_cast_weights  # and the loaded layer was left as it was
    finally:
        patched.unpatch_model()


def comfy_layer(model, key: str):
    import comfy.utils

    return comfy.utils.get_attr(model.model, key.rsplit(".", 1)[0])
