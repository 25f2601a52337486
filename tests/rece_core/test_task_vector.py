"""Task vectors and Diverse Inversion on a seeded toy denoiser (pure torch, CI tier)."""

from __future__ import annotations

import math

import pytest
import torch

from rece_core.diverse_inversion import (alpha_for_set, diverse_inversion, diversity_term, make_probe,
                                         neutral_loss, set_losses)
from rece_core.task_vector import (LoRALayer, apply_task_vector, choose_alpha, lora_task_vector, rank_layers, reach,
                                   task_vector, top_layers)
from tv_toy import ToyDenoiser, ToyEncoder, concept_latents, finetune, loss_of
from measure import rel

DI = dict(n=4, steps=60, lr=5e-2, diversity=0.1, seed=0)


@pytest.fixture(scope="module")
def toy():
    model, enc, lat = ToyDenoiser(0), ToyEncoder(0), concept_latents()
    base = {k: p.detach().clone() for k, p in model.named_parameters()}
    ft = finetune(model, lat, enc.neutral(), steps=30, lr=3e-3, frozen=("to_q.weight",))
    return model, enc, lat, base, ft


@pytest.fixture(scope="module")
def inverted(toy):
    model, enc, lat, _, _ = toy
    return diverse_inversion(enc, loss_of(model), lat, enc.word, **DI)


def edited(model, base, tau, alpha, keys=None):
    return loss_of(model, {**base, **apply_task_vector(base, tau, alpha, keys)})


def test_tau_is_exactly_what_the_fine_tune_changed(toy):
    model, _, _, base, ft = toy
    tau = task_vector(base, ft)
    assert "to_q.weight" not in tau  # frozen in the fine-tune: no delta
    assert set(tau) == {k for k in base if not torch.equal(base[k], ft[k])}
    for k, d in tau.items():
        assert torch.equal(d, ft[k] - base[k])
    # θ − (−1)·τ is the fine-tune; θ − 0·τ the base
    assert all(torch.allclose(w, ft[k], atol=1e-7) for k, w in apply_task_vector(base, tau, -1.0).items())
    assert all(torch.equal(w, base[k]) for k, w in apply_task_vector(base, tau, 0.0).items())


def test_theta_minus_alpha_tau_matches_the_authors_scaling_literally(toy):
    """save_tv.py: new = pretrained + scaling_coef · (−(finetuned − pretrained)), in float64 here."""
    _, _, _, base, ft = toy
    tau = task_vector(base, ft)
    out = apply_task_vector(base, tau, 1.75)
    for k in tau:
        literal = base[k].double() + 1.75 * (-(ft[k].double() - base[k].double()))
        assert rel(out[k], literal) < 1e-6


def test_task_vector_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        task_vector({"w": torch.zeros(2, 3)}, {"w": torch.zeros(3, 2)})


def test_lora_layer_delta_is_the_kohya_formula():
    g = torch.Generator().manual_seed(3)
    up, down = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    layer = LoRALayer(up, down, alpha=1.0, shape=(6, 5))
    assert rel(layer.delta(), (1.0 / 2) * up.double() @ down.double()) < 1e-6
    conv = LoRALayer(torch.randn(6, 2, 1, 1, generator=g), torch.randn(2, 5, 3, 3, generator=g), None, (6, 5, 3, 3))
    assert conv.delta().shape == (6, 5, 3, 3)
    assert set(lora_task_vector({"a": layer, "b": conv})) == {"a", "b"}


def test_diverse_inversion_lowers_the_concept_loss_below_the_neutral_prompt(toy, inverted):
    model, enc, lat, _, _ = toy
    probe = make_probe(lat, 32, seed=1)
    neutral = neutral_loss(enc.neutral(), loss_of(model), probe)
    start = set_losses(enc(enc.word.expand(DI["n"], -1)), loss_of(model), probe)  # the concept word itself
    learned = set_losses(enc(inverted.embeddings), loss_of(model), probe)
    assert bool((learned < 0.9 * neutral).all()), (learned, neutral)
    assert bool((learned < start).all())


