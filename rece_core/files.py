"""Erasure files: a small safetensors file holding the transform's factors and JSON metadata.

Format (version 1):
- tensors ``transform.up: [d, r]`` and ``transform.down: [r, d]``, float32, ``P = I + up @ down``
  (every cross-attention key/value weight maps as ``W ↦ W P``);
- metadata ``format = "rece-erasure"``, ``format_version = "1"``, ``rece`` = a JSON object with
  ``concepts``, ``guides``, ``preserve``, ``lamb``, ``erase_scale``, ``preserve_scale``, ``reg``,
  ``epochs``, ``rounds`` (diagnostics), ``dim``, ``rank``, ``fingerprint`` (of the base model's
  text-reading weights), ``pack_version``, ``created`` (ISO 8601 UTC), ``seconds``, ``device``, ``extra``,
  and ``architecture`` (the model family whose text space ``P`` acts on, e.g. ``unet``, ``flux``;
  files written before it existed are ``unet``).

Format version 2 (written when the erasure holds other text spaces; version 1 files still load): the
same, plus for each other text space ``name`` (``pooled``: the pooled text vector; ``llama3.<layer>``: one
hidden layer of HiDream's Llama-3.1 encoder) the tensors
``<name>.up: [d', r']`` and ``<name>.down: [r', d']`` and, in ``rece``, ``spaces = {name: {"dim", "rank",
"rounds"}}``.

Only safetensors is read (never pickle); every malformed file is refused with a ``ValueError``
naming the file and the problem, before anything is returned.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from datetime import datetime, timezone

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .procedure import Erasure, RoundReport
from .transform import LowRankTransform
from .validation import check_transform

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_HEADER", "fingerprint", "load_erasure", "lora_factors",
           "lora_key", "save_erasure"]

FORMAT = "rece-erasure"
FORMAT_VERSION = 2
READS = ("1", "2")
SPACES = ("pooled", "llama3.<layer>")  # the other text spaces an erasure file may hold (as the refusals name them)
SPACE_NAME = re.compile(r"pooled|llama3\.\d{1,3}")  # pooled text; HiDream's Llama-3 layer 0 … 999
MAX_HEADER = 16 * 2**20  # a real header is a few KiB
TENSORS = ("transform.down", "transform.up")
FIELDS = {"concepts": list, "guides": list, "preserve": list, "lamb": (int, float), "erase_scale": (int, float),
          "preserve_scale": (int, float), "reg": (int, float), "epochs": int, "rounds": list, "dim": int,
          "rank": int}


def fingerprint(weights: Mapping[str, Tensor]) -> str:
    """A short hash of cross-attention weights: names, shapes and three rows of each, in float16.

    The same checkpoint in float16 or float32 gives the same fingerprint; a fine-tune does not.
    """
    h = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name]
        rows = w[[0, w.shape[0] // 2, w.shape[0] - 1]].detach().to("cpu", torch.float16).contiguous()
        h.update(f"{name}:{tuple(w.shape)}".encode())
        h.update(rows.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _rounds(rounds) -> list[dict]:
    return [{"step": r.step, "guide_gap": list(r.guide_gap), "reach": list(r.reach), "drift": r.drift} for r in rounds]


def save_erasure(erasure: Erasure, path: str, *, pack_version: str = "") -> None:
    """Write ``erasure`` to ``path`` (``.safetensors``); refuses what ``load_erasure`` would refuse.

    Version 1 when it holds only the rows' transform (older packs read it), version 2 with other spaces."""
    t = erasure.transform
    if erasure.rank < 1:
        raise ValueError("this erasure has rank 0 (it changes nothing): nothing to save")
    check_transform(t.up, t.down)
    spaces = {name: e for name, e in erasure.spaces.items() if e.rank >= 1}
    for name, e in spaces.items():
        if not SPACE_NAME.fullmatch(name):
            raise ValueError(f"unknown text space {name!r} (this pack writes {', '.join(SPACES)})")
        check_transform(e.transform.up, e.transform.down)
    meta = {
        "concepts": list(erasure.concepts), "guides": list(erasure.guides), "preserve": list(erasure.preserve),
        "lamb": erasure.lamb, "erase_scale": erasure.erase_scale, "preserve_scale": erasure.preserve_scale,
        "reg": erasure.reg, "epochs": erasure.epochs,
        "rounds": _rounds(erasure.rounds),
        "dim": erasure.dim, "rank": erasure.rank, "fingerprint": erasure.extra.get("fingerprint", ""),
        "architecture": erasure.extra.get("architecture", "unet"),
        "pack_version": pack_version, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": erasure.seconds, "device": erasure.device, "extra": dict(erasure.extra),
    }
    tensors = {"transform.up": t.up.detach().to("cpu", torch.float32).contiguous(),
               "transform.down": t.down.detach().to("cpu", torch.float32).contiguous()}
    if spaces:
        meta["spaces"] = {name: {"dim": e.dim, "rank": e.rank, "rounds": _rounds(e.rounds)} for name, e in spaces.items()}
        for name, e in spaces.items():
            tensors[f"{name}.up"] = e.transform.up.detach().to("cpu", torch.float32).contiguous()
            tensors[f"{name}.down"] = e.transform.down.detach().to("cpu", torch.float32).contiguous()
    write_file(tensors, path, format=FORMAT, version="2" if spaces else "1", field="rece", info=meta)


