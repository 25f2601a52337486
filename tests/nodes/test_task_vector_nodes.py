"""Task Vector Erase Concept and Diverse Inversion through ComfyUI's interfaces (stand-in in CI, real with
COMFYUI_PATH is covered by tests/real/test_task_vector_comfyui.py). Nodes run under inference mode, as
ComfyUI's executor runs them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfy.model_management
import comfy.utils
from conftest import COMFYUI_PATH, load_pack
from measure import rel

pytestmark = pytest.mark.skipif(bool(COMFYUI_PATH), reason="CI tier (seeded toy MODEL/CLIP/VAE); the real tier "
                                "runs tests/real/test_task_vector_comfyui.py")

pack = load_pack()
from rece_comfyui.nodes import task_vector as tvn  # noqa: E402
from rece_comfyui.nodes.host.diffusion import Denoiser  # noqa: E402
from rece_comfyui.rece_core.diverse_inversion import make_probe, neutral_loss, set_losses  # noqa: E402

if not COMFYUI_PATH:
    from tv_factory import CLIP, VAE, concept_images, make_model

ERASE = dict(concept="nudity", task_vector_from=tvn.FINETUNE, alpha=0.0, steps=20, lr=5e-3, adapter="lora", rank=4,
             images=4, image_size=64, sample_steps=4, inversions=3, inversion_steps=20, inversion_lr=0.1,
             layer_fraction=1.0,
             seed=0)
INVERT = dict(concept="nudity", count=3, steps=20, lr=5e-2, diversity=0.1, images=4, image_size=64, sample_steps=4,
              alpha_max=4.0, filename_prefix="rece/di", seed=0)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}, {k: list(v) for k, v in
                                                                                 model.patches.items()}


def unchanged(model, snap) -> bool:
    state, patches = snap
    return model.patches == patches and all(torch.equal(state[k], v) for k, v in model.model.state_dict().items()) \
        and all(p.grad is None for p in model.model.parameters())


def weights(model):
    from factory import effective_weights

    return effective_weights(model, [k for k in model.model.state_dict() if k.startswith("diffusion_model.")])


def concept_losses(model, clip, vae, image, deltas: dict, signs) -> list[float]:
    """The neutral-prompt denoising loss of the concept images (16 probes, 3 seeded) with ``θ + s·Δ`` for each
    sign ``s`` (0: the model itself)."""
    with torch.inference_mode(False):
        den = Denoiser(model, torch.device("cpu"))
        probe = make_probe(model.model.process_latent_in(vae.encode(image)), 16, 3)
        neutral = clip.encode_from_tokens(clip.tokenize("")).detach()
        return [neutral_loss(neutral, den.loss({k: den.weight(k) + s * d for k, d in deltas.items()} if s else None),
                             probe) for s in signs]

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    saved = {}
    for name in ("loras", "embeddings", "rece"):
        (root / name).mkdir()
        saved[name] = folder_paths.folder_names_and_paths.get(name)
        folder_paths.folder_names_and_paths[name] = ([str(root / name)], {".safetensors"})
    yield root
    for name, value in saved.items():
        if value is None:
            folder_paths.folder_names_and_paths.pop(name, None)
        else:
            folder_paths.folder_names_and_paths[name] = value


@pytest.fixture(scope="module")
def sd(folders):
    return make_model(), CLIP(), VAE(), concept_images()


@pytest.fixture(scope="module")
def erased(sd):
    model, clip, vae, image = sd
    snap = snapshot(model)
    with torch.inference_mode():
        out = tvn.TaskVectorEraseConcept().erase(model, clip, vae=vae, image=image, **ERASE)
    assert unchanged(model, snap)
    return out


def test_registered_with_exact_display_names():
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["RECETaskVectorEraseConcept"] == "Task Vector Erase Concept"
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["RECEDiverseInversion"] == "Diverse Inversion"
    assert tvn.TaskVectorEraseConcept.RETURN_TYPES == ("MODEL", "LORA_MODEL", "FLOAT", "STRING")


def test_an_existing_lora_is_subtracted_at_alpha(sd, folders):
    model, clip, _, _ = sd
    keys = [k for k in model.model.state_dict() if k.endswith(".weight") and ("attn2.to_" in k or "out.0." in k)]
    g = torch.Generator().manual_seed(9)
    lora, deltas = {}, {}
    for k in keys:
        w = model.model.state_dict()[k]
        name = "lora_unet_" + k.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_")
        up = 0.1 * torch.randn(w.shape[0], 2, *([1] * (w.ndim - 2)), generator=g)
        down = torch.randn(2, *w.shape[1:], generator=g)
        lora |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(1.0)}
        deltas[k] = 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    save_file(lora, str(folders / "loras" / "concept.safetensors"))
    snap = snapshot(model)
    with torch.inference_mode():
        edited, tau, alpha, report = tvn.TaskVectorEraseConcept().erase(
            model, clip, **(ERASE | dict(task_vector_from="concept.safetensors", alpha=1.3)))["result"]
    assert unchanged(model, snap) and edited is not model and alpha == 1.3
    assert tau.keys() == lora.keys() and all(torch.equal(tau[k], lora[k]) for k in lora)
    base, after = weights(model), weights(edited)
    for k in base:
        expected = base[k].double() - 1.3 * deltas[k].double() if k in deltas else base[k].double()
        assert rel(after[k], expected) < 1e-6, k
    assert "concept.safetensors" in report


def test_the_fine_tune_is_the_task_vector_and_the_model_computes_theta_minus_alpha_tau(sd, erased):
    model, clip, vae, image = sd
    edited, tau, alpha, report = erased["result"]
    assert 0 < alpha <= 4.0 and "stops reaching the concept" in report
    base, after = weights(model), weights(edited)
    layers = {k.removesuffix(".lora_up.weight") + ".weight" for k in tau if k.endswith(".lora_up.weight")}
    assert layers == {k for k in base if "transformer_blocks" in k and k.endswith(".weight")}
    deltas = {}
    for k in layers:
        b = k.removesuffix(".weight")
        deltas[k] = (tau[f"{b}.alpha"] / 4) * tau[f"{b}.lora_up.weight"] @ tau[f"{b}.lora_down.weight"]
        assert rel(after[k], base[k].double() - alpha * deltas[k].double()) < 1e-5
    assert all(torch.equal(after[k], base[k]) for k in base if k not in layers)
    # τ is a move toward the concept: θ + τ denoises the concept latents better than θ, θ − τ worse
    plain, plus, minus = concept_losses(model, clip, vae, image, deltas, (0, 1, -1))
    assert plus < plain < minus


def test_a_full_weight_fine_tune_is_a_diff_task_vector(sd):
    """adapter "full weights": τ is the change of the trained layers themselves, as ComfyUI's ``.diff`` keys."""
    model, clip, vae, image = sd
    with torch.inference_mode():
        edited, tau, alpha, report = tvn.TaskVectorEraseConcept().erase(
            model, clip, vae=vae, image=image, **(ERASE | dict(adapter="full weights", alpha=0.5, steps=8, lr=1e-3)))[
            "result"]
    base, after = weights(model), weights(edited)
    assert all(k.endswith(".diff") for k in tau) and "fine-tuned full weights" in report
    deltas = {k.removesuffix(".diff") + ".weight": d for k, d in tau.items()}
    assert set(deltas) == {k for k in base if "transformer_blocks" in k and k.endswith(".weight")}
    for k, d in deltas.items():
        assert rel(after[k], base[k].double() - 0.5 * d.double()) < 1e-6
    plain, plus = concept_losses(model, clip, vae, image, deltas, (0, 1))
    assert plus < plain


