"""ConceptPrune nodes through ComfyUI's sampling (stand-in ``comfy.sample`` in CI, ComfyUI's own with COMFYUI_PATH).

CI tier: a tiny seeded UNet with ComfyUI's key names (``tests/prune_factory.py``), sampled by the
stand-in's Euler loop. Real tier: ComfyUI's own SD1.5 model class (small channels, seeded) and its
own SD1 CLIP, sampled by ``comfy.sample.sample`` / ComfyUI's KSampler.
"""

from __future__ import annotations

import os

import pytest
import torch

import comfy.model_management
import comfy.sample
import comfy.utils
from conftest import load_pack
from factory import effective_weights
from literal_prune import literal_masks, literal_record

pack = load_pack()
from rece_comfyui.nodes import conceptprune as cp  # noqa: E402
from rece_comfyui.nodes.rece import RECEEraseConcept  # noqa: E402
from rece_comfyui.rece_core.prune import ColumnStats, build_result, pruned, union_mask  # noqa: E402
from measure import rel, state_hash as fingerprint  # noqa: E402

REAL = bool(os.environ.get("COMFYUI_PATH"))
BASE = "a photo of a cat\na photo of a dog\na photo of a house"
CONCEPT = "a cat in the style of {concept}\na dog in the style of {concept}\na house in the style of {concept}"
ARGS = dict(concepts="Van Gogh", concept_kind="custom", skill_ratio=0.05, tau=2, steps=4, seed=0, cfg=7.5,
            sampler_name="euler", scheduler="normal", size=64, base_prompts=BASE, concept_prompts=CONCEPT, batch=0)


@pytest.fixture(scope="module")
def loaded():
    if REAL:
        from prune_factory import real_sd15

        return real_sd15()
    from factory import FakeCLIP
    from prune_factory import make_sampling_model

    return make_sampling_model(), FakeCLIP("tiny")


def run(model, clip, **kw):
    out = cp.ConceptPruneEraseConcept().prune(model, clip, **(ARGS | kw))
    return out["result"], out["ui"]


def ffn_keys(model):
    return cp.ffn_layers(model, "test")[1]


def sample(model, clip, prompt: str, steps: int = 4) -> torch.Tensor:
    """KSampler on ``prompt`` (ComfyUI's own node in the real tier, the stand-in's comfy.sample in CI)."""
    if REAL:
        import nodes as comfy_nodes

        pos = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
        neg = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        with torch.inference_mode():
            return comfy_nodes.KSampler().sample(model, 7, steps, 7.5, "euler", "normal", pos, neg, latent)[0][
                "samples"].float()
    arch = cp.ffn_layers(model, "test")[0]
    pos, neg = [list(cp._encode(clip, prompt, arch))], [list(cp._encode(clip, "", arch))]
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 7)
    return comfy.sample.sample(model, noise, steps, 7.5, "euler", "normal", pos, neg, latent).float()


def masks_of(result) -> dict[str, torch.Tensor]:
    out = {}
    for key, (o, i) in result.shapes.items():
        m = torch.zeros(o * i, dtype=torch.bool)
        m[result.indices[key]] = True
        out[key] = m.reshape(o, i)
    return out


def test_mask_equals_the_authors_steps_on_the_recorded_activations(loaded):
    """Raw activations recorded by our own hooks during the node's sampling, run through a literal
    transcription of the authors' steps 2–4, give the node's mask."""
    model, clip = loaded
    keys = ffn_keys(model)
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    handles = [comfy.utils.get_attr(model.model, k.removesuffix(".weight")).register_forward_pre_hook(
        lambda m, args, k=k: seen[k].append(args[0].detach().float().clone())) for k in keys]
    try:
        (_, result, _), _ = run(model, clip)
    finally:
        for h in handles:
            h.remove()
    tau = ARGS["tau"]
    w = effective_weights(model, keys)
    total = 0
    for key in keys:
        # one forward per step (cond and uncond batched): base sampler call then concept sampler call
        assert len(seen[key]) == 2 * tau, "the literal reading expects one forward per step"
        base = literal_record([(i, key, x) for i, x in enumerate(seen[key][:tau])])
        target = literal_record([(i, key, x) for i, x in enumerate(seen[key][tau:])])
        want = literal_masks(w[key].abs(), base, target, key, tau, ARGS["skill_ratio"])
        got = masks_of(result)[key]
        assert torch.equal(got, want), key
        total += int(got.sum())
    assert total > 0


