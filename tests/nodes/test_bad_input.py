"""Bad input and Cancel through the nodes (stand-in in CI, real with COMFYUI_PATH): every case refused
with a clear message, nothing patched or written, every ``ui`` output valid strict JSON, and the
README's bad-input table matching the messages the code really gives."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfy.model_management
from conftest import ROOT, load_pack
from factory import FakeCLIP, make_model

load_pack()
from rece_comfyui.nodes import checks
from rece_comfyui.nodes.host import encoding  # noqa: E402
from rece_comfyui.nodes import rece as nodes_module  # noqa: E402
from rece_comfyui.nodes.files import (  # noqa: E402
    ExportErasureAsLoRA, LoadErasedWeights, SaveErasedWeights)
from rece_comfyui.nodes.rece import (  # noqa: E402
    MIN_LAMB, MIN_REG, ApplyErasedWeights, RECEDeriveEmbedding, RECEEraseConcept)
from rece_comfyui.rece_core import LowRankTransform, procedure  # noqa: E402
from rece_comfyui.rece_core.files import save_erasure  # noqa: E402

ARGS = dict(concepts="nudity", guide="", preserve="", concept_kind="nudity", rounds=1, reg=0.1, lamb=0.1,
            erase_scale=1.0, preserve_scale=0.1)
BAD_FLOATS = [math.nan, math.inf, -math.inf, 1e30]


@pytest.fixture(scope="module")
def erased():
    model, clip = make_model(), FakeCLIP()
    out = RECEEraseConcept().erase(model, clip, **ARGS)
    return model, clip, out


def erase(model=None, clip=None, **kw):
    return RECEEraseConcept().erase(model or make_model(), clip or FakeCLIP(), **(ARGS | kw))


def strict_json(ui) -> str:
    return json.dumps(ui, allow_nan=False)


# --- 1. Cancel -------------------------------------------------------------------------------------

class CancellingCLIP(FakeCLIP):
    """Presses Cancel (ComfyUI's interrupt flag) during its ``after``-th encoder call."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        out = super().encode_from_tokens(tokens, return_pooled, return_dict)
        if self.calls == self.after:
            comfy.model_management.interrupt_current_processing(True)
        return out


def test_cancel_while_prompts_are_encoded_stops_within_the_chunk():
    """Encoder calls are sized to about a second each (the first: 4 prompts); Cancel is honoured after
    each, so within a chunk (106 CLIP prompts) that could take minutes on a CPU."""
    model, clip = make_model(), CancellingCLIP(after=1)
    concepts = "\n".join(f"concept {i}" for i in range(400))
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            erase(model, clip, concepts=concepts)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert clip.calls == 1 and clip.prompts == 4  # not the 108 prompts of the first chunk
    assert model.patches == {}


def test_encoder_calls_take_about_the_time_they_are_given():
    now = [0.0]

    def call(start: int, stop: int) -> None:  # 0.25 s a prompt (loading), then 1/128 s (warm)
        now[0] += (stop - start) * (0.25 if start < 20 else 1 / 128)

    calls = encoding.EncoderCalls(seconds=1.0, first=16, clock=lambda: now[0])
    calls.run(200, call)
    assert calls.sizes == [16, 4, 4, 128, 48]


# --- 2. Non-finite and out-of-range numbers ------------------------------------------------------

@pytest.mark.parametrize("value", BAD_FLOATS + [-11.0])
def test_apply_refuses_strength_nan_inf_and_out_of_range(erased, value):
    model, _, out = erased
    with pytest.raises(ValueError, match=r"Apply Erased Weights: strength must be a finite number from -10 to 10"):
        ApplyErasedWeights().apply(model, out["result"][1], value)
    assert model.patches == {}


@pytest.mark.parametrize("name", ["reg", "lamb", "erase_scale", "preserve_scale", "rounds"])
@pytest.mark.parametrize("value", BAD_FLOATS)
def test_erase_refuses_non_finite_or_huge_parameters(name, value):
    clip = FakeCLIP()
    with pytest.raises(ValueError, match=f"RECE Erase Concept: {name} must be a finite number"):
        erase(clip=clip, **{name: value})
    assert clip.calls == 0


@pytest.mark.parametrize("value", BAD_FLOATS + [0.0])
def test_derive_refuses_bad_reg(erased, value):
    with pytest.raises(ValueError, match="RECE Derive Embedding: reg must be a finite number from 1e-06"):
        RECEDeriveEmbedding().derive(erased[2]["result"][0], erased[1], "nudity", value)


def test_every_nodes_ui_output_is_strict_json(erased, models_dir):
    model, clip, out = erased
    erasure = out["result"][1]
    uis = [out["ui"],
           RECEDeriveEmbedding().derive(out["result"][0], clip, "nudity", 0.1)["ui"],
           ApplyErasedWeights().apply(out["result"][0], erasure, -1.0)["ui"],
           SaveErasedWeights().save(erasure, "e")["ui"],
           LoadErasedWeights().load("e_00001.safetensors")["ui"],
           ExportErasureAsLoRA().export(make_model(), erasure, "l", 0, "fp16")["ui"]]
    for ui in uis:
        assert set(ui) == {"rece_report"} and len(ui["rece_report"]) == 1
        strict_json(ui)
    # and the helper itself turns anything non-finite into null
    dirty = {"a": math.nan, "b": [math.inf, (1.0, -math.inf)], "c": torch.tensor([1.0, math.nan]), "d": {1: 2}}
    assert checks.ui_report(dirty)["rece_report"][0] == {"a": None, "b": [None, [1.0, None]], "c": [1.0, None],
                                                        "d": {"1": 2}}


# --- 3. fp16 LoRA export ---------------------------------------------------------------------------

@pytest.mark.parametrize("erase_scale", [1e4, 1e5])
def test_fp16_lora_export_at_large_erase_scale_is_finite_and_honest(models_dir, erase_scale):
    model = make_model("sd15")
    erasure = erase(model, FakeCLIP("sd15"), erase_scale=erase_scale)["result"][1]
    report = ExportErasureAsLoRA().export(model, erasure, "big", 0, "fp16")["result"][0]
    lora = load_file(str(models_dir / "loras" / "big_00001.safetensors"))
    assert all(bool(torch.isfinite(v).all()) for v in lora.values())
    assert all(float(v) >= 1 for k, v in lora.items() if k.endswith(".alpha"))
    assert "exact" not in report and "largest relative error" in report and "fp16" in report


def overflowing(erasure):
    """A model with weights ×1e9 and an erasure with ‖P − I‖ ×1e4 (still under the file limit):
    W (P − I) ~ 1e13, so even balanced factors (~√ of it) exceed float16's 65504."""
    t = erasure.transform
    loud = make_model()
    with torch.no_grad():
        for p in loud.model.parameters():
            p.mul_(1e9)
    return loud, dataclasses.replace(erasure, transform=LowRankTransform(t.up * 1e4, t.down))


def test_fp16_export_that_cannot_fit_is_refused_and_writes_nothing(models_dir, erased):
    loud, big = overflowing(erased[2]["result"][1])
    with pytest.raises(ValueError, match="overflow float16; export with precision fp32"):
        ExportErasureAsLoRA().export(loud, big, "x", 0, "fp16")
    assert not list((models_dir / "loras").iterdir())


# --- 4. Number of concepts -------------------------------------------------------------------------

def test_too_many_lines_refused_before_anything_is_encoded(monkeypatch):
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda dev=None, torch_free_too=False: 2**24)
    clip = FakeCLIP()
    limit = checks.max_lines(64, torch.device("cpu"))
    assert limit == int(0.5 * 2**24 // (checks.BYTES_PER_LINE * 64))
    lines = "\n".join(f"c{i}" for i in range(limit + 1))
    with pytest.raises(ValueError, match=rf"{limit + 1} concept and preserve lines is more than fit in memory "
                                         rf"at once \(limit {limit} "):
        erase(clip=clip, concepts=lines)
    assert clip.calls == 0
    erase(clip=clip, concepts="\n".join(f"c{i}" for i in range(limit)), rounds=0)  # at the limit: runs


def test_concepts_beyond_the_kept_rows_do_not_count_against_the_limit(monkeypatch):
    """Only ``KEEP_BYTES`` of concept rows (plus a chunk) are held; preserve lines are all held."""
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda dev=None, torch_free_too=False: 2**24)
    monkeypatch.setattr(procedure, "KEEP_BYTES", 10 * 77 * 64 * 4)  # 10 prompts' rows
    limit, keep = checks.max_lines(64, torch.device("cpu")), checks.keep_bytes(torch.device("cpu"))
    assert keep == procedure.KEEP_BYTES and checks.held_lines(limit + 100, 0, 64, keep) == 10 + 106 < limit
    clip = FakeCLIP()
    (_, erasure, _) = erase(clip=clip, concepts="\n".join(f"c{i}" for i in range(limit + 100)), rounds=0)["result"]
    assert len(erasure.rounds[0].reach) == limit + 100
    with pytest.raises(ValueError, match=rf"{limit + 1} concept and preserve lines is more than fit in memory"):
        erase(clip=clip, concepts="c", preserve="\n".join(f"p{i}" for i in range(limit)))


