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
call: CUDA's peak allocation, or on the CPU the process's resident memory sampled every 2 ms.
The node's encoder calls (``clip.encode_from_tokens``) per run are counted (issue #21: 100 concepts on
Flux in at most 10). ``--keep-mib`` sets how much encoder output the node keeps between its passes (``KEEP_BYTES``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import threading
import time

from _host import ROOT  # noqa: E402  (sys.path: tests/ and the ComfyUI tier; ComfyUI on the CPU without CUDA)

import torch  # noqa: E402

from conftest import load_pack  # noqa: E402
from factory import FakeCLIP, make_model  # noqa: E402

load_pack()
from rece_comfyui.nodes.rece import RECEEraseConcept  # noqa: E402
from rece_comfyui.rece_core import procedure  # noqa: E402

GiB = 2**30


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rss() -> int:
    """The process's resident memory now (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The most resident memory seen (sampled every 2 ms) while in the block, above what it was at its start."""

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.peak = rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss())

    @property
    def grown(self) -> int:
        return self.peak - self.base


def timed(fn, repeats: int) -> tuple[float, int, str]:
    """Median wall time of ``fn`` and its peak memory growth: CUDA's peak allocation, or peak RSS on the CPU."""
    times, peaks = [], []
    for _ in range(repeats):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as watch:
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        peaks.append(torch.cuda.max_memory_allocated() - base if torch.cuda.is_available() else watch.grown)
    return statistics.median(times), max(peaks), "GPU" if torch.cuda.is_available() else "RSS"


def prompts(n: int) -> list[str]:
    return ["nudity"] if n == 1 else [f"concept number {i}" for i in range(n)]


def run(label: str, model, clip, cases: list[int], repeats: int) -> None:
    node = RECEEraseConcept()
    node.erase(model, clip, **settings(prompts(1), 1))  # warm-up (and the encoder's load onto the device)
    for n in cases:
        rounds = 3 if n == 1 else 1
        texts = prompts(n)
        kw = settings(texts, rounds)
        reps = repeats if n < 1000 else 1
        calls: list[bool] = []  # per encoder call: whether it is a pooled-only one (T5 cut to one token)
        encode = clip.encode_from_tokens

        def counted(tokens, *a, **k):
            calls.append("t5xxl" in tokens and len(tokens["t5xxl"][0]) == 1)
            return encode(tokens, *a, **k)

        clip.encode_from_tokens = counted
        try:
            t, grown, where = timed(lambda: node.erase(model, clip, **kw), reps)
        finally:
            del clip.encode_from_tokens  # back to the class's own method
        per_run, pooled_only = len(calls) // reps, sum(calls) // reps

        def clip_text_encode_loop():
            for text in texts + ["", " "]:
                clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)

        t_enc = timed(clip_text_encode_loop, reps)[0]
        print(f"{label:34} {n:5} concept(s) x {rounds}: node {t:8.3f} s | CLIPTextEncode loop of the same "
              f"prompts {t_enc:8.3f} s | ratio {t_enc / t:6.2f}x | peak {where} +{grown / GiB:.3f} GiB | "
              f"{per_run} encoder calls ({per_run - pooled_only} of the rows, {pooled_only} pooled-only: CLIP, "
              "T5 cut to one token)", flush=True)


def settings(texts: list[str], rounds: int) -> dict:
    return dict(concepts="\n".join(texts), guide="", preserve="", concept_kind="custom", rounds=rounds, reg=0.1,
                lamb=0.1, erase_scale=1.0, preserve_scale=0.1)


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
    parser.add_argument("--keep-mib", type=int, default=None,
                        help="encoder output kept for the report pass (default: rece_core's KEEP_BYTES)")
    args = parser.parse_args()
    if args.keep_mib is not None:
        procedure.KEEP_BYTES = args.keep_mib * 2**20
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {device}, ComfyUI: {os.environ.get('COMFYUI_PATH') or 'stand-in'}, "
          f"encoder output kept up to {procedure.KEEP_BYTES / 2**20:.0f} MiB")
    for arch in args.arch:
        if args.real and arch == "sd15":
            sys.path.insert(0, str(ROOT / "tests" / "real"))
            from checkpoint import sd15_model_and_clip

            run("SD1.5 checkpoint, real CLIP-L", *sd15_model_and_clip(), args.concepts, args.repeats)
        elif args.real and arch == "flux":
            sys.path.insert(0, str(ROOT / "tests" / "real"))
            run("Flux txt_in, real CLIP-L + T5-XXL", *flux_shaped(), args.concepts, args.repeats)
        elif args.real:
            sys.path.insert(0, str(ROOT / "tests" / "real"))
            from checkpoint import sdxl_clip

            run("SDXL cross-attn, real SDXL CLIP", make_model("sdxl", dtype=torch.float16), sdxl_clip(),
                args.concepts, args.repeats)
        elif arch == "flux":  # the stand-in Flux of the tests (txt_in + vector_in), CLIP-L + T5 stand-ins
            import dit_factory

            run("Flux txt_in + vector_in, stand-in", dit_factory.make_model("flux"), dit_factory.DiTCLIP("flux"),
                args.concepts, args.repeats)
        else:
            run(f"{arch} cross-attn, toy CLIP", make_model(arch), FakeCLIP(arch), args.concepts, args.repeats)


if __name__ == "__main__":
    main()