def full_one_by_one(model, clip):
    """The authors' procedure: every prompt alone, every step run; masks from the statistics of steps < τ."""
    arch, keys = cp.ffn_layers(model, "test")
    encode = lambda texts: [cp._encode(clip, t, arch) for t in texts]  # noqa: E731
    base = encode(BASE.splitlines())
    concept = encode([c.replace("{concept}", "Van Gogh") for c in CONCEPT.splitlines()])
    negative = [list(cp._encode(clip, "", arch))]
    recorder = cp.Recorder(model, arch, keys, lambda: None)
    stats = {"base": ColumnStats(), "concept": ColumnStats()}
    try:
        for side, items in (("base", base), ("concept", concept)):
            cp.record(model, recorder, [[x] for x in items], negative, steps=ARGS["steps"], last_step=None,
                      cfg=ARGS["cfg"], sampler_name="euler", scheduler="normal", seed=0, size=64, stats=stats[side],
                      progress=lambda: None)
    finally:
        recorder.remove()
    w = effective_weights(model, keys)
    masks = {k: union_mask(w[k], stats["concept"], stats["base"], k, ARGS["tau"], ARGS["skill_ratio"]) for k in keys}
    return masks, stats, w, recorder.calls


def borderline(w, stats, key, row, col, tau, ratio, tol=1e-5) -> bool:
    """Whether weight ``(row, col)``'s decision sits within float rounding of a boundary at some step < τ:
    the concept's and the base's score equal, or the concept's score equal to its row's k-th / (k+1)-th."""
    k = int(ratio * w.shape[1])
    for t in range(tau):
        s_c = w[row].abs().double() * stats["concept"].norms(t, key)
        s_b = w[row, col].abs().double() * stats["base"].norms(t, key)[col]
        edge = torch.topk(s_c, k + 1).values[-2:]
        if abs(s_c[col] - s_b) <= tol * s_b or bool(((s_c[col] - edge).abs() <= tol * edge).any()):
            return True
    return False


def test_stopped_at_tau_equals_the_full_run_and_batching_only_moves_ties(loaded):
    """Stopping at τ changes nothing (bit-exact); batching the prompts changes the forward pass only by
    float rounding (CPU/GPU kernels differ with the batch size), so a batched mask may differ from the
    one-by-one mask only at weights whose decision is a tie within that rounding."""
    model, clip = loaded
    want, stats, w, full_calls = full_one_by_one(model, clip)
    (_, one_by_one, _), ui_one = run(model, clip, batch=1)
    assert all(torch.equal(masks_of(one_by_one)[k], want[k]) for k in want)
    assert sum(int(m.sum()) for m in want.values()) > 0
    (_, batched, report), ui = run(model, clip)
    got = masks_of(batched)
    moved = [(k, int(r), int(c)) for k in want for r, c in (got[k] ^ want[k]).nonzero()]
    assert len(moved) <= 1e-3 * batched.pruned_count
    assert all(borderline(w[k], stats, k, r, c, ARGS["tau"], ARGS["skill_ratio"]) for k, r, c in moved)
    calls = ui["rece_report"][0]["forward_calls"]
    assert calls == 2 * ARGS["tau"] < ui_one["rece_report"][0]["forward_calls"] == 6 * ARGS["tau"] < full_calls
    assert full_calls == 6 * ARGS["steps"] and "forward calls" in report