def test_the_kept_encoder_output_is_at_most_a_quarter_of_the_free_memory(monkeypatch):
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda dev=None, torch_free_too=False: 2**30)
    assert checks.keep_bytes(torch.device("cpu")) == 2**28 < procedure.KEEP_BYTES
    seen = []
    real = procedure.rece
    monkeypatch.setattr(nodes_module, "rece", lambda *a, **kw: seen.append(kw["keep_bytes"]) or real(*a, **kw))
    erase(concepts="a\nb")
    assert seen == [2**28]


def test_the_limit_follows_the_free_memory_and_text_width():
    free = comfy.model_management.get_free_memory(torch.device("cpu"))
    assert free > 0
    assert checks.max_lines(768, torch.device("cpu")) == max(1, int(0.5 * free // (checks.BYTES_PER_LINE * 768)))
    assert checks.max_lines(2048, torch.device("cpu")) < checks.max_lines(768, torch.device("cpu"))


# --- 5. guide == concept ---------------------------------------------------------------------------

@pytest.mark.parametrize("guide", ["nudity", "Nudity", "  NUDITY "])
def test_guide_that_encodes_like_the_concept_is_refused(guide):
    model = make_model()
    with pytest.raises(ValueError, match=r"the concept 'nudity' and its guide '.*' encode to the same text embedding"):
        erase(model, guide=guide)
    assert model.patches == {}


# --- 6. Rank 0 -------------------------------------------------------------------------------------

def test_rank_zero_erasure_is_never_exported_or_saved(models_dir, erased):
    model, _, out = erased
    empty = dataclasses.replace(out["result"][1], transform=LowRankTransform.identity(64, dtype=torch.float32))
    with pytest.raises(ValueError, match="rank 0 .* nothing to export"):
        ExportErasureAsLoRA().export(model, empty, "zero", 0, "fp16")
    with pytest.raises(ValueError, match="rank 0"):
        SaveErasedWeights().save(empty, "zero")
    assert not list((models_dir / "loras").iterdir()) and not list((models_dir / "rece").iterdir())


def test_rank_zero_file_refused_on_load(models_dir, erased):
    path = models_dir / "rece" / "zero.safetensors"
    save_erasure(erased[2]["result"][1], str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    info = json.loads(meta["rece"]) | {"rank": 0}
    save_file({"transform.up": torch.zeros(64, 0), "transform.down": torch.zeros(0, 64)}, str(path),
              metadata={**meta, "rece": json.dumps(info)})
    with pytest.raises(ValueError, match="zero.safetensors: holds no erasure"):
        LoadErasedWeights().load("zero.safetensors")


# --- 8. Widget ranges ------------------------------------------------------------------------------

def test_widget_minimums_of_reg_and_lamb_work():
    spec = RECEEraseConcept.INPUT_TYPES()["required"]
    assert spec["reg"][1]["min"] == MIN_REG > 0 and spec["lamb"][1]["min"] == MIN_LAMB > 0
    assert RECEDeriveEmbedding.INPUT_TYPES()["required"]["reg"][1]["min"] == MIN_REG
    assert spec["reg"][1]["default"] == 0.1 and spec["lamb"][1]["default"] == 0.1  # defaults unchanged
    model, clip = make_model("sd15"), FakeCLIP("sd15")
    erased_model, erasure, _ = erase(model, clip, reg=MIN_REG, lamb=MIN_LAMB, rounds=2)["result"]
    assert erasure.rank > 0
    RECEDeriveEmbedding().derive(erased_model, clip, "nudity", MIN_REG)


def test_load_dropdown_leaves_out_links_leading_outside(models_dir, erased, tmp_path_factory):
    save_erasure(erased[2]["result"][1], str(models_dir / "rece" / "good.safetensors"))
    outside = tmp_path_factory.mktemp("elsewhere") / "x.safetensors"
    save_erasure(erased[2]["result"][1], str(outside))
    os.symlink(outside, models_dir / "rece" / "link.safetensors")
    (models_dir / "rece" / "inside").mkdir()
    os.symlink(models_dir / "rece" / "good.safetensors", models_dir / "rece" / "inside" / "alias.safetensors")
    choices = LoadErasedWeights.INPUT_TYPES()["required"]["erasure_name"][0]
    assert "link.safetensors" not in choices
    assert "good.safetensors" in choices and os.path.join("inside", "alias.safetensors") in choices


# --- 9. Text edge cases ----------------------------------------------------------------------------

@pytest.mark.parametrize("field, text", [("concepts", "a <|endoftext|> b"), ("concepts", "<|startoftext|>nudity"),
                                         ("guide", "art <|endoftext|> more"), ("preserve", "a <|endoftext|> cat")])
def test_literal_special_tokens_inside_a_prompt_are_refused(field, text):
    model = make_model()
    with pytest.raises(ValueError, match="contains the tokenizer's start or end token"):
        erase(model, **{field: text})
    assert model.patches == {}


def test_special_token_at_the_very_end_reads_as_the_plain_prompt():
    """CLIP's tokenizer gives 'nudity<|endoftext|>' the very ids of 'nudity' (the end token it appends
    follows anyway): same ids, same alignment, same erasure."""
    plain = erase(concepts="nudity")["result"][1]
    suffixed = erase(concepts="nudity <|endoftext|>")["result"][1]
    assert torch.equal(plain.transform.up, suffixed.transform.up)


@pytest.mark.parametrize("prefix", [".", "./", ".hidden", "rece/.x", ".cache/erasure", "  "])
def test_save_prefix_giving_a_hidden_or_empty_name_is_refused(models_dir, erased, prefix):
    with pytest.raises(ValueError, match="filename_prefix"):
        SaveErasedWeights().save(erased[2]["result"][1], prefix)
    with pytest.raises(ValueError, match="filename_prefix"):
        ExportErasureAsLoRA().export(erased[0], erased[2]["result"][1], prefix, 0, "fp32")
    written = [p for d in ("rece", "loras") for p in (models_dir / d).rglob("*")]
    assert written == []


def test_a_prefix_that_normalises_to_a_plain_name_is_kept(models_dir, erased):
    SaveErasedWeights().save(erased[2]["result"][1], "rece/./erasure/.")
    assert [p.name for p in (models_dir / "rece").rglob("*.safetensors")] == ["erasure_00001.safetensors"]


# --- The README's bad-input table, checked against the messages -----------------------------------

def _message(call) -> str:
    try:
        out = call()
    except Exception as exc:  # noqa: BLE001 - the message is what is checked
        return f"{type(exc).__name__}: {exc}"
    result = out["result"] if isinstance(out, dict) else out
    ui = [json.dumps(out["ui"], ensure_ascii=False)] if isinstance(out, dict) and "ui" in out else []
    return "\n".join([str(x) for x in result if isinstance(x, str)] + ui)


def _bad_file(models_dir, erasure, name, edit) -> str:
    path = models_dir / "rece" / name
    save_erasure(erasure, str(path))
    data = path.read_bytes()
    path.write_bytes(edit(data))
    return name


def _meta_edit(**fields):
    def edit(data: bytes) -> bytes:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        info = json.loads(header["__metadata__"]["rece"]) | fields
        header["__metadata__"]["rece"] = json.dumps(info)
        raw = json.dumps(header).encode()
        return len(raw).to_bytes(8, "little") + raw + data[8 + n:]
    return edit


def _header_edit(change):
    def edit(data: bytes) -> bytes:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        change(header)
        raw = json.dumps(header).encode()
        return len(raw).to_bytes(8, "little") + raw + data[8 + n:]
    return edit


def _with_tensors(models_dir, erasure, name, up, down, **fields):
    path = models_dir / "rece" / name
    save_erasure(erasure, str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    meta["rece"] = json.dumps(json.loads(meta["rece"]) | fields)
    save_file({"transform.up": up, "transform.down": down}, str(path), metadata=meta)
    return name


def readme_rows() -> list[tuple[str, list[str]]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Bad input: what you see", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|") or line.startswith("| ---") or line.startswith("| input"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append((cells[0], re.findall(r"`([^`]+)`", cells[1])))
    return rows


def table_cases(models_dir, model, clip, erasure, erased_model, lists):
    def load(name):
        return lambda: LoadErasedWeights().load(name)

    t = erasure.transform

    def cancel():
        try:
            return erase(clip=CancellingCLIP(after=1), concepts="a\nb\nc")
        finally:
            comfy.model_management.interrupt_current_processing(False)

    def too_many():
        saved = comfy.model_management.get_free_memory
        comfy.model_management.get_free_memory = lambda dev=None, torch_free_too=False: 2**16
        try:
            return erase(concepts="a\nb\nc")
        finally:
            comfy.model_management.get_free_memory = saved

    pickle_path = models_dir / "rece" / "e.pt"
    torch.save({"x": 1}, pickle_path)
    link = tmp_outside = models_dir / "outside.safetensors"
    save_erasure(erasure, str(tmp_outside))
    os.symlink(link, models_dir / "rece" / "link.safetensors")
    loud, big = overflowing(erasure)
    (lists / "bom.txt").write_bytes("\ufeffnudity\r\n".encode())
    (lists / "big.txt").write_bytes(("ß" * (2 * 2**20 + 1)).encode())  # 2 Mi characters + 1: 4 MiB + 2 bytes

    def twice():
        SaveErasedWeights().save(erasure, "twice")
        return SaveErasedWeights().save(erasure, "twice")

    from dit_factory import DiTCLIP
    from dit_factory import make_model as make_dit

    return {
        "a literal special token of T5, UMT5, Qwen or Gemma in a prompt on a DiT family (`</s>`, `<pad>`, "
        "`<unk>`, `<|im_end|>`, `<eos>`…)": lambda: erase(make_dit("flux"), DiTCLIP("flux"), concepts="cat </s> dog"),
        "a concept list saved as UTF-8 with a byte-order mark (Windows Notepad)":
            lambda: erase(concepts="", concept_list="bom.txt"),
        "a concept list over 4 MiB (counted in bytes, not characters)": lambda: erase(concept_list="big.txt"),
        "`concept_list` left out or `None` (an API caller)": lambda: erase(concept_list=None),
        "a save prefix the OS cannot create (a NUL character, a 300-character name), in Save or Export as LoRA":
            lambda: SaveErasedWeights().save(erasure, "n" * 300),
        "two saves with the same prefix at the same time": twice,
        "Apply at strength −t on a model that carries that erasure at t (−1 after 1)":
            lambda: ApplyErasedWeights().apply(erased_model, erasure, -1.0),
        "Apply at a negative strength that undoes nothing the model carries":
            lambda: ApplyErasedWeights().apply(model, erasure, -1.0),
        "file: factors all zero (`P − I = 0`, whatever rank its metadata says)":
            load(_with_tensors(models_dir, erasure, "zeros.safetensors", torch.zeros_like(t.up), t.down)),
        "a model with none of the text readers the pack knows (e.g. a video VAE, an image-conditioned SVD)":
            lambda: erase(make_model(config="SVD_img2vid", cross_attention=False)),
        "a CLIP whose text width is not the model's": lambda: erase(clip=FakeCLIP("sd15")),
        "no concept (empty or blank lines)": lambda: erase(concepts=" \n "),
        "a prompt over 75 tokens": lambda: erase(concepts=" ".join(["word"] * 100)),
        "a literal `<|endoftext|>` (or `<|startoftext|>`) inside a prompt":
            lambda: erase(concepts="a <|endoftext|> b"),
        "a guide that encodes like its concept (`Nudity` for `nudity`)": lambda: erase(guide="Nudity"),
        "more lines held at once than fit in memory (every preserve line; concepts only up to 1 GiB of rows)": too_many,
        "NaN, Infinity or an out-of-range number in a widget (e.g. strength NaN through the API)":
            lambda: ApplyErasedWeights().apply(model, erasure, math.nan),
        "Cancel while the node runs": cancel,
        "Derive Embedding on a model with no erasure": lambda: RECEDeriveEmbedding().derive(model, clip, "x", 0.1),
        "an erasure input that is not a RECE erasure": lambda: ApplyErasedWeights().apply(model, "nope", 1.0),
        "an erasure made for another text width": lambda: ApplyErasedWeights().apply(make_model("sd15"), erasure, 1.0),
        "file: not `.safetensors` (e.g. a pickle)": load("e.pt"),
        "file: header absurdly large or truncated":
            load(_bad_file(models_dir, erasure, "big.safetensors", lambda d: (2**40).to_bytes(8, "little") + d[8:])),
        "file: header not valid JSON, nested absurdly deep, an entry that is not a tensor":
            load(_bad_file(models_dir, erasure, "hdr.safetensors",
                           _header_edit(lambda h: h.__setitem__("transform.up", [1, 2])))),
        "file: not a RECE erasure (e.g. a LoRA)":
            load(_bad_file(models_dir, erasure, "lora.safetensors",
                           _header_edit(lambda h: h["__metadata__"].__setitem__("format", "lora")))),
        "file: unknown format version":
            load(_bad_file(models_dir, erasure, "v9.safetensors",
                           _header_edit(lambda h: h["__metadata__"].__setitem__("format_version", "9")))),
        "file: missing, extra or misnamed tensors":
            load(_bad_file(models_dir, erasure, "names.safetensors",
                           _header_edit(lambda h: h.__setitem__("transform.dn", h.pop("transform.down"))))),
        "file: tensors not float32":
            load(_with_tensors(models_dir, erasure, "half.safetensors", t.up.half(), t.down)),
        "file: wrong shapes":
            load(_with_tensors(models_dir, erasure, "shape.safetensors", t.up[:, :-1].contiguous(), t.down)),
        "file: NaN or Inf in the factors":
            load(_with_tensors(models_dir, erasure, "nan.safetensors", t.up * math.nan, t.down)),
        "file: factors so large that W(P − I) would swamp or overflow the weights (‖P − I‖ > 1e6)":
            load(_with_tensors(models_dir, erasure, "huge.safetensors", t.up * 1e30, t.down)),
        "file: rank 0 (no erasure)":
            load(_with_tensors(models_dir, erasure, "zero.safetensors", torch.zeros(64, 0), torch.zeros(0, 64),
                               rank=0)),
        "file: `rece` metadata not valid JSON (or NaN, or nested absurdly deep)":
            load(_bad_file(models_dir, erasure, "json.safetensors",
                           _header_edit(lambda h: h["__metadata__"].__setitem__("rece", "[" * 100_000)))),
        "file: a metadata field of the wrong type (e.g. `\"extra\": [1, 2]`)":
            load(_bad_file(models_dir, erasure, "extra.safetensors", _meta_edit(extra=[1, 2]))),
        "file: truncated tensor data":
            load(_bad_file(models_dir, erasure, "cut.safetensors", lambda d: d[:-16])),
        "a file name with `..` or an absolute path": load("../x.safetensors"),
        "a link in `models/rece` leading outside it": load("link.safetensors"),
        "a save prefix that names a hidden file (`.`, `.x`, `rece/.x`)":
            lambda: SaveErasedWeights().save(erasure, "."),
        "Export as fp16 when the LoRA factors overflow half precision":
            lambda: ExportErasureAsLoRA().export(loud, big, "x", 0, "fp16"),
        "Export as fp16 (rounding error)": lambda: ExportErasureAsLoRA().export(model, erasure, "y", 0, "fp16"),
        "Export of a rank-0 erasure": lambda: ExportErasureAsLoRA().export(model, dataclasses.replace(
            erasure, transform=LowRankTransform.identity(64, dtype=torch.float32)), "z", 0, "fp16"),
    }


def test_readme_bad_input_table_matches_the_messages(models_dir, erased, monkeypatch, tmp_path):
    import folder_paths

    from rece_comfyui.nodes import files

    model, clip, out = erased
    lists = tmp_path / "lists"
    lists.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, files.LISTS, ([str(lists)], {".txt"}))
    rows = readme_rows()
    cases = table_cases(models_dir, model, clip, out["result"][1], out["result"][0], lists)
    assert [r for r, _ in rows if r not in cases] == [] and [c for c in cases if c not in dict(rows)] == []
    for row, fragments in rows:
        message = _message(cases[row])
        assert fragments, row
        for fragment in fragments:
            assert fragment in message, f"README row {row!r}: {fragment!r} not in {message!r}"
    assert model.patches == {}
