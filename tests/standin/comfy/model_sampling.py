"""Stand-in for ``comfy.model_sampling``: the EPS / V_PREDICTION / CONST parameterisations and the
discrete (scaled-linear) and flow noise tables, with ComfyUI's formulas and names."""

import torch


def reshape_sigma(sigma, noise_dim):
    if sigma.nelement() == 1:
        return sigma.view(())
    return sigma.view(sigma.shape[:1] + (1,) * (noise_dim - 1))


class EPS:
    def calculate_input(self, sigma, noise):
        sigma = reshape_sigma(sigma, noise.ndim)
        return noise / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = reshape_sigma(sigma, model_output.ndim)
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = reshape_sigma(sigma, noise.ndim)
        return noise * sigma + latent_image


class V_PREDICTION(EPS):
    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = reshape_sigma(sigma, model_output.ndim)
        sd2 = self.sigma_data ** 2
        return model_input * sd2 / (sigma ** 2 + sd2) - model_output * sigma * self.sigma_data / (sigma ** 2 + sd2) ** 0.5


class CONST:
    def calculate_input(self, sigma, noise):
        return noise

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = reshape_sigma(sigma, model_output.ndim)
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = reshape_sigma(sigma, noise.ndim)
        return sigma * noise + (1.0 - sigma) * latent_image


class ModelSamplingDiscrete(torch.nn.Module):
    """1000 noise levels of the scaled-linear schedule (0.00085 → 0.012), as SD1.x/SD2.x."""

    def __init__(self, model_config=None, zsnr=None):
        super().__init__()
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())
        self.sigma_data = 1.0

    def timestep(self, sigma):
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)


class ModelSamplingDiscreteFlow(torch.nn.Module):
    """Flow-matching noise levels σ(t) = shift·t / (1 + (shift − 1)·t), t = 1/1000 … 1."""

    def __init__(self, model_config=None, shift=1.0):
        super().__init__()
        self.shift, self.multiplier = shift, 1000
        t = torch.arange(1, 1001, dtype=torch.float32) / 1000
        self.register_buffer("sigmas", shift * t / (1 + (shift - 1) * t))

    def timestep(self, sigma):
        return sigma * self.multiplier
