"""The training loop: one run equals a literal transcription of the few-shot unlearning paper's loop.

The transcription follows the authors' ``train.py`` (diffusers): ``noise = randn_like(latents)``,
``timesteps = randint(0, 1000)``, ``add_noise`` with the scaled-linear schedule, ``unet(x_t, t, TE(tokens))``,
``loss = −mse(pred, noise)``, Adam written out by hand (weight decay added to the gradient, bias-corrected
moments). Our side runs the same tiny encoder and denoiser through ComfyUI's convention (``x = x₀ + σε``,
the denoiser returns ``x − σ·ε̂``) and ``rece_core.train.train``.
"""

from __future__ import annotations

import math

import pytest
import torch

from rece_core.train import (AdamSettings, TrainingOutOfMemory, autograd_safe, denoising_mse, model_output, noise_latents,
                             output_target, sample_sigmas, train)

T = 1000


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2  # scaled_linear
    return torch.cumprod(1.0 - betas, 0)


class TinyTE(torch.nn.Module):
    """Token embedding, one MLP block and a final attention-like projection: [B, L] → [B, L, 8]."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.tok = torch.nn.Parameter(torch.randn(16, 8, generator=g))
        self.fc1 = torch.nn.Parameter(torch.randn(16, 8, generator=g) / 8 ** 0.5)
        self.fc2 = torch.nn.Parameter(torch.randn(8, 16, generator=g) / 16 ** 0.5)
        self.out = torch.nn.Parameter(torch.randn(8, 8, generator=g) / 8 ** 0.5)

    def forward(self, tokens: torch.Tensor, w: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        p = dict(self.named_parameters()) if w is None else {**dict(self.named_parameters()), **w}
        h = p["tok"][tokens]
        h = h + torch.nn.functional.gelu(h @ p["fc1"].T) @ p["fc2"].T
        return h @ p["out"].T


class TinyUNet(torch.nn.Module):
    """ε-prediction: latents [B, 4, 4, 4], integer timesteps [B], context [B, L, 8] → [B, 4, 4, 4]."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.proj = torch.randn(8, 4, generator=g) / 8 ** 0.5
        self.mix = torch.randn(4, 4, generator=g) / 2

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        c = (context.mean(1) @ self.proj)[:, :, None, None]                  # [B, 4, 1, 1]
        temb = torch.sin(t.float() / 100.0)[:, None, None, None]
        return torch.einsum("oc,bchw->bohw", self.mix, x) * (1 + c) + c * temb


def literal_paper(latents: torch.Tensor, tokens: torch.Tensor, te: TinyTE, unet: TinyUNet, *, seed: int,
                  epochs: int, batch_size: int, lr: float, betas: tuple[float, float], eps: float, wd: float):
    """The authors' loop transcribed literally (diffusers add_noise; Adam by hand)."""
    g = torch.Generator().manual_seed(seed)
    ac = alphas_cumprod().float()
    p = {k: v.detach().clone().requires_grad_(True) for k, v in te.named_parameters() if k != "tok"}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    n, step, losses = latents.shape[0], 0, []
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for b in range(0, n, batch_size):
            idx = order[b:b + batch_size]
            x0 = latents[idx]
            noise = torch.randn(x0.shape, generator=g)                        # noise = randn_like(latents)
            timesteps = torch.randint(0, T, (x0.shape[0],), generator=g)      # randint(0, num_train_timesteps)
            a = ac[timesteps][:, None, None, None]
            noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise                     # scheduler.add_noise
            pred = unet(noisy, timesteps, te(tokens[idx], p))
            loss = -torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")
            grads = torch.autograd.grad(loss, list(p.values()))
            step += 1
            with torch.no_grad():
                for (k, w), gr in zip(p.items(), grads):
                    gr = gr + wd * w
                    m[k] = betas[0] * m[k] + (1 - betas[0]) * gr
                    v2[k] = betas[1] * v2[k] + (1 - betas[1]) * gr * gr
                    mh = m[k] / (1 - betas[0] ** step)
                    vh = v2[k] / (1 - betas[1] ** step)
                    w -= lr * mh / (vh.sqrt() + eps)
            losses.append(loss.item())
    return {k: v.detach() for k, v in p.items()}, losses


def comfy_style_run(latents, tokens, te, unet, *, seed, epochs, batch_size, adam, callback=None):
    """Ours: ComfyUI's EPS convention (x = x₀ + σε, D = x − σ·ε̂(x/√(σ²+1), t)) through ``train``."""
    sigmas = ((1 - alphas_cumprod()) / alphas_cumprod()).sqrt().float()

    def denoiser(x, sigma, t, context):
        s = sigma[:, None, None, None]
        return x - s * unet(x / (s ** 2 + 1).sqrt(), t, context)

    def loss(w, step):
        x0 = latents[step.batch]
        noise = step.randn(*x0.shape)
        t, sigma = sample_sigmas(sigmas, x0.shape[0], step.generator)
        x = noise_latents("eps", x0, noise, sigma)
        return -denoising_mse("eps", denoiser(x, sigma, t, te(tokens[step.batch], w)), x, x0, noise, sigma)

    initial = {k: v for k, v in te.named_parameters() if k != "tok"}
    return train(initial, loss, n_items=latents.shape[0], batch_size=batch_size, epochs=epochs, adam=adam,
                 seed=seed, callback=callback)


