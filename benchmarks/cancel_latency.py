"""How soon Cancel takes effect while RECE Erase Concept encodes many prompts with ComfyUI's real CLIP.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/cancel_latency.py [--after 5 9] [--sdxl-after 15 25]

Erases 300 concepts; a thread presses Cancel (ComfyUI's interrupt flag) ``--after`` seconds in and the
time until the node raises ``InterruptProcessingException`` is printed. SD1.5: a seeded real-format
checkpoint (its real CLIP-L); SDXL: ComfyUI's real SDXL CLIP (seeded) over seeded SDXL-shaped
cross-attention. Pick delays that fall inside the encoding on your machine (the node prints nothing
if it finished first).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not os.environ.get("COMFYUI_PATH"):
    sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
sys.path[:0] = [str(ROOT / "tests"), os.environ["COMFYUI_PATH"], str(ROOT), str(ROOT / "tests" / "real")]

import torch  # noqa: E402

import comfy.cli_args  # noqa: E402

if not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True

import comfy.model_management as mm  # noqa: E402
from checkpoint import sd15_model_and_clip, sdxl_clip  # noqa: E402
from conftest import load_pack  # noqa: E402
from factory import make_model  # noqa: E402

load_pack()
from rece_comfyui.nodes.rece import RECEEraseConcept  # noqa: E402


def latency(model, clip, label: str, after: float) -> None:
    kw = dict(concepts="\n".join(f"concept number {i}" for i in range(300)), guide="", preserve="",
              concept_kind="custom", rounds=1, reg=0.1, lamb=0.1, erase_scale=1.0, preserve_scale=0.1)
    pressed: list[float] = []

    def press() -> None:
        time.sleep(after)
        pressed.append(time.perf_counter())
        mm.interrupt_current_processing(True)

    threading.Thread(target=press, daemon=True).start()
    try:
        RECEEraseConcept().erase(model, clip, **kw)
        print(f"{label}: finished before Cancel was pressed {after:g} s in")
    except mm.InterruptProcessingException:
        print(f"{label}: Cancel pressed {after:g} s in took effect after {time.perf_counter() - pressed[0]:.2f} s",
              flush=True)
    finally:
        mm.interrupt_current_processing(False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--after", nargs="*", type=float, default=[5, 9], help="SD1.5: seconds before Cancel")
    parser.add_argument("--sdxl-after", nargs="*", type=float, default=[15, 25], help="SDXL: seconds before Cancel")
    args = parser.parse_args()
    model, clip = sd15_model_and_clip()
    for after in args.after:
        latency(model, clip, "SD1.5, real CLIP-L, 300 concepts", after)
    if args.sdxl_after:
        model, clip = make_model("sdxl", dtype=torch.float16), sdxl_clip()
        for after in args.sdxl_after:
            latency(model, clip, "SDXL, real SDXL CLIP, 300 concepts", after)


if __name__ == "__main__":
    main()
