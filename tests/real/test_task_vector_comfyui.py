"""Task Vector Erase Concept and Diverse Inversion through real ComfyUI 0.3.64 classes (real tier).

A tiny seeded SD1.5-shaped model (ComfyUI's BaseModel + UNet), ComfyUI's SD1 CLIP and a tiny VAE; every
node is run under ``torch.inference_mode()`` as ComfyUI's executor runs it.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from measure import rel, state_hash

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="real tier: set COMFYUI_PATH")

ERASE = dict(concept="nudity", alpha=1.0, steps=8, lr=5e-3, adapter="lora", rank=4, images=4, image_size=64,
             sample_steps=4,
             inversions=2, inversion_steps=6, inversion_lr=5e-2, layer_fraction=1.0, seed=0)


def fingerprint(model) -> str:
    return state_hash(model) + str(sorted(model.patches))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    saved = {}
    for name in ("loras", "embeddings", "rece"):
        (root / name).mkdir()
        saved[name] = folder_paths.folder_names_and_paths.get(name)
        folder_paths.folder_names_and_paths[name] = ([str(root / name)], {".safetensors"})
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()
    yield root
    for name, value in saved.items():
        if value is not None:
            folder_paths.folder_names_and_paths[name] = value


@pytest.fixture(scope="module")
def sd(folders):
    from tiny_sd15 import sd1_clip, tiny_model, tiny_vae

    g = torch.Generator().manual_seed(5)
    image = (0.5 + 0.3 * torch.randn(1, 64, 64, 3, generator=g)).repeat(4, 1, 1, 1)
    image = (image + 0.02 * torch.randn(4, 64, 64, 3, generator=g)).clamp(0, 1)
    return tiny_model(), sd1_clip(embedding_directory=str(folders / "embeddings")), tiny_vae(), image


@pytest.fixture(scope="module")
def pack():
    from conftest import load_pack

    load_pack()
    from rece_comfyui.nodes import task_vector

    return task_vector


def weights_of(model):
    from factory import effective_weights

    return effective_weights(model, [k for k in model.model.state_dict() if k.startswith("diffusion_model.")])


@pytest.fixture(scope="module")
def finetuned(sd, pack):
    model, clip, vae, image = sd
    with torch.inference_mode():
        out = pack.TaskVectorEraseConcept().erase(model, clip, task_vector_from=pack.FINETUNE, vae=vae, image=image,
                                                  **ERASE)
    return out["result"]


def test_a_lora_subtracted_at_alpha_equals_comfyuis_loraloader_at_minus_alpha(sd, pack, folders):
    import nodes as comfy_nodes

    model, clip, _, _ = sd
    keys = [k for k in model.model.state_dict() if k.endswith(".weight") and ("attn2.to_" in k or "ff.net.2" in k
                                                                               or "input_blocks.0.0" in k)]
    g = torch.Generator().manual_seed(9)
    lora, deltas = {}, {}
    for k in keys:
        w = model.model.state_dict()[k]
        name = "lora_unet_" + k.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_")
        up = 0.1 * torch.randn(w.shape[0], 2, *([1] * (w.ndim - 2)), generator=g)
        down = torch.randn(2, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
        lora |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(1.0)}
        deltas[k] = 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    save_file(lora, str(folders / "loras" / "concept.safetensors"))
    before = fingerprint(model)
    with torch.inference_mode():
        edited, tau, alpha, report = pack.TaskVectorEraseConcept().erase(
            model, clip, task_vector_from="concept.safetensors", **(ERASE | dict(alpha=1.3)))["result"]
        loader = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "concept.safetensors", -1.3)[0]
        from comfy_extras.nodes_train import LoraModelLoader

        from_output = LoraModelLoader().load_lora_model(model, tau, -1.3)[0]
    assert fingerprint(model) == before and alpha == 1.3
    ours, theirs, again, base = weights_of(edited), weights_of(loader), weights_of(from_output), weights_of(model)
    for k in base:
        assert torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], again[k])
    for k, d in deltas.items():  # θ − α·τ, τ the LoRA's (alpha / rank) · up @ down
        assert rel(ours[k], base[k].double() - 1.3 * d.double()) < 1e-5
    assert "concept.safetensors" in report


def test_the_fine_tune_is_the_task_vector_and_the_patched_model_computes_theta_minus_alpha_tau(sd, pack, finetuned):
    from rece_comfyui.nodes.host.diffusion import Denoiser

    model, _, vae, image = sd
    edited, tau, alpha, report = finetuned
    assert alpha == 1.0 and "fine-tuned LoRA rank 4" in report
    base, after = weights_of(model), weights_of(edited)
    layers = {k.removesuffix(".lora_up.weight") + ".weight" for k in tau if k.endswith(".lora_up.weight")}
    assert layers and all("transformer_blocks" in k for k in layers)
    for k in layers:
        b = k.removesuffix(".weight")
        d = (tau[f"{b}.alpha"] / 4) * tau[f"{b}.lora_up.weight"].double() @ tau[f"{b}.lora_down.weight"].double()
        assert rel(after[k], base[k].double() - alpha * d) < 1e-5
    # τ moved the model toward the concept images: θ + τ denoises them better than θ, θ − τ worse
    with torch.inference_mode():
        latents = model.model.process_latent_in(vae.encode(image)).float()
        with torch.inference_mode(False):
            latents = latents.clone()
            den = Denoiser(model, torch.device("cpu"))
            from rece_comfyui.rece_core.diverse_inversion import make_probe, neutral_loss

            probe = make_probe(latents, 16, 3)
            neutral = sd[1].encode_from_tokens(sd[1].tokenize("")).float().clone()
            deltas = {k: (base[k] - after[k]) / alpha for k in layers}
            plain = neutral_loss(neutral, den.loss(), probe)
            plus = neutral_loss(neutral, den.loss({k: den.weight(k) + d for k, d in deltas.items()}), probe)
            minus = neutral_loss(neutral, den.loss({k: den.weight(k) - d for k, d in deltas.items()}), probe)
    assert plus < plain < minus
    # and the patched clone, patched by ComfyUI itself, computes what θ − α·τ computes
    x, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)), den.sigmas[[200, 700]]
    with torch.inference_mode(False), torch.no_grad():
        edit = {k: den.weight(k) - alpha * d for k, d in deltas.items()}
        ours = den.denoised(x, sigma, neutral.expand(2, -1, -1), edit)
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    with torch.inference_mode():
        edited.patch_model()
        try:
            theirs = edited.model.apply_model(x, sigma, c_crossattn=neutral.expand(2, -1, -1))
        finally:
            edited.unpatch_model()
    assert rel(theirs, ours) < 1e-5
    assert all(torch.equal(state[k], v) for k, v in model.model.state_dict().items())  # restored by unpatch


def test_same_seed_same_task_vector(sd, pack, finetuned):
    model, clip, vae, image = sd
    with torch.inference_mode():
        again = pack.TaskVectorEraseConcept().erase(model, clip, task_vector_from=pack.FINETUNE, vae=vae, image=image,
                                                    **ERASE)["result"][1]
    assert again.keys() == finetuned[1].keys() and all(torch.equal(again[k], finetuned[1][k]) for k in again)


def test_diverse_inversion_embeddings_reach_the_concept_load_as_embeddings_and_alpha_raises_them_back(
        sd, pack, finetuned, folders):
    import nodes as comfy_nodes
    from rece_comfyui.nodes.host.diffusion import Denoiser, TokenEncoder
    from rece_comfyui.rece_core.diverse_inversion import make_probe, neutral_loss, set_losses

    model, clip, vae, image = sd
    tau = finetuned[1]
    before = fingerprint(model)
    with torch.inference_mode():
        out = pack.DiverseInversion().invert(model, clip, "nudity", 2, 8, 5e-2, 0.1, 4, 64, 4, 4.0, "rece/di", 0,
                                             task_vector=tau, vae=vae, image=image)
    cond, alpha, ranking, report = out["result"]
    assert fingerprint(model) == before and out["ui"]["rece_report"][0]["found"], report
    assert 0 < alpha <= 4.0 and f"from α = {alpha:.3g}" in report
    names = out["ui"]["rece_report"][0]["embeddings"]
    assert len(names) == 2 and len(cond) == 2 and ranking.count("\n") >= 1
    for i, name in enumerate(names):
        saved = load_file(str(folders / "embeddings" / f"{name}.safetensors"))
        assert list(saved) == ["clip_l"] and saved["clip_l"].shape == (1, 768)
        # ComfyUI's own embedding: syntax loads the file, and CLIPTextEncode gives the node's conditioning
        tokens = clip.tokenize(f"embedding:{name}")["l"][0]
        assert torch.equal(tokens[1][0].reshape(1, -1).float(), saved["clip_l"])
        with torch.inference_mode():
            encoded = comfy_nodes.CLIPTextEncode().encode(clip, f"embedding:{name}")[0][0][0]
        assert rel(encoded, cond[i][0]) < 1e-5
    with torch.inference_mode(False):
        den = Denoiser(model, torch.device("cpu"))
        enc = TokenEncoder(clip, "nudity", torch.device("cpu"))
        latents = model.model.process_latent_in(vae.encode(image)).float().clone()
        probe = make_probe(latents, pack.PROBE_SAMPLES, 1)
        conds = torch.cat([c[0] for c in cond]).float()
        neutral = neutral_loss(enc.text(""), den.loss(), probe)
        base = set_losses(conds, den.loss(), probe)
        taus = pack.tau_of(den, pack.lora_patches(model, tau, "tau"))
        at = set_losses(conds, den.loss({k: den.weight(k) - alpha * d for k, d in taus.items()}), probe)
    assert bool((base < neutral).all()), (base, neutral)  # each embedding reaches the concept
    assert bool((at >= neutral).all()), (at, neutral)     # and at α none does


def test_inversion_gradients_through_comfyuis_clip_match_finite_differences(sd, pack):
    """ComfyUI's CLIP adds residuals in place; with the saved tensors copied, autograd is still exact."""
    from rece_comfyui.nodes.host.diffusion import TokenEncoder

    _, clip, _, _ = sd
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode(False):
        enc = TokenEncoder(clip, "nudity", torch.device("cpu"))
        r = torch.randn(1, 77, 768, generator=g)
        u = torch.randn(1, 768, generator=g)
        v = (enc.init.unsqueeze(0) + 0.01 * torch.randn(1, 768, generator=g)).requires_grad_(True)
        with torch.enable_grad():
            (enc(v) * r).sum().backward()
        eps = 1e-2 * float(enc.init.norm()) / float(u.norm())
        with torch.no_grad():
            fd = float(((enc(v + eps * u) - enc(v - eps * u)) * r).sum()) / (2 * eps)
    assert abs(fd - float((v.grad * u).sum())) <= 0.02 * abs(fd) + 1e-6, (fd, float((v.grad * u).sum()))


def test_without_images_the_model_draws_the_concept_itself(sd, pack):
    """The paper's data: images the base model draws for the concept (ComfyUI's sampler), seeded."""
    model, clip, _, _ = sd
    before = fingerprint(model)
    settings = ERASE | dict(images=2, image_size=64, sample_steps=2, steps=2)
    with torch.inference_mode():
        a = pack.TaskVectorEraseConcept().erase(model, clip, task_vector_from=pack.FINETUNE, **settings)["result"]
        b = pack.TaskVectorEraseConcept().erase(model, clip, task_vector_from=pack.FINETUNE, **settings)["result"]
    assert "2 image(s) the model drew for 'nudity'" in a[3] and fingerprint(model) == before
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])