@pytest.fixture()
def setup():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 4, 4, generator=g)
    tokens = torch.randint(0, 16, (4, 5), generator=g)
    return latents, tokens, TinyTE(), TinyUNet()


def test_run_equals_literal_transcription_of_the_paper(setup):
    latents, tokens, te, unet = setup
    adam = AdamSettings(lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-2)  # large: the update shows
    ours = comfy_style_run(latents, tokens, te, unet, seed=7, epochs=2, batch_size=2, adam=adam)
    theirs, their_losses = literal_paper(latents, tokens, te, unet, seed=7, epochs=2, batch_size=2,
                                         lr=adam.lr, betas=adam.betas, eps=adam.eps, wd=adam.weight_decay)
    assert ours.steps == 4 and len(ours.epoch_losses) == 2
    assert ours.losses == pytest.approx(their_losses, rel=1e-5, abs=1e-6)
    for k in theirs:
        moved = (theirs[k] - te.get_parameter(k)).abs().max()
        assert moved > 1e-3  # the update is visible against the tolerance below
        torch.testing.assert_close(ours.trained[k], theirs[k], rtol=0, atol=2e-5)
        torch.testing.assert_close(ours.deltas()[k], theirs[k] - te.get_parameter(k).detach(), rtol=0, atol=2e-5)


def test_negated_loss_raises_the_denoising_loss(setup):
    latents, tokens, te, unet = setup
    res = comfy_style_run(latents, tokens, te, unet, seed=0, epochs=6, batch_size=2,
                          adam=AdamSettings(lr=3e-2))
    assert res.epoch_losses[-1] < res.epoch_losses[0]  # −MSE went down: MSE went up


def test_inputs_untouched_same_seed_same_result(setup):
    latents, tokens, te, unet = setup
    before = {k: v.detach().clone() for k, v in te.named_parameters()}
    a = comfy_style_run(latents, tokens, te, unet, seed=3, epochs=1, batch_size=2, adam=AdamSettings(lr=1e-2))
    b = comfy_style_run(latents, tokens, te, unet, seed=3, epochs=1, batch_size=2, adam=AdamSettings(lr=1e-2))
    c = comfy_style_run(latents, tokens, te, unet, seed=4, epochs=1, batch_size=2, adam=AdamSettings(lr=1e-2))
    for k, v in te.named_parameters():
        assert torch.equal(v.detach(), before[k])
    for k in a.trained:
        assert torch.equal(a.trained[k], b.trained[k])
    assert any(not torch.equal(a.trained[k], c.trained[k]) for k in a.trained)
    assert a.losses == b.losses


def test_gradients_flow_under_inference_mode(setup):
    latents, tokens, te, unet = setup
    with torch.inference_mode():
        frozen = {k: v.detach().clone() for k, v in te.named_parameters()}  # inference tensors, as ComfyUI's
        te_inf = TinyTE()
        safe = autograd_safe(frozen)
        res = train({k: frozen[k] for k in ("fc1", "fc2")},
                    lambda w, s: (te_inf(tokens[s.batch], {**safe, **w}) ** 2).mean(),
                    n_items=4, batch_size=2, epochs=1, adam=AdamSettings(lr=1e-2))
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):  # why autograd_safe exists
            train({"fc1": frozen["fc1"]}, lambda w, s: (te_inf(tokens[s.batch], {**frozen, **w}) ** 2).mean(),
                  n_items=4, batch_size=2, epochs=1)
    assert all(d.abs().max() > 0 for d in res.deltas().values())
    assert all(frozen[k].is_inference() for k in frozen) and all(not v.is_inference() for v in safe.values())


def test_bf16_autocast_keeps_float32_masters(setup):
    latents, tokens, te, unet = setup
    seen = []

    def loss(w, step):
        h = tokens[step.batch].float() @ torch.ones(5, 8)
        y = torch.nn.functional.linear(h, w["fc1"])   # autocast: bf16 matmul
        seen.append(y.dtype)
        return y.float().pow(2).mean()

    res = train({"fc1": te.fc1}, loss, n_items=4, batch_size=2, epochs=1, autocast_dtype=torch.bfloat16,
                adam=AdamSettings(lr=1e-2))
    assert seen == [torch.bfloat16] * 2
    assert res.trained["fc1"].dtype == torch.float32 and res.deltas()["fc1"].abs().max() > 0