def _reject_constant(value: str):
    raise ValueError(f"non-standard constant {value}")


def _json(raw: str | bytes, name: str, what: str):
    """``json.loads`` refusing NaN/Infinity and absurd nesting: ``ValueError`` "<file>: <what> (<why>)"."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        why = "nested absurdly deep"
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        why = exc.__class__.__name__ if not str(exc).startswith("non-standard") else str(exc)
    raise ValueError(f"{name}: {what} ({why})")


def _header(path: str) -> dict:
    name = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{name}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or n > size - 8:
            raise ValueError(f"{name}: safetensors header of {n} bytes is absurdly large or truncated")
        raw = f.read(n)
    header = _json(raw, name, "malformed safetensors header")
    if not isinstance(header, dict):
        raise ValueError(f"{name}: malformed safetensors header (not an object)")
    meta = header.get("__metadata__", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{name}: malformed safetensors header (__metadata__ is not an object of strings)")
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list)
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in entry["shape"])):
            raise ValueError(f"{name}: malformed safetensors header (entry {str(key)[:40]!r} is not a tensor "
                             "with a dtype and a shape)")
    return header


def write_file(tensors: Mapping[str, Tensor], path: str, *, format: str, version: str, field: str,
               info: Mapping) -> None:
    """Save ``tensors`` with metadata ``format``, ``format_version`` and ``field`` = ``info`` as strict JSON."""
    save_file(dict(tensors), path, metadata={"format": format, "format_version": version,
                                             field: json.dumps(info, allow_nan=False)})


def read_header(path: str, *, format: str, versions: tuple[str, ...], kind: str, title: str,
                versioned: str) -> tuple[str, dict, dict]:
    """``(file name, checked header without __metadata__, __metadata__)`` of a ``.safetensors`` file of ``format``.

    Refuses (``ValueError`` naming the file) another extension ("only .safetensors <kind> files are
    read"), a malformed header, another format ("not a <title> file") or a version not in ``versions``
    ("unknown <versioned> format version")."""
    name = os.path.basename(path)
    if not name.endswith(".safetensors"):
        raise ValueError(f"{name}: only .safetensors {kind} files are read")
    header = _header(path)
    meta = header.pop("__metadata__", None) or {}
    if meta.get("format") != format:
        raise ValueError(f"{name}: not a {title} file (metadata format={str(meta.get('format'))[:40]!r})")
    if meta.get("format_version") not in versions:
        plural = "versions" if len(versions) > 1 else "version"
        raise ValueError(f"{name}: unknown {versioned} format version {str(meta.get('format_version'))[:40]!r} "
                         f"(this pack reads {plural} {', '.join(versions)}); update the pack")
    return name, header, meta


def metadata_object(meta: Mapping[str, str], field: str, name: str) -> dict:
    """The JSON object in metadata ``field``; ``ValueError`` "<file>: the '<field>' metadata is not ..." otherwise."""
    info = _json(meta.get(field, ""), name, f"the {field!r} metadata is not valid JSON")
    if not isinstance(info, dict):
        raise ValueError(f"{name}: the {field!r} metadata is not a JSON object")
    return info


def read_tensors(path: str, name: str) -> dict[str, Tensor]:
    """``load_file(path)``, its own consistency errors (offsets, sizes) as ``ValueError`` naming the file."""
    try:
        return load_file(path)
    except Exception as exc:  # safetensors' own consistency checks (offsets, sizes)
        raise ValueError(f"{name}: corrupt tensor data ({str(exc)[:200]})") from None


def metadata_extra(info: dict, name: str) -> dict[str, str]:
    """The metadata's ``extra`` object (absent: empty) as strings; ``ValueError`` naming the file if not an object."""
    extra = info.get("extra") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"{name}: metadata field 'extra' is not a JSON object")
    return {str(k): str(v) for k, v in extra.items()}

def _number(info: dict, field: str, name: str) -> float:
    value = info.get(field, 0.0)
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name}: metadata field {field!r} is not a finite number")
    return number