def test_same_seed_same_task_vector_and_alpha(sd, erased):
    model, clip, vae, image = sd
    with torch.inference_mode():
        again = tvn.TaskVectorEraseConcept().erase(model, clip, vae=vae, image=image, **ERASE)["result"]
    first = erased["result"]
    assert again[2] == first[2] and all(torch.equal(again[1][k], first[1][k]) for k in first[1])


def test_a_lora_file_of_the_same_tau_gets_the_same_alpha_from_diverse_inversion(sd, erased, folders):
    """The fine-tune's τ saved as a LoRA file and subtracted with α = 0: the same α and the same model."""
    model, clip, vae, image = sd
    save_file(erased["result"][1], str(folders / "loras" / "tau.safetensors"))
    with torch.inference_mode():
        edited, _, alpha, report = tvn.TaskVectorEraseConcept().erase(
            model, clip, vae=vae, image=image, **(ERASE | dict(task_vector_from="tau.safetensors")))["result"]
    assert alpha == erased["result"][2] and "the LoRA tau.safetensors" in report
    ours, theirs = weights(edited), weights(erased["result"][0])
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_layer_subset_edits_only_the_top_ranked_layers(sd, erased):
    model, clip, vae, image = sd
    with torch.inference_mode():
        out = tvn.TaskVectorEraseConcept().erase(model, clip, vae=vae, image=image,
                                                 **(ERASE | dict(layer_fraction=0.5)))
    ui = out["ui"]["rece_report"][0]
    assert 1 <= ui["edited"] < ui["layers"]
    changed = {k for k, w in weights(out["result"][0]).items() if not torch.equal(w, weights(model)[k])}
    assert changed == {k for k, _ in ui["ranking"][:ui["edited"]]}


