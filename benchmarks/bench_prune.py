"""ConceptPrune Erase Concept against the authors' procedure: forward calls, wall time, peak memory.

    python benchmarks/bench_prune.py                          # stand-in ComfyUI, tiny seeded UNet
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_prune.py --real
        # ComfyUI's own SD1.5 model class (model_channels 32, seeded), its own SD1 CLIP, comfy.sample

The paper's artist preset (20 base + 20 concept prompts, skill_ratio 0.01, τ = 10, 50 steps, seed
0, cfg 7.5, euler/normal). The node batches each side's prompts into as few sampler calls as memory
holds and stops at step τ; the baseline of the same run samples every prompt alone for all 50 steps
through the same hooks (what the authors' scripts do) and takes the union of its first τ steps.
Forward calls are calls of the diffusion model (one per step with classifier-free guidance
batched). Peak memory as ``bench_nodes.timed``: CUDA's peak allocation, or the growth of resident
memory on the CPU. Also states how many pruned weights the two masks disagree on (ties within
float rounding of the batched forward pass).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from bench_nodes import timed  # noqa: E402  (sets up the tier's import paths and loads the pack)

import torch  # noqa: E402

from rece_comfyui.nodes import conceptprune as cp  # noqa: E402
from rece_comfyui.rece_core.prune import ColumnStats, union_mask  # noqa: E402
from rece_comfyui.rece_core.prune_presets import PRUNE_PRESETS, prompt_pairs  # noqa: E402

CONCEPT = "Van Gogh"


def node_run(model, clip, size: int) -> tuple[dict, int]:
    out = cp.ConceptPruneEraseConcept().prune(model, clip, CONCEPT, "artist", 0.0, 0, 50, 0, 7.5, "euler", "normal",
                                              size)
    result = out["result"][1]
    return {k: v for k, v in result.indices.items()}, out["ui"]["rece_report"][0]["forward_calls"]


def one_by_one(model, clip, size: int) -> tuple[dict, int]:
    """Every prompt alone, all 50 steps (the authors' loop), through the node's own hooks and sampler calls."""
    preset = PRUNE_PRESETS["artist"]
    base, concept = prompt_pairs("artist", CONCEPT)
    arch, keys = cp.ffn_layers(model, "bench")
    negative = [list(cp._encode(clip, "", arch))]
    recorder = cp.Recorder(model, arch, keys, lambda: None)
    stats = {"base": ColumnStats(), "concept": ColumnStats()}
    try:
        for side, texts in (("base", base), ("concept", concept)):
            groups = [[cp._encode(clip, t, arch)] for t in texts]
            cp.record(model, recorder, groups, negative, steps=preset.steps, last_step=None, cfg=preset.cfg,
                      sampler_name="euler", scheduler="normal", seed=preset.seed, size=size, stats=stats[side],
                      progress=lambda: None)
    finally:
        recorder.remove()
    from factory import effective_weights

    w = effective_weights(model, keys)
    masks = {k: union_mask(w[k], stats["concept"], stats["base"], k, preset.tau, preset.skill_ratio,
                           arch.ffn_columns(k, tuple(w[k].shape[:2]))) for k in keys}
    return {k: m.reshape(-1).nonzero().reshape(-1) for k, m in masks.items()}, recorder.calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--real", action="store_true", help="ComfyUI's own SD1.5 class (needs COMFYUI_PATH)")
    parser.add_argument("--size", type=int, default=64, help="image size sampled (the paper: 512)")
    args = parser.parse_args()
    if args.real:
        if not os.environ.get("COMFYUI_PATH"):
            raise SystemExit("--real needs COMFYUI_PATH")
        from prune_factory import real_sd15

        model, clip = real_sd15()
        label = "ComfyUI SD1.5 class (model_channels 32), real SD1 CLIP"
    else:
        from factory import FakeCLIP
        from prune_factory import make_sampling_model

        model, clip = make_sampling_model(), FakeCLIP("tiny")
        label = "stand-in tiny UNet"
    node_run(model, clip, args.size)  # warm-up: first-call allocations are not the procedure's
    results = {}
    for name, fn in (("node (batched, stops at τ)", node_run), ("one prompt at a time, 50 steps", one_by_one)):
        box = {}
        seconds, peak, kind = timed(lambda: box.update(out=fn(model, clip, args.size)), 1)
        results[name] = (box["out"], seconds, peak, kind)
    (node_idx, node_calls), node_s, _, kind = results["node (batched, stops at τ)"]
    (ref_idx, ref_calls), ref_s, _, _ = results["one prompt at a time, 50 steps"]
    pruned = sum(int(v.numel()) for v in ref_idx.values())
    moved = sum(len(set(node_idx[k].tolist()) ^ set(ref_idx[k].tolist())) for k in ref_idx)
    print(f"{label}, artist preset ({CONCEPT!r}), {args.size}×{args.size}, {torch.get_num_threads()} threads")
    print(f"{'procedure':34} {'forward calls':>13} {'seconds':>9} {'peak ' + kind:>12}")
    for name, ((_, calls), s, peak, _) in results.items():
        print(f"{name:34} {calls:13d} {s:9.2f} {peak / 2**20:9.1f} MiB")
    print(f"{ref_calls / node_calls:.0f}× fewer forward calls, {ref_s / node_s:.1f}× faster; "
          f"{pruned:,} weights pruned, the masks differ on {moved}")


if __name__ == "__main__":
    main()