def _strings(info: dict, field: str, name: str) -> tuple[str, ...]:
    value = info[field]
    if not all(isinstance(x, str) for x in value):
        raise ValueError(f"{name}: metadata field {field!r} must be a list of strings")
    return tuple(value)


def load_erasure(path: str) -> Erasure:
    """Read and validate an erasure file; ``ValueError`` naming the file and the problem otherwise.

    Besides the format, refuses a rank-0 erasure or all-zero factors (nothing to apply) and factors that are not finite
    or give ``‖P − I‖`` beyond ``validation.MAX_TRANSFORM_NORM``.
    """
    name, header, meta = read_header(path, format=FORMAT, versions=READS, kind="erasure", title="RECE erasure",
                                     versioned="erasure")
    info = metadata_object(meta, "rece", name)
    spaces = info.get("spaces", {}) if meta["format_version"] == "2" else {}
    if not isinstance(spaces, dict) or not all(isinstance(k, str) and SPACE_NAME.fullmatch(k) and isinstance(v, dict)
                                               for k, v in spaces.items()):
        raise ValueError(f"{name}: metadata field 'spaces' must map text spaces ({', '.join(SPACES)}) to objects")
    expected = set(TENSORS) | {f"{k}.{part}" for k in spaces for part in ("up", "down")}
    keys = set(header)
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        raise ValueError(f"{name}: expected tensors {sorted(expected)}; missing {missing}, unexpected {extra[:5]}")
    for key in sorted(expected):
        if header[key]["dtype"] != "F32":
            raise ValueError(f"{name}: tensor {key} must be float32, found {header[key]['dtype'][:20]}")
    for field, kind in FIELDS.items():
        if not isinstance(info.get(field), kind) or isinstance(info.get(field), bool):
            raise ValueError(f"{name}: metadata field {field!r} is missing or not a {getattr(kind, '__name__', 'number')}")
    d, r = info["dim"], info["rank"]
    if d < 1 or r < 1:
        raise ValueError(f"{name}: holds no erasure (text width {d}, rank {r}); an erasure has rank ≥ 1")
    if info["epochs"] < 0:
        raise ValueError(f"{name}: metadata field 'epochs' is negative")
    shapes = {"transform.up": [d, r], "transform.down": [r, d]}
    for space, entry in spaces.items():
        ds, rs = entry.get("dim"), entry.get("rank")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (ds, rs)):
            raise ValueError(f"{name}: the {space} space's dim and rank must be positive integers")
        shapes |= {f"{space}.up": [ds, rs], f"{space}.down": [rs, ds]}
    for key, shape in shapes.items():
        if header[key]["shape"] != shape:
            raise ValueError(f"{name}: tensor {key} has shape {header[key]['shape'][:4]}, expected {shape} "
                             f"(text width {d}, rank {r})")
    concepts, guides, preserve = (_strings(info, f, name) for f in ("concepts", "guides", "preserve"))
    lamb, erase_scale, preserve_scale, reg = (_number(info, f, name)
                                              for f in ("lamb", "erase_scale", "preserve_scale", "reg"))
    if min(lamb, erase_scale, preserve_scale, reg) < 0:
        raise ValueError(f"{name}: parameters must be finite and non-negative")
    def read_rounds(value) -> tuple[RoundReport, ...]:
        try:
            return tuple(RoundReport(int(x["step"]), tuple(map(float, x["guide_gap"])), tuple(map(float, x["reach"])),
                                     {str(k): float(v) for k, v in x["drift"].items()}) for x in value)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            raise ValueError(f"{name}: metadata field 'rounds' is malformed") from None

    rounds = read_rounds(info["rounds"])
    space_rounds = {space: read_rounds(entry.get("rounds", [])) for space, entry in spaces.items()}
    extra = metadata_extra(info, name)
    seconds = _number(info, "seconds", name)
    tensors = read_tensors(path, name)
    for key, value in tensors.items():
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}: tensor {key} contains NaN or Inf")
    try:
        norm = check_transform(tensors["transform.up"], tensors["transform.down"], "its transform")
        for space in spaces:
            check_transform(tensors[f"{space}.up"], tensors[f"{space}.down"], f"its {space} transform")
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    if norm == 0.0:
        raise ValueError(f"{name}: holds no erasure (its factors are all zero: P − I = 0, whatever the metadata's "
                         f"rank {r} says)")
    if info.get("fingerprint"):
        extra["fingerprint"] = str(info["fingerprint"])
    arch = info.get("architecture", extra.get("architecture", "unet"))
    if not isinstance(arch, str) or not arch.isidentifier():
        raise ValueError(f"{name}: metadata field 'architecture' is not a name")
    extra["architecture"] = arch
    extra["file"] = name
    common = dict(concepts=concepts, guides=guides, preserve=preserve, lamb=lamb, erase_scale=erase_scale,
                  preserve_scale=preserve_scale, reg=reg, epochs=int(info["epochs"]), seconds=seconds,
                  device=str(info.get("device", "")))
    return Erasure(
        transform=LowRankTransform(tensors["transform.up"], tensors["transform.down"]), rounds=rounds, extra=extra,
        spaces={space: Erasure(transform=LowRankTransform(tensors[f"{space}.up"], tensors[f"{space}.down"]),
                               rounds=space_rounds[space], extra=dict(extra), **common) for space in spaces},
        **common)