def test_diverse_inversion_reaches_the_concept_and_alpha_raises_it_back(sd, erased, folders):
    model, clip, vae, image = sd
    snap = snapshot(model)
    with torch.inference_mode():
        out = tvn.DiverseInversion().invert(model, clip, task_vector=erased["result"][1], vae=vae, image=image,
                                            **INVERT)
    cond, alpha, ranking, report = out["result"]
    ui = out["ui"]["rece_report"][0]
    assert unchanged(model, snap) and ui["found"] and 0 < alpha <= 4.0
    assert len(cond) == 3 and len(ui["embeddings"]) == 3 and ranking.count("\n") >= 5
    for name in ui["embeddings"]:
        saved = load_file(str(folders / "embeddings" / f"{name}.safetensors"))
        assert list(saved) == ["clip_l"] and saved["clip_l"].shape == (1, 32)  # what load_embed reads
    with torch.inference_mode(False):
        den = Denoiser(model, torch.device("cpu"))
        probe = make_probe(model.model.process_latent_in(vae.encode(image)), tvn.PROBE_SAMPLES, 1)
        conds = torch.cat([c[0] for c in cond])
        neutral = neutral_loss(clip.encode_from_tokens(clip.tokenize("")).detach(), den.loss(), probe)
        base = set_losses(conds, den.loss(), probe)
        taus = tvn.tau_of(den, tvn.lora_patches(model, erased["result"][1], "tau"))
        at = set_losses(conds, den.loss({k: den.weight(k) - alpha * d for k, d in taus.items()}), probe)
        just_below = set_losses(conds, den.loss({k: den.weight(k) - (alpha - 0.05) * d for k, d in taus.items()}),
                                probe)
    assert bool((base < neutral).all())        # every embedding draws the concept better than the empty prompt
    assert bool((at >= neutral).all())         # at α none does
    assert bool((just_below < neutral).any())  # and α is the first such strength (within the search's tolerance)


def test_cancel_stops_diverse_inversion_within_a_step(sd):
    model, clip, vae, image = sd
    snap = snapshot(model)
    calls = []

    def hook(value, total, preview, node_id=None):
        calls.append(value)
        if len(calls) == 3:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException), torch.inference_mode():
            tvn.DiverseInversion().invert(model, clip, vae=vae, image=image, **(INVERT | dict(steps=50)))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert len(calls) <= 5 and unchanged(model, snap)


@pytest.mark.parametrize("change, message", [
    (dict(concept="  "), "enter the concept"),
    (dict(alpha=1.0, layer_fraction=0.5), "layer subset"),
    (dict(alpha=float("nan")), "alpha must be a finite number"),
    (dict(task_vector_from="missing.safetensors", alpha=1.0), "no such file"),
    (dict(task_vector_from="concept.ckpt", alpha=1.0), "only .safetensors"),
])
def test_bad_input_is_a_clear_error(sd, change, message):
    model, clip, _, _ = sd
    with pytest.raises(ValueError, match=message), torch.inference_mode():
        tvn.TaskVectorEraseConcept().erase(model, clip, **(ERASE | change))


def test_a_lora_for_another_model_and_an_image_without_vae_are_refused(sd, folders):
    model, clip, _, image = sd
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 4)},
              str(folders / "loras" / "flux.safetensors"))
    with pytest.raises(ValueError, match="holds no layer of this model"), torch.inference_mode():
        tvn.TaskVectorEraseConcept().erase(model, clip,
                                           **(ERASE | dict(task_vector_from="flux.safetensors", alpha=1.0)))
    with pytest.raises(ValueError, match="VAE"), torch.inference_mode():
        tvn.DiverseInversion().invert(model, clip, image=image, **INVERT)


def test_training_refuses_an_sdxl_unet_clearly(sd):
    model, clip, vae, image = sd
    sdxl = make_model()
    sdxl.model.diffusion_model.num_classes = "sequential"  # SDXL's UNet reads pooled text and sizes (y)
    with pytest.raises(ValueError, match="not supported yet"), torch.inference_mode():
        tvn.TaskVectorEraseConcept().erase(sdxl, clip, vae=vae, image=image, **ERASE)


def test_diverse_inversion_refuses_a_clip_with_several_encoders(sd):
    model, clip, vae, image = sd

    class TwoEncoders:
        cond_stage_model = type("SDXLClipModel", (), {})()
        tokenizer = clip.tokenizer

        def tokenize(self, text):
            return clip.tokenize(text)

    with pytest.raises(ValueError, match="single CLIP text encoder"), torch.inference_mode():
        tvn.DiverseInversion().invert(model, TwoEncoders(), vae=vae, image=image, **INVERT)


def test_sampling_that_only_subclasses_eps_v_or_flow_is_refused_not_mistaken():
    """ComfyUI's EDM subclasses V_PREDICTION and X0 subclasses EPS, yet neither's target is v or ε: every
    training method (task vectors, few-shot) refuses them by name instead of computing the wrong loss."""
    from rece_comfyui.nodes.host.diffusion import parameterisation

    class EPS: ...
    class V_PREDICTION(EPS): ...
    class CONST: ...
    class EDM(V_PREDICTION): ...
    class X0(EPS): ...

    assert [parameterisation(c()) for c in (EPS, V_PREDICTION, CONST)] == ["eps", "v", "flow"]
    for cls in (EDM, X0):
        with pytest.raises(ValueError, match=f"predicts with {cls.__name__} sampling"):
            parameterisation(cls())