def test_only_feed_forward_outputs_change_and_the_loaded_model_is_untouched(loaded):
    model, clip = loaded
    before = fingerprint(model)
    original = effective_weights(model)
    (out, result, _), _ = run(model, clip)
    assert fingerprint(model) == before
    assert effective_weights(model).keys() == original.keys()
    after = effective_weights(out)
    keys = set(ffn_keys(model))
    changed = {k for k in original if not torch.equal(after[k], original[k])}
    assert changed and changed <= keys
    for k in keys:
        assert torch.equal(after[k], pruned(original[k], result.indices[k]))


def test_the_concepts_latent_moves_under_ksampler(loaded):
    model, clip = loaded
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        (out, _, _), _ = run(model, clip)
    prompt = "a cat in the style of Van Gogh"
    before, after = sample(model, clip, prompt), sample(out, clip, prompt)
    assert rel(after, before) > 1e-3
    assert torch.equal(sample(model, clip, prompt), before)  # the loaded model still samples as before


def test_cancel_within_a_step_stops_and_removes_the_hooks(loaded):
    model, clip = loaded
    keys = ffn_keys(model)
    module = comfy.utils.get_attr(model.model, keys[-1].removesuffix(".weight"))
    calls = []

    def interrupt(m, args):
        calls.append(1)
        comfy.model_management.interrupt_current_processing(True)

    handle = module.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run(model, clip)
    finally:
        handle.remove()
        comfy.model_management.interrupt_current_processing(False)
    assert len(calls) == 1  # stopped inside the first forward, at the next layer's hook
    assert all(not comfy.utils.get_attr(model.model, k.removesuffix(".weight"))._forward_pre_hooks for k in keys)


def test_presets_and_bad_input(loaded):
    model, clip = loaded
    with pytest.raises(ValueError, match="base prompts but"):
        run(model, clip, base_prompts="a\nb")
    with pytest.raises(ValueError, match="custom kind needs"):
        run(model, clip, base_prompts="", concept_prompts="")
    with pytest.raises(ValueError, match="at least one concept"):
        run(model, clip, concepts=" \n")
    with pytest.raises(ValueError, match="more than the 4"):
        run(model, clip, tau=5)
    assert cp.settings_for("nudity", 0.0, 0) == (0.01, 9) and cp.settings_for("object", 0.0, 0) == (0.02, 10)
    base, sets = cp.prompt_sets("artist", ["Monet"], "", "", "n")
    assert len(base) == 20 and sets["Monet"][3] == "a bear in the style of Monet"


@pytest.mark.skipif(REAL, reason="CI tier: a DiT family stand-in without a forward")
def test_a_family_without_verified_feed_forward_layers_is_refused():
    from dit_factory import make_model

    with pytest.raises(ValueError, match="ConceptPrune is not available .* not verified"):
        cp.ffn_layers(make_model("lumina2"), "ConceptPrune Erase Concept")
    with pytest.raises(ValueError, match="has none of the feed-forward"):
        cp.ffn_layers(make_model("wan"), "ConceptPrune Erase Concept")


def test_save_load_apply_and_bad_file(models_dir, loaded):
    model, clip = loaded
    (out, result, _), _ = run(model, clip)
    cp.SaveConceptPrune().save(result, "rece/prune")
    name = "rece/prune_00001.safetensors"
    loaded_prune = cp.LoadConceptPrune().load(name)["result"][0]
    applied = cp.ApplyConceptPrune().apply(model, loaded_prune, 1.0)["result"][0]
    keys = ffn_keys(model)
    a, b = effective_weights(applied, keys), effective_weights(out, keys)
    assert all(torch.equal(a[k], b[k]) for k in keys)
    (models_dir / "rece" / "broken.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="broken.safetensors"):
        cp.LoadConceptPrune().load("broken.safetensors")
    other = build_result([("diffusion_model.nowhere.ff.net.2.weight", torch.ones(2, 2, dtype=torch.bool))], ["x"])
    with pytest.raises(ValueError, match="does not fit this model"):
        cp.ApplyConceptPrune().apply(model, other, 1.0)


def test_export_as_lora_applies_exactly(models_dir, loaded):
    model, clip = loaded
    (out, result, _), _ = run(model, clip)
    cp.ExportConceptPruneAsLoRA().export(out, result, "rece/prune_lora", "fp32")  # its own patch is left out
    from safetensors.torch import load_file

    lora = load_file(str(models_dir / "loras" / "rece" / "prune_lora_00001.safetensors"))
    assert all(k.endswith(".diff") for k in lora)
    keys = ffn_keys(model)
    if REAL:
        import comfy.sd

        via_lora = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)[0]
    else:
        via_lora = model.clone()
        via_lora.add_patches({f"{k.removesuffix('.diff')}.weight": (v,) for k, v in lora.items()}, 1.0)
    a, b = effective_weights(via_lora, keys), effective_weights(out, keys)
    assert all(torch.equal(a[k], b[k]) for k in keys)