def test_progress_cancel_and_out_of_memory(setup):
    latents, tokens, te, unet = setup
    seen = []

    class Cancelled(Exception):
        pass

    def cb(p):
        seen.append((p.step, p.total, p.epoch))
        if p.step == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        comfy_style_run(latents, tokens, te, unet, seed=0, epochs=2, batch_size=2, adam=AdamSettings(), callback=cb)
    assert seen == [(1, 4, 0), (2, 4, 0), (3, 4, 1)]

    def oom(w, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(TrainingOutOfMemory, match=r"out of memory on cpu at step 1 of 2 .*Lower the batch size"):
        train({"fc1": te.fc1}, oom, n_items=4, batch_size=2, epochs=1)


@pytest.mark.parametrize("bad, match", [
    (dict(n_items=0, batch_size=1, epochs=1), "n_items"),
    (dict(n_items=2, batch_size=0, epochs=1), "batch_size"),
    (dict(n_items=2, batch_size=1, epochs=0), "epochs"),
])
def test_bad_settings_refused(setup, bad, match):
    te = setup[2]
    with pytest.raises(ValueError, match=match):
        train({"fc1": te.fc1}, lambda w, s: w["fc1"].sum(), **bad)
    with pytest.raises(ValueError, match="learning rate"):
        AdamSettings(lr=-1.0)
    with pytest.raises(ValueError, match="empty"):
        train({}, lambda w, s: 0, n_items=1, batch_size=1, epochs=1)


@pytest.mark.parametrize("param", ["eps", "v", "flow"])
def test_parameterisations_target_is_the_output_that_denoises_exactly(param):
    """D = x₀ exactly ⇔ the raw output equals its target (each formula inverts ComfyUI's calculate_denoised)."""
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    sigma = torch.tensor([0.03, 1.0, 14.6]) if param != "flow" else torch.tensor([0.01, 0.5, 0.99])
    x = noise_latents(param, x0, noise, sigma)
    torch.testing.assert_close(model_output(param, x0, x, sigma), output_target(param, x0, noise, sigma))
    assert denoising_mse(param, x0, x, x0, noise, sigma) < 1e-8
    assert denoising_mse(param, x0 + 0.1, x, x0, noise, sigma) > 1e-4
    if param == "v":  # diffusers' get_velocity: √ᾱ ε − √(1−ᾱ) x₀ with ᾱ = 1/(1+σ²)
        a = (1 / (1 + sigma ** 2))[:, None, None, None]
        torch.testing.assert_close(output_target("v", x0, noise, sigma), a.sqrt() * noise - (1 - a).sqrt() * x0)
    with pytest.raises(ValueError, match="parameterisation"):
        noise_latents("x0", x0, noise, sigma)


def test_sample_sigmas_uniform_indices():
    g = torch.Generator().manual_seed(0)
    table = torch.linspace(0.1, 10.0, T)
    t, s = sample_sigmas(table, 4000, g)
    assert t.min() >= 0 and t.max() < T and torch.equal(s, table[t])
    assert abs(t.float().mean().item() - (T - 1) / 2) < 20 and math.isclose(len(t.unique()), T, rel_tol=0.05)


class _Block(torch.nn.Module):
    calls = 0

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.fc = torch.nn.LayerNorm(d), torch.nn.Linear(d, d)

    def forward(self, x, scale=1.0):
        type(self).calls += 1
        return x + scale * torch.nn.functional.gelu(self.fc(self.norm(x)))


def test_checkpointed_blocks_give_the_same_gradient_and_recompute():
    """Checkpointing frozen blocks (built under inference mode, run with copies through functional_call, as
    the node does): the gradient reaching the input is bit-identical, each block runs again in backward,
    and the modules are left as they were."""
    from rece_core.train import checkpointed

    with torch.inference_mode():
        net = torch.nn.Sequential(*[_Block(8) for _ in range(3)])
        torch.manual_seed(0)
        for p in net.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    frozen = autograd_safe(dict(net.named_parameters()))

    def grad(on: bool):
        x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        _Block.calls = 0
        with checkpointed(list(net) if on else []) as n:
            y = torch.func.functional_call(net, frozen, (x,))
            forwards = _Block.calls
            (y ** 2).sum().backward()
        return x.grad, n, forwards, _Block.calls

    g0, n0, f0, c0 = grad(False)
    g1, n1, f1, c1 = grad(True)
    assert torch.equal(g0, g1)
    assert (n0, n1) == (0, 3) and f0 == f1 == 3 and c0 == 3 and c1 == 6  # recomputed once in backward
    assert all("forward" not in vars(b) for b in net)
    with torch.no_grad(), checkpointed(list(net)):
        assert torch.equal(net(torch.ones(1, 8)), torch.func.functional_call(net, frozen, (torch.ones(1, 8),)))
