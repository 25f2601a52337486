"""Seconds per training step and peak memory of Few-shot Unlearn Concept, SD1.5-shaped (real ComfyUI).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_fewshot.py [--resolution 512] [--steps 3] [--checkpointing off]

The model is a seeded real-format SD1.5 checkpoint (full-size UNet and CLIP-L) loaded by ComfyUI
itself, built and run under ``torch.inference_mode()`` as ComfyUI's executor does. The node runs the
zero-shot variant (no VAE needed; a step costs the same as with images) at batch 2. Seconds per step
= (time of ``1 + steps`` epochs − time of 1 epoch) / ``steps``; the rest of the 1-epoch run is the
setup (loading, copies for autograd). ``--channels`` narrows the UNet (SD1.5: 320) where the
full one does not fit: on the CPU the run holds the float32 UNet twice (ComfyUI's weights are
inference tensors; autograd needs a normal copy of every weight it saves), about 10 GiB. The same-run baseline is one sampling step of the same UNet
(``apply_model`` at batch 2, no gradients) plus one CLIPTextEncode. Peak memory: CUDA's peak
allocation, or on the CPU the process's resident memory growth sampled every 2 ms.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_nodes import GiB, PeakRSS, sync  # noqa: E402  (sets up the paths and the pack)

import torch  # noqa: E402


def peak_of(fn):
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as watch:
        t0 = time.perf_counter()
        out = fn()
        sync()
        seconds = time.perf_counter() - t0
    grown = torch.cuda.max_memory_allocated() - base if torch.cuda.is_available() else watch.grown
    return out, seconds, grown


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="extra steps timed beyond the first epoch")
    parser.add_argument("--parameters", default="mlp-final-attn")
    parser.add_argument("--channels", type=int, default=320,
                        help="UNet model_channels (SD1.5: 320; less for a machine without ~10 GiB free on CPU)")
    parser.add_argument("--checkpointing", choices=("on", "off"), default="on",
                        help="the node's gradient_checkpointing (run once each, in separate processes, to compare "
                             "peak memory: the allocator keeps freed memory within a process)")
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH: this benchmark runs ComfyUI's own SD1.5 classes")
    sys.path.insert(0, str(ROOT / "tests" / "real"))
    import checkpoint  # tests/real/checkpoint.py
    from checkpoint import sd15_model_and_clip

    def narrow_sd15():
        """ComfyUI's SD15 BaseModel with a narrower UNet (ComfyUI's detection only knows 320) and CLIP-L."""
        import comfy.model_base
        import comfy.model_patcher
        import comfy.sd
        import comfy.sd1_clip
        import comfy.supported_models

        g = torch.Generator().manual_seed(0)
        config = comfy.supported_models.SD15(dict(checkpoint.SD15_UNET, model_channels=args.channels))
        base = comfy.model_base.BaseModel(config, device=comfy.model_management.get_torch_device())
        checkpoint.seed_module(base.diffusion_model, g)
        model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                                 offload_device=torch.device("cpu"))

        class Target:
            clip = comfy.sd1_clip.SD1ClipModel
            tokenizer = comfy.sd1_clip.SD1Tokenizer
            params: dict = {}

        clip = comfy.sd.CLIP(target=Target(), parameters=123_000_000)
        checkpoint.seed_module(clip.cond_stage_model, g)
        return model, clip

    import comfy.model_management

    from rece_comfyui.nodes.fewshot import FewShotUnlearnConcept

    torch.manual_seed(0)
    with torch.inference_mode():
        model, clip = sd15_model_and_clip(seed=0) if args.channels == 320 else narrow_sd15()
        device = comfy.model_management.get_torch_device()
        n_unet = sum(p.numel() for p in model.model.diffusion_model.parameters())
        n_te = sum(p.numel() for p in clip.cond_stage_model.parameters())
        print(f"SD1.5-shaped: UNet {n_unet / 1e6:.0f} M, CLIP-L {n_te / 1e6:.0f} M parameters; device {device}; "
              f"torch threads {torch.get_num_threads()}; resolution {args.resolution}, batch 2", flush=True)

        # baseline: one sampling step (batch 2) + one CLIPTextEncode
        lat = args.resolution // 8
        x = torch.randn(2, 4, lat, lat, device=device)
        sigma = torch.full((2,), 1.0, device=device)

        def sample_step():
            cond = clip.encode_from_tokens(clip.tokenize("a photo of a cat"))
            comfy.model_management.load_models_gpu([model])
            return model.model.apply_model(x, sigma, c_crossattn=cond.expand(2, -1, -1).to(device))

        sample_step()
        _, t_base, mem_base = peak_of(sample_step)
        print(f"baseline: one sampling step + CLIPTextEncode {t_base:8.2f} s, peak +{mem_base / GiB:.2f} GiB", flush=True)

        node = FewShotUnlearnConcept()
        kw = dict(concept="Eiffel Tower", concept_type="object", learning_rate=1e-5, seed=0,
                  parameters=args.parameters, zero_shot=True, resolution=args.resolution, batch_size=2,
                  gradient_checkpointing=args.checkpointing == "on")
        (_, u1, _), t1, mem1 = peak_of(lambda: node.unlearn(clip, model, epochs=1, **kw)["result"])
        (_, u2, _), t2, mem2 = peak_of(lambda: node.unlearn(clip, model, epochs=1 + args.steps, **kw)["result"])
    per_step = (t2 - t1) / args.steps
    print(f"node: gradient checkpointing {args.checkpointing}; "
          f"{u1.n_parameters / 1e6:.1f} M trained parameters ({args.parameters}); 1 epoch (1 step) {t1:.2f} s, "
          f"{1 + args.steps} steps {t2:.2f} s", flush=True)
    print(f"seconds per step {per_step:.2f} s = {per_step / t_base:.1f}x the baseline; setup {t1 - per_step:.2f} s; "
          f"paper's 4 images x 5 epochs at batch 2 = 10 steps: {t1 - per_step + 10 * per_step:.1f} s; "
          f"peak +{max(mem1, mem2) / GiB:.2f} GiB ({'GPU' if torch.cuda.is_available() else 'RSS'})", flush=True)


if __name__ == "__main__":
    main()
