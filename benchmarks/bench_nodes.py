"""Wall time of RECE Erase Concept on real-size models (loading excluded).

    python benchmarks/bench_nodes.py                  # stand-in ComfyUI, seeded SD1.5/SDXL cross-attention
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_nodes.py --real-sd15
        # real ComfyUI: a seeded real-format SD1.5 checkpoint loaded by ComfyUI (real CLIP-L)

Cases: 1 concept × 3 rounds and 100 concepts × 1 round. Prints medians and, as the baseline of
the same run, the time ComfyUI's own CLIPTextEncode spends encoding the same prompts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), os.environ.get("COMFYUI_PATH") or str(ROOT / "tests" / "standin"), str(ROOT)]

import torch  # noqa: E402

if os.environ.get("COMFYUI_PATH"):
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True

from conftest import load_pack  # noqa: E402
from factory import FakeCLIP, make_model  # noqa: E402

load_pack()
from rece_comfyui.nodes.nodes import RECEEraseConcept  # noqa: E402


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(label: str, model, clip, repeats: int) -> None:
    node = RECEEraseConcept()
    for n, rounds in ((1, 3), (100, 1)):
        concepts = "\n".join(["nudity"] if n == 1 else [f"concept number {i}" for i in range(n)])
        kw = dict(concepts=concepts, guide="", preserve="", concept_kind="custom", rounds=rounds, reg=0.1,
                  lamb=0.1, erase_scale=1.0, preserve_scale=0.1)
        node.erase(model, clip, **kw)  # warm-up
        t = median_time(lambda: node.erase(model, clip, **kw), repeats)

        def encode_only():
            for text in concepts.splitlines() + ["", " "]:
                clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)

        t_enc = median_time(encode_only, repeats)
        print(f"{label:28} {n:3} concept(s) x {rounds} round(s): node {t:7.3f} s "
              f"(of which text encoding ≈ {t_enc:6.3f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--real-sd15", action="store_true", help="real ComfyUI + real-format SD1.5 checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"ComfyUI: {os.environ.get('COMFYUI_PATH') or 'stand-in'}")
    if args.real_sd15:
        import comfy.sd
        sys.path.insert(0, str(ROOT / "tests" / "real"))
        from checkpoint import make_sd15_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            path = make_sd15_checkpoint(Path(tmp) / "sd15.safetensors")
            model, clip = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False)[:2]
        run("SD1.5 checkpoint, real CLIP", model, clip, args.repeats)
    for arch in ("sd15", "sdxl"):
        run(f"{arch} cross-attn, toy CLIP", make_model(arch), FakeCLIP(arch), args.repeats)


if __name__ == "__main__":
    main()
