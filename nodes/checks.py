"""Checks at the node boundary: widget values, the size of a request, and JSON-safe ``ui`` output."""

from __future__ import annotations

import json
import math

import torch

import comfy.model_management

from ..rece_core import procedure

BYTES_PER_LINE = 2 * 77 * 4
"""Memory one held line costs per text-embedding dimension: its 77 encoder rows as the encoder returned
them (at most float32) on ComfyUI's intermediate device; twice that allows for the encoder's batch
output before it is split."""
MEMORY_SHARE = 0.5
"""Share of the intermediate device's free memory the held rows may take."""


def keep_bytes(device: torch.device | None = None) -> int:
    """Encoder output the erase keeps for its report pass: ``rece_core``'s ``KEEP_BYTES``, or a quarter of
    the free memory of ComfyUI's intermediate device (where the encoder returns its rows) if less."""
    device = device or comfy.model_management.intermediate_device()
    return int(min(procedure.KEEP_BYTES, comfy.model_management.get_free_memory(device) // 4))


def held_lines(concepts: int, preserve: int, d: int, keep: int) -> int:
    """Lines whose rows are held at once: every preserve line, and of the concepts only as many as
    ``keep`` bytes hold for the report pass plus a chunk being encoded (beyond that the concepts are
    encoded again to report: ``rece_core.streamed``)."""
    return preserve + min(concepts, keep // (77 * d * 4) + procedure.CHUNK_ROWS // 77)


def check_widgets(node: type, title: str, **values: float) -> None:
    """Every FLOAT/INT widget value finite and inside its ``min``/``max`` (a JSON ``NaN`` passes
    ComfyUI's own range check, since every comparison with NaN is false); ``ValueError`` otherwise."""
    spec = node.INPUT_TYPES()["required"]
    for name, value in values.items():
        kind, opts = spec[name][0], spec[name][1] if len(spec[name]) > 1 else {}
        if kind not in ("FLOAT", "INT"):
            continue
        lo, hi = opts.get("min", -math.inf), opts.get("max", math.inf)
        try:
            ok = math.isfinite(float(value)) and lo <= float(value) <= hi
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise ValueError(f"{title}: {name} must be a finite number from {lo:g} to {hi:g}, got {value!r}")


def max_lines(d: int, device: torch.device | None = None) -> int:
    """How many concept + preserve lines one erase may hold: ``MEMORY_SHARE`` of the free memory of
    the device where the encoder rows are kept (ComfyUI's intermediate device) at ``BYTES_PER_LINE · d``
    each (at least 1)."""
    device = device or comfy.model_management.intermediate_device()
    free = comfy.model_management.get_free_memory(device)
    return max(1, int(MEMORY_SHARE * free // (BYTES_PER_LINE * d)))


def check_lines(concepts: int, preserve: int, d: int, device: torch.device | None = None) -> int:
    """Refuse, before anything is encoded, more ``held_lines`` than ``max_lines`` allows; return the
    bytes of encoder output the erase may keep (``keep_bytes``)."""
    device = device or comfy.model_management.intermediate_device()
    limit, keep = max_lines(d, device), keep_bytes(device)
    held = held_lines(concepts, preserve, d, keep)
    if held > limit:
        raise ValueError(
            f"RECE Erase Concept: {held} concept and preserve lines is more than fit in memory at once (limit {limit} "
            f"for {d}-wide text on {device}, about {BYTES_PER_LINE * d / 2**20:.1f} MiB per line, "
            f"{MEMORY_SHARE:.0%} of the free memory; every preserve line is held, and the concepts up to "
            f"{keep / 2**20:.0f} MiB); split them over several chained RECE Erase Concept nodes")
    return keep


def json_safe(value):
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN or Infinity), tuples
    as lists, tensors as numbers/lists; anything else not JSON-representable becomes its ``str``."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return str(value)


def ui_report(report: dict) -> dict:
    """A node's ``ui`` output: ``{"rece_report": [report]}``, valid strict JSON."""
    out = {"rece_report": [json_safe(report)]}
    json.dumps(out, allow_nan=False)  # cannot fail after json_safe; a cheap guard against later edits
    return out