def lora_key(comfy_key: str, architecture: str = "unet") -> str:
    """kohya/A1111 LoRA name of an ``attn2`` weight: ComfyUI (ldm) key → ``lora_unet_<diffusers name>``.

    Other architectures (DiTs): ``lora_unet_<ComfyUI key with '_' for '.'>`` (kohya's Flux names,
    e.g. ``lora_unet_txt_in``), which ComfyUI's LoRA loader maps for every model.

    ``diffusion_model.input_blocks.{3l+j+1}.1.…`` → ``down_blocks.l.attentions.j.…``,
    ``middle_block.1.…`` → ``mid_block.attentions.0.…``, ``output_blocks.{3l+j}.1.…`` →
    ``up_blocks.l.attentions.j.…`` (two res-blocks per level: SD1.x, SD2.x, SDXL).
    """
    if architecture != "unet":
        return "lora_unet_" + comfy_key.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_")
    parts = comfy_key.removeprefix("diffusion_model.").removesuffix(".weight").split(".")
    if parts[0] == "middle_block" and parts[1] == "1":
        block, rest = "mid_block.attentions.0", parts[2:]
    elif parts[0] in ("input_blocks", "output_blocks") and len(parts) > 3 and parts[2] == "1":
        i = int(parts[1]) - (1 if parts[0] == "input_blocks" else 0)
        kind = "down_blocks" if parts[0] == "input_blocks" else "up_blocks"
        block, rest = f"{kind}.{i // 3}.attentions.{i % 3}", parts[3:]
    else:
        raise ValueError(f"not a UNet cross-attention key: {comfy_key}")
    return "lora_unet_" + ".".join([block] + rest).replace(".", "_")


def _inner(u1: Tensor, v1: Tensor, u2: Tensor, v2: Tensor) -> float:
    """``⟨U₁V₁, U₂V₂⟩_F = Σ (U₁ᵀU₂) ⊙ (V₁V₂ᵀ)`` in float64, without forming either ``[out, d]`` product."""
    return float(((u1.T @ u2) * (v1 @ v2.T)).sum())


def lora_factors(erasure: Erasure, w: Tensor, rank: int = 0,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, float]:
    """``(up [out, k], down [k, d], relative error)`` of ``W (P − I)``, factors in ``dtype``.

    Exact when ``rank`` is 0 or ≥ r, else the best rank-``rank`` approximation (SVD). Each rank-one
    component is balanced (``up``'s column and ``down``'s row get the same norm), so a large
    ``erase_scale`` does not sit in ``up`` alone and overflow half precision. The error is measured
    on the factors as cast to ``dtype`` against the exact delta (float64): truncation plus rounding.
    Raises ``ValueError`` when the cast factors are not finite.
    """
    up0, down0 = (x.double() for x in erasure.delta(w))
    up, down = up0, down0
    if 0 < rank < up.shape[1]:
        qu, ru = torch.linalg.qr(up)
        qv, rv = torch.linalg.qr(down.T)
        u, s, vh = torch.linalg.svd(ru @ rv.T)
        up, down = (qu @ u[:, :rank]) * s[:rank], vh[:rank] @ qv.T
    nu, nd = up.norm(dim=0), down.norm(dim=1)
    gain = torch.where((nu > 0) & (nd > 0), (nd / nu.clamp_min(1e-300)).sqrt(), torch.ones_like(nu))
    up, down = (up * gain).to(dtype), (down / gain.unsqueeze(1)).to(dtype)
    if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
        raise ValueError(f"the LoRA factors overflow {str(dtype).removeprefix('torch.')}; export with precision fp32")
    u2, v2 = up.double(), down.double()
    if erasure.transform.is_dense and u2.shape[1] == up0.shape[1]:  # down is diagonal: compare directly
        exact2 = float(up0.square().sum())
        diff2 = float((u2 * v2.diagonal() - up0).square().sum())
    else:
        exact2 = _inner(up0, down0, up0, down0)
        diff2 = exact2 + _inner(u2, v2, u2, v2) - 2 * _inner(up0, down0, u2, v2)
    err = math.sqrt(max(diff2, 0.0) / exact2) if exact2 > 0 else 0.0
    return up, down, err