def test_chosen_alpha_raises_every_embedding_back_to_the_neutral_loss(toy, inverted):
    model, enc, lat, base, ft = toy
    tau = task_vector(base, ft)
    probe = make_probe(lat, 32, seed=1)
    search, l0, base_losses = alpha_for_set(lambda a: edited(model, base, tau, a), enc, inverted.embeddings,
                                            enc.neutral(), probe, alpha_max=4.0, tolerance=0.01)
    assert search.found and 0 < search.alpha <= 4.0
    at = set_losses(enc(inverted.embeddings), edited(model, base, tau, search.alpha), probe)
    assert bool((at >= l0).all())  # no embedding denoises the concept better than the empty prompt did
    below = set_losses(enc(inverted.embeddings), edited(model, base, tau, search.alpha - 0.02), probe)
    assert bool((below < l0).any())  # and a smaller α leaves one that still does
    assert bool((base_losses < l0).all())


def test_same_seed_same_set_and_another_seed_another(toy):
    model, enc, lat, _, _ = toy
    kw = DI | dict(steps=10)
    a = diverse_inversion(enc, loss_of(model), lat, enc.word, **kw)
    b = diverse_inversion(enc, loss_of(model), lat, enc.word, **kw)
    c = diverse_inversion(enc, loss_of(model), lat, enc.word, **(kw | dict(seed=1)))
    assert torch.equal(a.embeddings, b.embeddings) and a.losses == b.losses
    assert not torch.allclose(a.embeddings, c.embeddings)


def test_diversity_term_keeps_the_set_apart(toy):
    model, enc, lat, _, _ = toy
    kw = DI | dict(steps=30)
    plain = diverse_inversion(enc, loss_of(model), lat, enc.word, **(kw | dict(diversity=0.0)))
    diverse = diverse_inversion(enc, loss_of(model), lat, enc.word, **(kw | dict(diversity=1.0)))
    assert diverse.diversity < plain.diversity - 0.1
    v = torch.eye(3)
    assert float(diversity_term(v, torch.zeros(3))) == 0.0  # orthogonal offsets
    assert math.isclose(float(diversity_term(torch.ones(2, 3), torch.zeros(3))), 1.0, rel_tol=1e-6)


def test_reach_is_one_before_the_edit_and_nan_for_embeddings_that_never_reached():
    base = torch.tensor([1.0, 3.0])
    r = reach(base, 2.0, base)
    assert r[0] == 1.0 and math.isnan(float(r[1]))
    assert float(reach(torch.tensor([2.0, 0.0]), 2.0, base)[0]) == 0.0


def test_choose_alpha_finds_the_first_crossing_within_tolerance():
    f = lambda a: torch.tensor([1.0 - a / 1.3, 0.5 - a])  # noqa: E731  max crosses 0 at 1.3
    s = choose_alpha(f, alpha_max=4.0, scan=8, tolerance=1e-3)
    assert s.found and 1.3 <= s.alpha <= 1.3 + 1e-3
    never = choose_alpha(lambda a: torch.tensor([1.0]), alpha_max=2.0)
    assert not never.found and never.alpha == 2.0
    with pytest.raises(ValueError):
        choose_alpha(f, alpha_max=float("nan"))


def test_layer_scores_predict_what_subtracting_each_layer_does(toy, inverted):
    """s_l = −⟨∇L, τ_l⟩ against the finite difference of the set's loss with layer l's τ subtracted."""
    model, enc, lat, base, ft = toy
    tau = task_vector(base, ft)
    probe = make_probe(lat, 16, seed=2)
    params = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    cond = enc(inverted.embeddings).repeat_interleave(16, 0)
    x0, noise, t = (x.repeat(len(inverted.embeddings), *([1] * (x.ndim - 1))) for x in (probe.x0, probe.noise, probe.t))
    loss_of(model, params)(cond, x0, noise, t).mean().backward()
    ranking = rank_layers({k: p.grad for k, p in params.items()}, tau)
    eps = 1e-3

    def set_loss(keys):
        return float(edited(model, base, tau, eps, keys)(cond, x0, noise, t).mean().detach())

    l_base = set_loss([])
    for key, score in ranking:
        fd = (set_loss([key]) - l_base) / eps
        assert abs(fd - score) <= 0.05 * abs(score) + 1e-3, (key, fd, score)
    assert [k for k, _ in ranking] == [k for k, _ in sorted(ranking, key=lambda kv: -kv[1])]
    assert top_layers(ranking, 1.0) == [k for k, _ in ranking]
    assert 1 <= len(top_layers(ranking, 0.5)) <= len(ranking)
