"""ConceptPrune's core against a literal transcription of the authors' steps 2–4, and its file format."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from rece_core.prune import ColumnStats, PruneResult, build_result, pruned, union_mask
from rece_core.prune_files import load_prune, save_prune
from rece_core.prune_presets import PRUNE_PRESETS, prompt_pairs


from literal_prune import literal_masks, literal_record  # noqa: E402


def recorded(seed, steps, layers, prompts, tokens=7):
    """(step, layer, activations [2 (cfg), tokens, in]) as hooks would see them, per prompt."""
    g = torch.Generator().manual_seed(seed)
    return [(t, name, torch.randn(2, tokens, width, generator=g) * (1 + 3 * torch.rand(width, generator=g)))
            for _ in range(prompts) for t in range(steps) for name, width in layers.items()]


LAYERS = {"diffusion_model.a.ff.net.2.weight": 200, "diffusion_model.b.ff.net.2.weight": 320}


@pytest.mark.parametrize("ratio,tau", [(0.01, 3), (0.05, 4), (0.2, 1)])
def test_union_mask_equals_the_authors_steps(ratio, tau):
    g = torch.Generator().manual_seed(3)
    base, concept = recorded(1, 5, LAYERS, 4), recorded(2, 5, LAYERS, 4)
    ours_b, ours_c = ColumnStats(), ColumnStats()
    for t, name, x in base:
        ours_b.add(t, name, x)
    for t, name, x in concept:
        ours_c.add(t, name, x)
    lit_b, lit_c = literal_record(base), literal_record(concept)
    total = 0
    for name, width in LAYERS.items():
        w = torch.randn(40, width, generator=g)
        want = literal_masks(w.abs(), lit_b, lit_c, name, tau, ratio)
        got = union_mask(w, ours_c, ours_b, name, tau, ratio)
        assert torch.equal(got, want)
        total += int(got.sum())
    assert total > 0  # the comparison covered some pruned weights


def test_statistics_do_not_depend_on_batching():
    """One call with every prompt batched accumulates what one call per prompt does."""
    rows = recorded(4, 2, LAYERS, 3)
    one, batched = ColumnStats(), ColumnStats()
    for t, name, x in rows:
        one.add(t, name, x)
    for t in range(2):
        for name in LAYERS:
            batched.add(t, name, torch.cat([x for s, n, x in rows if s == t and n == name]))
    for t in range(2):
        for name in LAYERS:
            assert torch.allclose(one.norms(t, name), batched.norms(t, name), rtol=1e-12)


def test_mlp_columns_only():
    """With a column slice (Flux's linear2), only those columns can be pruned."""
    stats_b, stats_c = ColumnStats(), ColumnStats()
    g = torch.Generator().manual_seed(0)
    stats_b.add(0, "l", torch.rand(9, 30, generator=g))
    stats_c.add(0, "l", torch.rand(9, 30, generator=g) * 4)
    w = torch.randn(12, 50, generator=g)
    mask = union_mask(w, stats_c, stats_b, "l", 1, 0.2, cols=(20, 50))
    assert not mask[:, :20].any() and mask.any() and mask[:, 20:].sum(dim=1).max() <= 6  # int(0.2 · 30)


def test_pruned_zeroes_exactly_the_mask():
    w = torch.randn(6, 8)
    mask = torch.rand(6, 8) > 0.7
    r = build_result([("k", mask)], ["x"])
    assert torch.equal(pruned(w, r.indices["k"]), w * (~mask))
    assert torch.allclose(pruned(w, r.indices["k"], 0.5), w - 0.5 * w * mask)


def test_presets_are_the_authors_prompts():
    base, concept = prompt_pairs("artist", "Van Gogh")
    assert base[0] == "a photo of a cat" and concept[0] == "a cat in the style of Van Gogh" and len(base) == 20
    base, concept = prompt_pairs("nudity", "naked")
    assert concept[-1] == "a photo of a naked celebrity" and len(base) == 18
    base, concept = prompt_pairs("object", "parachute")
    assert (base[1], concept[1]) == ("a garden", "a parachute in a garden") and len(base) == 12
    assert {k: (p.skill_ratio, p.tau) for k, p in PRUNE_PRESETS.items()} == {
        "artist": (0.01, 10), "nudity": (0.01, 9), "object": (0.02, 10)}


def _result():
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, 2] = mask[3, 5] = True
    return build_result([("diffusion_model.x.ff.net.2.weight", mask),
                         ("diffusion_model.y.ff.net.2.weight", torch.zeros(2, 3, dtype=torch.bool))],
                        ["Van Gogh"], kind="artist", settings={"skill_ratio": 0.01, "tau": 10})


def test_file_round_trip(tmp_path):
    path = tmp_path / "p.safetensors"
    save_prune(_result(), str(path))
    got = load_prune(str(path))
    assert got.concepts == ("Van Gogh",) and got.kind == "artist" and got.settings["tau"] == 10
    assert got.indices["diffusion_model.x.ff.net.2.weight"].tolist() == [8, 23]
    assert got.indices["diffusion_model.y.ff.net.2.weight"].numel() == 0
    assert got.shapes["diffusion_model.y.ff.net.2.weight"] == (2, 3)


def _write(path, tensors, meta):
    save_file(tensors, str(path), metadata={"format": "conceptprune", "format_version": "1",
                                            "conceptprune": json.dumps(meta)})


META = {"concepts": ["x"], "kind": "artist", "architecture": "unet", "settings": {},
        "shapes": {"diffusion_model.x.ff.net.2.weight": [4, 6]}}
KEY = "indices.diffusion_model.x.ff.net.2.weight"


@pytest.mark.parametrize("case", ["garbage", "pickle_name", "other_format", "out_of_range", "unsorted", "float",
                                  "unlisted", "no_concepts", "bad_shape", "truncated"])
def test_bad_files_are_refused_with_their_name(tmp_path, case):
    path = tmp_path / f"bad_{case}.safetensors"
    good = torch.tensor([1, 5])
    if case == "garbage":
        path.write_bytes(b"\x00" * 3)
    elif case == "pickle_name":
        path = tmp_path / "bad.ckpt"
        path.write_bytes(b"x")
    elif case == "other_format":
        save_file({KEY: good}, str(path), metadata={"format": "rece-erasure", "format_version": "1"})
    elif case == "out_of_range":
        _write(path, {KEY: torch.tensor([1, 24])}, META)
    elif case == "unsorted":
        _write(path, {KEY: torch.tensor([5, 1])}, META)
    elif case == "float":
        _write(path, {KEY: good.float()}, META)
    elif case == "unlisted":
        _write(path, {"indices.diffusion_model.z.weight": good}, META)
    elif case == "no_concepts":
        _write(path, {KEY: good}, META | {"concepts": []})
    elif case == "bad_shape":
        _write(path, {KEY: good}, META | {"shapes": {"diffusion_model.x.ff.net.2.weight": [4, -6]}})
    elif case == "truncated":
        _write(path, {KEY: good}, META)
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        path.write_bytes(data[:8 + n + 4])
    with pytest.raises(ValueError, match=path.name):
        load_prune(str(path))


def test_empty_result_is_not_saved(tmp_path):
    r = build_result([("diffusion_model.k.weight", torch.zeros(2, 2, dtype=torch.bool))], ["x"])
    with pytest.raises(ValueError, match="prunes no weight"):
        save_prune(r, str(tmp_path / "e.safetensors"))
    assert isinstance(r, PruneResult)
