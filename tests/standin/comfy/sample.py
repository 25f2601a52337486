"""Stand-in for ``comfy.sample``: ``prepare_noise``, ``fix_empty_latent_channels`` and ``sample`` with
ComfyUI's signatures, over a small real sampler: Euler steps on evenly spaced sigmas, classifier-free
guidance, the model's weight patches applied for the run (``patch_model``/``unpatch_model``), the
callback ``(step, denoised, x, total_steps)`` after each step, and ``last_step`` cutting the sigmas
as ``KSampler.sample`` does (``sigmas[:last_step + 1]``)."""

import torch

import comfy.utils

SIGMA_MAX = 14.6


def prepare_noise(latent_image, seed, noise_inds=None):
    generator = torch.manual_seed(seed)
    return torch.randn(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout,
                       generator=generator, device="cpu")


def fix_empty_latent_channels(model, latent_image):
    latent_format = model.get_model_object("latent_format")
    if latent_format.latent_channels != latent_image.shape[1] and torch.count_nonzero(latent_image) == 0:
        latent_image = comfy.utils.repeat_to_batch_size(latent_image, latent_format.latent_channels, dim=1)
    return latent_image


def _cond(conditioning, batch):
    cond = conditioning[0][0]
    return cond if cond.shape[0] == batch else cond.repeat(batch // cond.shape[0], 1, 1)


def sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0,
           disable_noise=False, start_step=None, last_step=None, force_full_denoise=False, noise_mask=None,
           sigmas=None, callback=None, disable_pbar=False, seed=None):
    sigmas = torch.linspace(SIGMA_MAX, 0.0, steps + 1) if sigmas is None else sigmas
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[:last_step + 1]
    batch = latent_image.shape[0]
    pos, neg = _cond(positive, batch), _cond(negative, batch)
    model.patch_model()
    try:
        x = latent_image.float() + noise.float() * sigmas[0]
        for i in range(len(sigmas) - 1):
            s = sigmas[i].expand(batch)
            both = model.model.apply_model(torch.cat([x, x]), torch.cat([s, s]), c_crossattn=torch.cat([pos, neg]))
            cond, uncond = both.chunk(2)
            denoised = uncond + cfg * (cond - uncond)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            if callback is not None:
                callback(i, denoised, x, len(sigmas) - 1)
    finally:
        model.unpatch_model()
    return x