def test_composes_with_rece_in_either_order(loaded):
    model, clip = loaded
    rece_args = dict(concepts="Van Gogh", guide="", preserve="", concept_kind="artistic_style", rounds=0, reg=0.1,
                     lamb=0.1, erase_scale=1.0, preserve_scale=0.1)
    erased, erasure, _ = RECEEraseConcept().erase(model, clip, **rece_args)["result"]
    # prune on an erased model: the attn2 edit stays, the prune is recorded on the erased model
    (both, result, _), _ = run(erased, clip)
    ffn = ffn_keys(model)
    e, b = effective_weights(erased), effective_weights(both)
    for k in e:
        want = pruned(e[k], result.indices[k]) if k in ffn else e[k]
        assert torch.equal(b[k], want), k
    # RECE on a pruned model: the same erasure as on the loaded model (ConceptPrune leaves attn2 alone)
    (pruned_model, first, _), _ = run(model, clip)
    erased2, erasure2, _ = RECEEraseConcept().erase(pruned_model, clip, **rece_args)["result"]
    eye = torch.eye(erasure.dim, dtype=erasure.transform.up.dtype)
    assert torch.allclose(erasure2.transform.apply_rows(eye), erasure.transform.apply_rows(eye), atol=1e-5)
    p, e2 = effective_weights(pruned_model), effective_weights(erased2)
    for k in ffn:
        assert torch.equal(e2[k], p[k])


DIT_FAMILIES = ("flux", "sd3", "wan", "qwen_image")


@pytest.mark.skipif(not REAL, reason="real tier: ComfyUI's own DiT classes sampled by comfy.sample")
@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_dit_families_record_and_prune_their_feed_forward_layers(family):
    from dit_factory import DiTCLIP, make_model
    from dit_factory import sample as dit_sample

    model, clip = make_model(family), DiTCLIP(family)
    before = fingerprint(model)
    original = effective_weights(model)
    (out, result, report), _ = run(model, clip, cfg=2.0, scheduler="simple")
    assert fingerprint(model) == before and result.pruned_count > 0 and result.architecture == family
    arch, keys = cp.ffn_layers(model, "test")
    assert family != "flux" or any(arch.ffn_columns(k, (1, 1)) for k in keys)  # single_blocks' linear2 is there
    after = effective_weights(out)
    for k in original:
        want = pruned(original[k], result.indices[k]) if k in keys else original[k]
        assert torch.equal(after[k], want), k
        cols = arch.ffn_columns(k, tuple(original[k].shape[:2])) if k in keys else None
        if cols is not None:  # Flux's linear2: the attention half is never pruned
            assert torch.equal(after[k][:, :cols[0]], original[k][:, :cols[0]])
    pos, neg = [list(cp._encode(clip, "a cat in the style of Van Gogh", arch))], [list(cp._encode(clip, "", arch))]
    assert rel(dit_sample(out, family, pos, neg), dit_sample(model, family, pos, neg)) > 1e-4


def test_progress_per_sampler_step_then_per_layer(loaded, monkeypatch):
    model, clip = loaded
    seen = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: seen.append((value, total)))
    run(model, clip)
    keys = ffn_keys(model)
    total = 2 * ARGS["tau"] + len(keys)  # two sampler calls (base, concept) × τ steps, then one tick per layer
    assert [v for v, _ in seen] == list(range(1, total + 1)) and {t for _, t in seen} == {total}
