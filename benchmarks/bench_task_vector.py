"""Seconds and peak memory of the task-vector method's two trainings, per step, on a seeded SD1.5-shaped model.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_task_vector.py [--latent 32] [--steps 2]

Real ComfyUI classes at SD1.5's real size: its UNet (860 M parameters, the SD1.5 config) in ComfyUI's
BaseModel, its SD1 CLIP-L, seeded by module kind (no weights can be downloaded). Cases, each per step:

- fine-tune: LoRA adapters (rank 8) on every linear layer of the transformer blocks, batch 1, empty
  caption (Task Vector Erase Concept's fine-tune, through the pack's loop ``rece_core.train``);
- inversion: Diverse Inversion, N embeddings (CLIP forward and backward per embedding, then the UNet);
- baseline of the same run: one UNet forward at the same latent size without gradients (what a
  sampling step of one image costs), so the figures read as "k sampling steps".

Setup (copying the weights as float32: ``Denoiser``) is timed once and reported apart. Peak memory is
the growth during the timed call: CUDA's peak allocation, or the process's resident memory on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not os.environ.get("COMFYUI_PATH"):
    sys.exit("set COMFYUI_PATH to a ComfyUI checkout: this benchmark runs ComfyUI's own SD1.5 UNet and CLIP")
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "real")]

from bench_nodes import timed  # noqa: E402  (puts ComfyUI, tests and the pack on the path)

import torch  # noqa: E402

from conftest import load_pack  # noqa: E402

load_pack()
from rece_comfyui.nodes import task_vector as tvn  # noqa: E402
from rece_comfyui.nodes.host import run  # noqa: E402
from rece_comfyui.nodes.host.diffusion import Denoiser, TokenEncoder  # noqa: E402

GiB = 2**30


def sd15(seed: int = 0):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    from checkpoint import SD15_UNET, seed_module
    from tiny_sd15 import sd1_clip

    config = comfy.supported_models.SD15(dict(SD15_UNET))
    config.set_inference_dtype(torch.float32 if run.compute_device().type == "cpu" else torch.float16, None)
    model = comfy.model_base.BaseModel(config, device="cpu")
    seed_module(model.diffusion_model, torch.Generator().manual_seed(seed))
    device = run.compute_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    return patcher, sd1_clip(seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=32, help="latent side (64 = 512 px; 32 = 256 px, CPU default)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per case")
    ap.add_argument("--embeddings", type=int, default=2, help="N of Diverse Inversion")
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    device = run.compute_device()
    t0 = time.perf_counter()
    model, clip = sd15()
    print(f"built seeded SD1.5 UNet + CLIP-L in {time.perf_counter() - t0:.1f} s; device {device}, "
          f"threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    with torch.inference_mode():
        den = Denoiser(model, device)
        enc = TokenEncoder(clip, "nudity", device)
    print(f"Denoiser (float32 copies of {sum(v.numel() for v in den.params.values()) / 1e6:.0f} M values) "
          f"in {time.perf_counter() - t0:.1f} s")
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(4, 4, args.latent, args.latent, generator=g)
    with torch.inference_mode(False), torch.no_grad():
        neutral = clip.encode_from_tokens(clip.tokenize("")).float().clone()
    s = latents[:1].to(device)

    def forward():
        with torch.no_grad():
            den.denoised(s, den.sigmas[500:501], neutral.to(device))

    def finetune():
        tvn.finetune(den, latents, neutral, "lora", args.rank, args.steps, 1e-4, 0, lambda *a: None)

    def inversion():
        tvn.invert(den, enc, latents, args.embeddings, args.steps, 5e-3, 0.1, 0, None)

    with torch.inference_mode():
        forward()  # warm-up: allocator, thread pools, kernels' first call
    rows = []
    for name, fn, per in (("UNet forward, no grad (baseline)", forward, 1),
                          (f"fine-tune step (LoRA rank {args.rank}, batch 1)", finetune, args.steps),
                          (f"inversion step (N = {args.embeddings})", inversion, args.steps)):
        with torch.inference_mode():
            seconds, peak, kind = timed(fn, 1)
        rows.append((name, seconds / per, peak))
        print(f"{name:45s} {seconds / per:8.2f} s/step  peak +{peak / GiB:6.2f} GiB ({kind})", flush=True)
    base = rows[0][1]
    print(f"latent {args.latent}x{args.latent}: fine-tune step = {rows[1][1] / base:.1f} baseline forwards, "
          f"inversion step = {rows[2][1] / base:.1f}")


if __name__ == "__main__":
    main()
