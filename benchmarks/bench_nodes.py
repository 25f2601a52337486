"""Wall time and peak memory of RECE Erase Concept end to end (loading excluded).

    python benchmarks/bench_nodes.py                       # stand-in ComfyUI, toy CLIP, seeded cross-attention
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_nodes.py --real [--device-note]
        # real ComfyUI: SD1.5 = a seeded real-format checkpoint loaded by ComfyUI (its real CLIP-L);
        # SDXL = ComfyUI's real SDXL CLIP (CLIP-L + bigG, seeded as a checkpoint would give it)
        # over seeded SDXL-shaped cross-attention; --arch flux: Flux's txt_in (3072 × 4096) with ComfyUI's
        # real Flux text encoder (CLIP-L + T5-XXL, seeded)

Cases: 1 concept × 3 rounds, 100 and 1000 concepts × 1 round (``--concepts`` to choose). The
baseline of the same run is ComfyUI's CLIPTextEncode encoding the same prompts one by one, which
is what the node cost before prompts were batched. Peak memory is the growth during the node
call: CUDA's peak allocation, or the process's peak RSS on the CPU.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), os.environ.get("COMFYUI_PATH") or str(ROOT / "tests" / "standin"), str(ROOT)]
if not os.environ.get("COMFYUI_PATH"):
    sys.path.insert(3, str(ROOT / "tests" / "standin"))

import torch  # noqa: E402

if os.environ.get("COMFYUI_PATH"):
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True

from conftest import load_pack  # noqa: E402
from factory import FakeCLIP, make_model  # noqa: E402

load_pack()
from rece_comfyui.nodes.nodes import RECEEraseConcept  # noqa: E402

GiB = 2**30


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_growth(fn) -> tuple[int, str]:
    """Peak memory growth of one call: CUDA peak allocation, or peak RSS (grows only) on the CPU."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - base, "GPU"
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = rss()
    fn()
    return rss() - base, "RSS"


def prompts(n: int) -> list[str]:
    return ["nudity"] if n == 1 else [f"concept number {i}" for i in range(n)]


def run(label: str, model, clip, cases: list[int], repeats: int) -> None:
    node = RECEEraseConcept()
    for n in cases:
        rounds = 3 if n == 1 else 1
        texts = prompts(n)
        kw = dict(concepts="\n".join(texts), guide="", preserve="", concept_kind="custom", rounds=rounds,
                  reg=0.1, lamb=0.1, erase_scale=1.0, preserve_scale=0.1)
        node.erase(model, clip, **kw)  # warm-up (and the encoder's load onto the device)
        reps = repeats if n < 1000 else 1
        t = median_time(lambda: node.erase(model, clip, **kw), reps)
        grown, where = peak_growth(lambda: node.erase(model, clip, **kw))

        def clip_text_encode_loop():
            for text in texts + ["", " "]:
                clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)

        t_enc = median_time(clip_text_encode_loop, reps)
        print(f"{label:34} {n:5} concept(s) x {rounds}: node {t:8.3f} s | CLIPTextEncode loop of the same "
              f"prompts {t_enc:8.3f} s | ratio {t_enc / t:6.2f}x | peak {where} +{grown / GiB:.2f} GiB", flush=True)


def real_sdxl_clip():
    """ComfyUI's SDXL CLIP (CLIP-L + OpenCLIP bigG, its own classes), seeded by module kind."""
    import comfy.sd
    import comfy.sdxl_clip
    from checkpoint import seed_module

    class Target:
        clip = comfy.sdxl_clip.SDXLClipModel
        tokenizer = comfy.sdxl_clip.SDXLTokenizer
        params: dict = {}

    clip = comfy.sd.CLIP(target=Target(), parameters=817_000_000)
    with torch.no_grad():
        seed_module(clip.cond_stage_model, torch.Generator().manual_seed(0))
    return clip


def flux_shaped():
    """A Flux-shaped model's text reader (``txt_in``: 3072 × 4096, fp16, seeded) under ComfyUI's ModelPatcher,
    and ComfyUI's real Flux text encoder (CLIP-L + T5-XXL, its own classes, seeded): what the node reads."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.text_encoders.flux
    from checkpoint import seed_module

    root, inner = torch.nn.Module(), torch.nn.Module()
    root.add_module("diffusion_model", inner)
    inner.add_module("txt_in", torch.nn.Linear(4096, 3072, dtype=torch.float16))
    with torch.no_grad():
        seed_module(inner, torch.Generator().manual_seed(0))
    root.model_config = type("Flux", (), {})()
    root.device = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(root, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=torch.device("cpu"))

    class Target:
        clip = comfy.text_encoders.flux.flux_clip()
        tokenizer = comfy.text_encoders.flux.FluxTokenizer
        params: dict = {}

    clip = comfy.sd.CLIP(target=Target(), parameters=4_900_000_000)
    with torch.no_grad():
        seed_module(clip.cond_stage_model, torch.Generator().manual_seed(1))
    return model, clip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--real", action="store_true", help="real ComfyUI (COMFYUI_PATH): real CLIP-L / SDXL CLIP")
    parser.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl", "flux"])
    parser.add_argument("--concepts", nargs="+", type=int, default=[1, 100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {device}, ComfyUI: {os.environ.get('COMFYUI_PATH') or 'stand-in'}")
    for arch in args.arch:
        if args.real and arch == "sd15":
            import comfy.sd
            sys.path.insert(0, str(ROOT / "tests" / "real"))
            from checkpoint import make_sd15_checkpoint

            with tempfile.TemporaryDirectory() as tmp:
                path = make_sd15_checkpoint(Path(tmp) / "sd15.safetensors")
                model, clip = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False)[:2]
            run("SD1.5 checkpoint, real CLIP-L", model, clip, args.concepts, args.repeats)
        elif args.real and arch == "flux":
            sys.path.insert(0, str(ROOT / "tests" / "real"))
            run("Flux txt_in, real CLIP-L + T5-XXL", *flux_shaped(), args.concepts, args.repeats)
        elif args.real:
            sys.path.insert(0, str(ROOT / "tests" / "real"))
            run("SDXL cross-attn, real SDXL CLIP", make_model("sdxl", dtype=torch.float16), real_sdxl_clip(),
                args.concepts, args.repeats)
        else:
            run(f"{arch} cross-attn, toy CLIP", make_model(arch), FakeCLIP(arch), args.concepts, args.repeats)


if __name__ == "__main__":
    main()
