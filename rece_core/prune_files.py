"""ConceptPrune result files: a safetensors file of pruned indices per layer and JSON metadata.

Format (version 1):
- one tensor per pruned layer, ``indices.<weight key>``: int64 ``[n]``, the flat (row-major)
  indices of the pruned entries of that ``[out, in]`` weight, strictly ascending;
- metadata ``format = "conceptprune"``, ``format_version = "1"``, ``conceptprune`` = a JSON object
  with ``concepts`` (strings), ``kind``, ``architecture``, ``shapes`` (``{key: [out, in]}``, every layer
  pruned or not), ``settings`` (skill_ratio, tau, steps...), ``extra`` (model, fingerprint...),
  ``pack_version``, ``created``.

Same discipline as erasure files (``rece_core.files``): safetensors only, the header checked before
any tensor is read, every bad file refused with a ``ValueError`` naming it.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

import torch

from .files import _strings, metadata_extra, metadata_object, read_header, read_tensors, write_file
from .prune import PruneResult

__all__ = ["PRUNE_FORMAT", "PRUNE_FORMAT_VERSION", "load_prune", "save_prune"]

PRUNE_FORMAT = "conceptprune"
PRUNE_FORMAT_VERSION = 1
PREFIX = "indices."
MAX_SIDE = 2**20  # a layer wider or taller than this is not a feed-forward layer of any model


def save_prune(result: PruneResult, path: str, *, pack_version: str = "") -> None:
    """Write ``result`` to ``path`` (``.safetensors``, created exclusively by the caller's path choice)."""
    if result.pruned_count < 1:
        raise ValueError("this prune result prunes no weight: nothing to save")
    meta = {"concepts": list(result.concepts), "kind": result.kind, "architecture": result.architecture,
            "shapes": {k: list(v) for k, v in result.shapes.items()}, "settings": dict(result.settings),
            "extra": {str(k): str(v) for k, v in result.extra.items()}, "pack_version": pack_version,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tensors = {PREFIX + k: v.detach().to("cpu", torch.int64).contiguous() for k, v in result.indices.items()
               if v.numel()}
    write_file(tensors, path, format=PRUNE_FORMAT, version=str(PRUNE_FORMAT_VERSION), field="conceptprune",
               info=meta)


def load_prune(path: str) -> PruneResult:
    """Read and validate a prune file; ``ValueError`` naming the file and the problem otherwise."""
    name, header, meta = read_header(path, format=PRUNE_FORMAT, versions=(str(PRUNE_FORMAT_VERSION),),
                                     kind="prune", title="ConceptPrune", versioned="ConceptPrune")
    info = metadata_object(meta, "conceptprune", name)
    for field_name, kind in {"concepts": list, "kind": str, "architecture": str, "shapes": dict,
                             "settings": dict}.items():
        if not isinstance(info.get(field_name), kind):
            raise ValueError(f"{name}: metadata field {field_name!r} is missing or not a {kind.__name__}")
    concepts = _strings(info, "concepts", name)
    if not concepts:
        raise ValueError(f"{name}: names no concept")
    if not info["architecture"].isidentifier():
        raise ValueError(f"{name}: metadata field 'architecture' is not a name")
    shapes: dict[str, tuple[int, int]] = {}
    for key, shape in info["shapes"].items():
        if not (key.startswith("diffusion_model.") and key.endswith(".weight") and isinstance(shape, list)
                and len(shape) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= MAX_SIDE
                                            for x in shape)):
            raise ValueError(f"{name}: layer {str(key)[:80]!r} has no valid [out, in] shape")
        shapes[key] = (shape[0], shape[1])
    for key, entry in header.items():
        layer = key.removeprefix(PREFIX)
        if not key.startswith(PREFIX) or layer not in shapes:
            raise ValueError(f"{name}: unexpected tensor {key[:80]!r} (not the indices of a listed layer)")
        if entry["dtype"] != "I64" or len(entry["shape"]) != 1:
            raise ValueError(f"{name}: tensor {key[:80]} must be a 1-D int64 index list")
        if entry["shape"][0] > math.prod(shapes[layer]):
            raise ValueError(f"{name}: tensor {key[:80]} lists more indices than its layer has weights")
    if not header:
        raise ValueError(f"{name}: prunes no weight")
    tensors = read_tensors(path, name)
    indices = {}
    for layer in shapes:
        idx = tensors.get(PREFIX + layer, torch.zeros(0, dtype=torch.int64))
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= math.prod(shapes[layer])
                            or not bool((idx[1:] > idx[:-1]).all())):
            raise ValueError(f"{name}: the indices of {layer} are out of range or not strictly ascending")
        indices[layer] = idx
    settings = {str(k): v for k, v in info["settings"].items() if isinstance(v, (int, float, str))
                and not (isinstance(v, float) and not math.isfinite(v))}
    extra = metadata_extra(info, name) | {"file": name}
    return PruneResult(indices, shapes, concepts, architecture=info["architecture"], kind=info["kind"][:40],
                       settings=settings, extra=extra)
