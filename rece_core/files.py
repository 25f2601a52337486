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

Only safetensors is read (never pickle); every malformed file is refused with a ``ValueError``
naming the file and the problem, before anything is returned.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from datetime import datetime, timezone

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .procedure import Erasure, RoundReport
from .transform import LowRankTransform

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_HEADER", "fingerprint", "load_erasure", "lora_factors",
           "lora_key", "save_erasure"]

FORMAT = "rece-erasure"
FORMAT_VERSION = 1
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


def save_erasure(erasure: Erasure, path: str, *, pack_version: str = "") -> None:
    """Write ``erasure`` to ``path`` (``.safetensors``)."""
    t = erasure.transform
    meta = {
        "concepts": list(erasure.concepts), "guides": list(erasure.guides), "preserve": list(erasure.preserve),
        "lamb": erasure.lamb, "erase_scale": erasure.erase_scale, "preserve_scale": erasure.preserve_scale,
        "reg": erasure.reg, "epochs": erasure.epochs,
        "rounds": [{"step": r.step, "guide_gap": list(r.guide_gap), "reach": list(r.reach), "drift": r.drift}
                   for r in erasure.rounds],
        "dim": erasure.dim, "rank": erasure.rank, "fingerprint": erasure.extra.get("fingerprint", ""),
        "architecture": erasure.extra.get("architecture", "unet"),
        "pack_version": pack_version, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": erasure.seconds, "device": erasure.device, "extra": dict(erasure.extra),
    }
    tensors = {"transform.up": t.up.detach().to("cpu", torch.float32).contiguous(),
               "transform.down": t.down.detach().to("cpu", torch.float32).contiguous()}
    save_file(tensors, path, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                       "rece": json.dumps(meta)})


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
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name}: malformed safetensors header ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{name}: malformed safetensors header (not an object)")
    return header


def load_erasure(path: str) -> Erasure:
    """Read and validate an erasure file; ``ValueError`` naming the file and the problem otherwise."""
    name = os.path.basename(path)
    if not name.endswith(".safetensors"):
        raise ValueError(f"{name}: only .safetensors erasure files are read")
    header = _header(path)
    meta = header.pop("__metadata__", None) or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{name}: not a RECE erasure file (metadata format={meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(f"{name}: unknown erasure format version {meta.get('format_version')!r} "
                         f"(this pack reads version {FORMAT_VERSION}); update the pack")
    keys = set(header)
    if keys != set(TENSORS):
        missing, extra = sorted(set(TENSORS) - keys), sorted(keys - set(TENSORS))
        raise ValueError(f"{name}: expected tensors {list(TENSORS)}; missing {missing}, unexpected {extra}")
    for key in TENSORS:
        if header[key].get("dtype") != "F32":
            raise ValueError(f"{name}: tensor {key} must be float32, found {header[key].get('dtype')}")
    try:
        info = json.loads(meta.get("rece", ""))
    except json.JSONDecodeError:
        raise ValueError(f"{name}: the 'rece' metadata is not valid JSON") from None
    if not isinstance(info, dict):
        raise ValueError(f"{name}: the 'rece' metadata is not a JSON object")
    for field, kind in FIELDS.items():
        if not isinstance(info.get(field), kind) or isinstance(info.get(field), bool):
            raise ValueError(f"{name}: metadata field {field!r} is missing or not a {getattr(kind, '__name__', 'number')}")
    d, r = info["dim"], info["rank"]
    shapes = {"transform.up": [d, r], "transform.down": [r, d]}
    for key, shape in shapes.items():
        if header[key].get("shape") != shape:
            raise ValueError(f"{name}: tensor {key} has shape {header[key].get('shape')}, expected {shape} "
                             f"(text width {d}, rank {r})")
    try:
        tensors = load_file(path)
    except Exception as exc:  # safetensors' own consistency checks (offsets, sizes)
        raise ValueError(f"{name}: corrupt tensor data ({exc})") from None
    for key, value in tensors.items():
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}: tensor {key} contains NaN or Inf")
    if not all(math.isfinite(float(info[f])) and float(info[f]) >= 0
               for f in ("lamb", "erase_scale", "preserve_scale", "reg")):
        raise ValueError(f"{name}: parameters must be finite and non-negative")
    try:
        rounds = tuple(RoundReport(int(x["step"]), tuple(map(float, x["guide_gap"])), tuple(map(float, x["reach"])),
                                   {str(k): float(v) for k, v in x["drift"].items()}) for x in info["rounds"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError(f"{name}: metadata field 'rounds' is malformed") from None
    extra = {str(k): str(v) for k, v in (info.get("extra") or {}).items()}
    if info.get("fingerprint"):
        extra["fingerprint"] = str(info["fingerprint"])
    arch = info.get("architecture", extra.get("architecture", "unet"))
    if not isinstance(arch, str) or not arch.isidentifier():
        raise ValueError(f"{name}: metadata field 'architecture' is not a name")
    extra["architecture"] = arch
    extra["file"] = name
    return Erasure(
        transform=LowRankTransform(tensors["transform.up"], tensors["transform.down"]),
        concepts=tuple(map(str, info["concepts"])), guides=tuple(map(str, info["guides"])),
        preserve=tuple(map(str, info["preserve"])), lamb=float(info["lamb"]), erase_scale=float(info["erase_scale"]),
        preserve_scale=float(info["preserve_scale"]), reg=float(info["reg"]), epochs=int(info["epochs"]),
        rounds=rounds, seconds=float(info.get("seconds", 0.0) or 0.0), device=str(info.get("device", "")),
        extra=extra)


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


def lora_factors(erasure: Erasure, w: Tensor, rank: int = 0) -> tuple[Tensor, Tensor, float]:
    """``(up [out, k], down [k, d], relative error)`` of ``W (P − I)``; exact when ``rank`` is 0 or ≥ r.

    A lower rank keeps the best rank-``rank`` approximation (SVD) and returns its relative error.
    """
    up, down = erasure.delta(w)
    if rank <= 0 or rank >= up.shape[1]:
        return up, down, 0.0
    qu, ru = torch.linalg.qr(up.double())
    qv, rv = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(ru @ rv.T)
    err = float(s[rank:].norm() / s.norm()) if s.norm() > 0 else 0.0
    return ((qu @ u[:, :rank]) * s[:rank]).float(), (vh[:rank] @ qv.T).float(), err
