"""Time rece_core's engine against the literal per-layer formulation, in the same run.

    python benchmarks/bench_core.py [--arch sd15 sdxl flux] [--device cpu|cuda] [--repeats 3]

``flux``: Flux-shaped, the one layer reading the text rows (``txt_in``, 3072 × 4096) and a seeded
T5-XXL-sized encoder (4096 wide, 256 rows).

Prints medians, the speed-up ratios, peak memory and the largest relative difference of the
edited weights' change from a float64 evaluation of the literal equations (the result to match):
the engine's, and that of the same literal loop in float32 as the authors compute it.
Peak memory is the growth of the process's peak resident set on CPU (Linux VmHWM) and torch.cuda.max_memory_allocated on CUDA.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rece_core import erase_rows, rece  # noqa: E402
from rece_core.baseline import literal_rece  # noqa: E402
from rece_core.toy import ARCHITECTURES, ToyTextEncoder, cross_attention_weights  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


try:
    _trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _trim = None


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def timed(fn, device: str, repeats: int, warmup: bool = True):
    """Median seconds, peak memory growth and the last result of ``repeats`` calls.

    ``warmup``: one untimed call first (thread pools, allocator, CUDA context); the literal loops,
    seconds long, skip it.
    """
    times, peak, out = [], 0, None
    if warmup:
        fn()
        sync(device)
    for _ in range(repeats):
        out = None
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        else:
            if _trim is not None:
                _trim(0)  # hand freed heap back first, or a previous case's high-water mark hides this one's
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident set size (VmHWM)
            base = _rss_kib("VmRSS:")
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if device.startswith("cuda"):
            peak = max(peak, torch.cuda.max_memory_allocated())
        else:
            peak = max(peak, (_rss_kib("VmHWM:") - base) * 1024)
    return statistics.median(times), peak, out


def flux_shaped(device: str) -> tuple[dict[str, torch.Tensor], ToyTextEncoder]:
    """Flux's ``txt_in`` (3072 × 4096, fan-in scaled) and an encoder of T5-XXL's size (4096 wide, 256 rows)."""
    g = torch.Generator().manual_seed(0)
    w = {"diffusion_model.txt_in.weight": (torch.randn(3072, 4096, generator=g) / 64).to(device)}
    return w, ToyTextEncoder(4096, seed=0, tokens=256, pad_with_end=False)


def case(arch: str, n_concepts: int, epochs: int, device: str, repeats: int) -> None:
    if arch == "flux":
        weights, enc = flux_shaped(device)
        d = 4096
    else:
        _, d = ARCHITECTURES[arch]
        weights = cross_attention_weights(arch, seed=0, device=device)
        enc = ToyTextEncoder(d, seed=0)
    cache = {}

    def encode(text):
        if text not in cache:
            e = enc(text)
            cache[text] = type(e)(e.rows.to(device), e.last_token)
        return cache[text]

    concepts = [f"concept number {i}" for i in range(n_concepts)]
    for t in concepts + ["", " "]:
        encode(t)
    kw = dict(lamb=0.1, erase_scale=1.0, preserve_scale=0.1, reg=0.1, epochs=epochs)
    pairs = [erase_rows(encode(c), encode(" ")) for c in concepts]

    def engine(ws):  # the erasure: what the nodes compute (ComfyUI patches W(P − I) in when it loads)
        return lambda: rece(ws, encode, concepts, "", **kw, device=device)

    def engine_weights(ws):  # the same, plus every edited weight materialised, like the literal loop
        return lambda: engine(ws)().apply(ws)

    def literal(ws, dtype):
        def run():
            out, _ = literal_rece(ws, [e for e, _ in pairs], [g for _, g in pairs], [encode("").rows],
                                  [encode(c).rows for c in concepts], [encode(" ").rows] * n_concepts,
                                  [encode(" ").rows] * n_concepts, **kw, dtype=dtype)
            return out
        return run

    def worst(got, w64, ws):
        return max(float((got[k].double() - w64[k]).norm() / (w64[k] - ws[k].double()).norm()) for k in ws)

    # The literal loop takes many minutes on huge cases: there both it and the engine run on the
    # first 8 matrices (the derivation sums over the matrices given, so the results compare only
    # on the same set), and the engine also runs on all of them.
    sliced = n_concepts * len(weights) * d > 100 * 32 * 768
    ws = dict(list(weights.items())[:8]) if sliced else weights
    t_e, m_e, _ = timed(engine(ws), device, repeats)
    t_w, m_w, w_e = timed(engine_weights(ws), device, repeats)
    lit_repeats = repeats if arch == "sd15" else 1
    t_64, m_64, w64 = timed(literal(ws, torch.float64), device, lit_repeats, warmup=False)
    t_32, _, w_32 = timed(literal(ws, torch.float32), device, lit_repeats, warmup=False)
    note = f" (both on the first {len(ws)} of {len(weights)} matrices)" if sliced else ""
    print(f"{arch:5} {len(weights):3} mats d={d:4} | {n_concepts:3} concept(s) x {epochs} round(s){note}\n"
          f"    engine: erasure {t_e * 1e3:8.1f} ms, with all edited weights {t_w * 1e3:8.1f} ms | "
          f"literal float64 {t_64 * 1e3:9.1f} ms | literal float32 {t_32 * 1e3:9.1f} ms\n"
          f"    speed-up vs float64 literal: {t_64 / t_e:5.1f}x (erasure), {t_64 / t_w:5.1f}x (with weights) | "
          f"vs float32 literal: {t_32 / t_e:5.1f}x, {t_32 / t_w:5.1f}x\n"
          f"    peak memory above start: engine {m_e / 2**20:.1f} MiB (with weights {m_w / 2**20:.1f}), "
          f"literal float64 {m_64 / 2**20:.1f} MiB | "
          f"largest relative difference of the edit vs float64 literal: engine {worst(w_e, w64, ws):.1e}, "
          f"float32 literal {worst(w_32, w64, ws):.1e}", flush=True)
    if sliced:
        t_all, m_all, _ = timed(engine(weights), device, repeats)
        t_allw, m_allw, _ = timed(engine_weights(weights), device, repeats)
        print(f"    engine on all {len(weights)} matrices: erasure {t_all * 1e3:8.1f} ms (peak {m_all / 2**20:.1f} MiB), "
              f"with all edited weights {t_allw * 1e3:8.1f} ms (peak {m_allw / 2**20:.1f} MiB)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], help="sd15 sdxl flux")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=["1x3", "100x1"],
                        help="concepts x rounds, e.g. 1x3 100x1")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    for arch in args.arch:
        for spec in args.cases:
            n, rounds = (int(x) for x in spec.split("x"))
            case(arch, n, rounds, args.device, args.repeats)


if __name__ == "__main__":
    main()
