"""How soon Cancel takes effect while RECE Erase Concept encodes many prompts with ComfyUI's real CLIP.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/cancel_latency.py [--after 5 9] [--sdxl-after 15 25]
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/cancel_latency.py --sums 0.05 0.3 [--concepts 300]

Erases 300 concepts; a thread presses Cancel (ComfyUI's interrupt flag) ``--after`` seconds in and the
time until the node raises ``InterruptProcessingException`` is printed. SD1.5: a seeded real-format
checkpoint (its real CLIP-L); SDXL: ComfyUI's real SDXL CLIP (seeded) over seeded SDXL-shaped
cross-attention. Pick delays that fall inside the encoding on your machine (the node prints nothing
if it finished first).

``--sums``: Cancel pressed that many seconds after the last weight was read, while the float64 sums of
the first chunk are formed (SDXL width, 8192 rows; a fast seeded CLIP-shaped encoder so that the sums
are reached at once), with the sums in blocks of ``BLOCK_ROWS`` rows (the node as it is) and as one
product per chunk (the node before), in the same run.
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


def during_sums(delays: list[float], concepts: int) -> None:
    """Cancel pressed ``delay`` s after the weights were read: inside the first chunk's sums."""
    from factory import FakeCLIP

    from rece_comfyui.nodes.host import weights
    from rece_comfyui.rece_core import streamed

    model, clip = make_model("sdxl"), FakeCLIP("sdxl")
    kw = dict(concepts="\n".join(f"concept number {i}" for i in range(concepts)), guide="", preserve="",
              concept_kind="custom", rounds=1, reg=0.1, lamb=0.1, erase_scale=1.0, preserve_scale=0.1)
    gram_of, pressed = weights.gram_of, []

    def read_then_cancel(*a, delay: float, **k):
        out = gram_of(*a, **k)

        def press() -> None:
            time.sleep(delay)
            pressed.append(time.perf_counter())
            mm.interrupt_current_processing(True)

        threading.Thread(target=press, daemon=True).start()
        return out

    for label, block in (("blocks of %d rows" % streamed.BLOCK_ROWS, streamed.BLOCK_ROWS),
                         ("one product per chunk (before)", 10**9)):
        streamed.BLOCK_ROWS = block
        for delay in delays:
            pressed.clear()
            weights.gram_of = lambda *a, _d=delay, **k: read_then_cancel(*a, delay=_d, **k)
            try:
                RECEEraseConcept().erase(model, clip, **kw)
                print(f"SDXL width, sums {label}: finished before Cancel")
            except mm.InterruptProcessingException:
                print(f"SDXL width, sums {label}: Cancel pressed {delay:g} s after the last weight read took effect "
                      f"after {time.perf_counter() - pressed[0]:.2f} s", flush=True)
            finally:
                weights.gram_of = gram_of
                mm.interrupt_current_processing(False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sums", nargs="*", type=float, default=None,
                        help="only: Cancel this many seconds after the weights were read (inside the sums)")
    parser.add_argument("--concepts", type=int, default=300, help="--sums: number of concepts")
    parser.add_argument("--after", nargs="*", type=float, default=[5, 9], help="SD1.5: seconds before Cancel")
    parser.add_argument("--sdxl-after", nargs="*", type=float, default=[15, 25], help="SDXL: seconds before Cancel")
    args = parser.parse_args()
    if args.sums is not None:
        during_sums(args.sums, args.concepts)
        return
    model, clip = sd15_model_and_clip()
    for after in args.after:
        latency(model, clip, "SD1.5, real CLIP-L, 300 concepts", after)
    if args.sdxl_after:
        model, clip = make_model("sdxl", dtype=torch.float16), sdxl_clip()
        for after in args.sdxl_after:
            latency(model, clip, "SDXL, real SDXL CLIP, 300 concepts", after)


if __name__ == "__main__":
    main()
