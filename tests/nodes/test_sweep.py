"""Regressions of the adversarial sweep (issue 23): each case a user or an API caller reached.

Both tiers (stand-in in CI, real ComfyUI with COMFYUI_PATH)."""

from __future__ import annotations

import threading

import pytest
import torch

import comfy.model_management
import comfy.utils
import folder_paths
from conftest import load_pack
from dit_factory import DiTCLIP
from dit_factory import make_model as make_dit
from factory import FakeCLIP, effective_weights, make_model

load_pack()
from rece_comfyui.nodes import files  # noqa: E402
from rece_comfyui.nodes.files import ExportErasureAsLoRA, LoadErasedWeights, SaveErasedWeights  # noqa: E402
from rece_comfyui.nodes.host import encoding, weights  # noqa: E402
from rece_comfyui.nodes.rece import ApplyErasedWeights, RECEDeriveEmbedding, RECEEraseConcept  # noqa: E402
from rece_comfyui.rece_core import LowRankTransform  # noqa: E402
from rece_comfyui.rece_core.files import save_erasure  # noqa: E402

ARGS = dict(concepts="nudity", guide="", preserve="", concept_kind="nudity", rounds=1, reg=0.1, lamb=0.1,
            erase_scale=1.0, preserve_scale=0.1)


def erase(model=None, clip=None, **kw):
    return RECEEraseConcept().erase(model or make_model(), clip or FakeCLIP(), **(ARGS | kw))


@pytest.fixture(scope="module")
def erased():
    model, clip = make_model(), FakeCLIP()
    out = erase(model, clip)
    return model, clip, out["result"][0], out["result"][1]


@pytest.fixture()
def lists_dir(tmp_path, monkeypatch):
    user = tmp_path / "lists"
    user.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, files.LISTS, ([str(user)], {".txt"}))
    if hasattr(folder_paths, "filename_list_cache"):
        monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return user


# 1. A list saved with a byte-order mark (Windows Notepad) reads as the same concepts.
def test_concept_list_with_a_bom_erases_the_same_concepts(lists_dir):
    (lists_dir / "bom.txt").write_bytes("\ufeffnudity\r\ncat\r\n".encode("utf-8"))
    (lists_dir / "plain.txt").write_bytes(b"nudity\ncat\n")
    assert files.read_concept_list("bom.txt") == ["nudity", "cat"]
    with_bom = erase(concepts="nudity", concept_list="bom.txt")["result"][1]
    plain = erase(concepts="nudity", concept_list="plain.txt")["result"][1]
    assert with_bom.concepts == ("nudity", "cat")  # de-duplicated against the widget's 'nudity'
    assert torch.equal(with_bom.transform.up, plain.transform.up)


# 6. The list limit counts bytes, not characters.
def test_list_limit_counts_bytes(lists_dir, monkeypatch):
    monkeypatch.setattr(files, "MAX_LIST_BYTES", 1000)
    (lists_dir / "wide.txt").write_text("ß" * 600 + "\n", encoding="utf-8")  # 600 characters, 1201 bytes
    with pytest.raises(ValueError, match="wide.txt: larger than"):
        files.read_concept_list("wide.txt")
    (lists_dir / "fits.txt").write_text("ß" * 400 + "\n", encoding="utf-8")
    assert files.read_concept_list("fits.txt") == ["ß" * 400]


# 8. concept_list=None from Python (the optional input left out by an API caller).
def test_concept_list_none_is_no_list():
    assert erase(concept_list=None)["result"][1].concepts == ("nudity",)
    with pytest.raises(ValueError, match="concept list must be a file name"):
        erase(concept_list=3)


# 2. Literal special tokens on T5, UMT5, Qwen and Gemma tokenizers are refused like CLIP's <|endoftext|>.
@pytest.mark.parametrize("family, text", [
    ("flux", "cat </s> dog"), ("flux", "</s>"), ("flux", "<pad>"), ("chroma", "a <unk> b"), ("wan", "x <extra_id_0>"),
    ("qwen_image", "cat <|im_end|> dog"), ("qwen_image", "<|endoftext|>"), ("lumina2", "a <eos> b"),
    ("lumina2", "<start_of_turn>user"), ("sd3", "a <|endoftext|> b"), ("hunyuan_video", "cat <|eot_id|> dog"),
    ("qwen_image21", "a <|im_start|> b"),
])
def test_literal_special_tokens_refused_on_every_family(family, text):
    model = make_dit(family)
    with pytest.raises(ValueError, match="contains the special token"):
        erase(model, DiTCLIP(family), concepts=text, rounds=0)
    with pytest.raises(ValueError, match="contains the special token"):
        erase(model, DiTCLIP(family), concepts="nudity", preserve=text, rounds=0)
    assert model.patches == {}


def test_special_tokens_found_in_the_tokenizers_own_list():
    class HF:
        all_special_tokens = ["[MYEND]"]

    class Tok:
        tokenizer = HF()

    assert encoding.special_tokens_in("a [MYEND] b", Tok()) == ["[MYEND]"]
    assert encoding.special_tokens_in("[INST] a cat [/INST]", None) == ["[/INST]", "[INST]"]  # Mistral (Flux.2, ERNIE)
    assert encoding.special_tokens_in("a photo of a cat, <lora:x> s", Tok()) == []


# 3. Concurrent saves with one prefix each get their own file.
def test_concurrent_saves_with_one_prefix_keep_every_file(models_dir, erased):
    _, _, _, erasure = erased
    variants = [erasure.__class__(**(erasure.__dict__ | {"concepts": (f"c{i}",)})) for i in range(8)]
    barrier, errors = threading.Barrier(len(variants)), []

    def save(e):
        try:
            barrier.wait()
            SaveErasedWeights().save(e, "rece/same")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(e,)) for e in variants]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    saved = sorted((models_dir / "rece" / "rece").glob("same_*.safetensors"))
    assert [p.name for p in saved] == [f"same_{n:05}.safetensors" for n in range(1, 9)]
    concepts = {LoadErasedWeights().load(f"rece/{p.name}")["result"][0].concepts for p in saved}
    assert concepts == {(f"c{i}",) for i in range(8)}


def test_a_failed_write_leaves_no_empty_file(models_dir, erased, monkeypatch):
    def fail(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_erasure", fail)
    with pytest.raises(OSError):
        SaveErasedWeights().save(erased[3], "x")
    assert list((models_dir / "rece").rglob("*")) == []


# 4. A prefix the OS cannot create: a clear message naming it, for Save and Export.
@pytest.mark.parametrize("prefix", ["bad\0name", "a" * 300, "rece/" + "b" * 300 + "/x"])
def test_save_prefix_the_os_cannot_create_is_named(models_dir, erased, prefix):
    model, _, _, erasure = erased
    for call in (lambda: SaveErasedWeights().save(erasure, prefix),
                 lambda: ExportErasureAsLoRA().export(model, erasure, prefix, 0, "fp32")):
        with pytest.raises(ValueError, match="filename_prefix") as info:
            call()
        assert repr(prefix)[:40] in str(info.value)
    assert [p for d in ("rece", "loras") for p in (models_dir / d).rglob("*.safetensors")] == []


# 5. All-zero factors are "holds no erasure", whatever the metadata's rank.
def test_all_zero_factors_refused_on_load(models_dir, erased):
    erasure = erased[3]
    zero = erasure.__class__(**(erasure.__dict__ | {"transform": LowRankTransform(
        torch.zeros_like(erasure.transform.up), erasure.transform.down)}))
    save_erasure(zero, str(models_dir / "rece" / "zero.safetensors"))
    with pytest.raises(ValueError, match="zero.safetensors: holds no erasure"):
        LoadErasedWeights().load("zero.safetensors")


# 7. Strength −1 undoes strength +1, as with a LoRA (−t undoes t); anything else negative is refused.
def test_strength_minus_one_restores_the_weights(erased):
    model, clip, out, erasure = erased
    keys = weights.cross_attention_keys(model)
    base = effective_weights(model, keys)
    undone = ApplyErasedWeights().apply(out, erasure, -1.0)["result"][0]
    got = effective_weights(undone, keys)
    assert all(torch.equal(got[k], base[k]) for k in keys)
    assert weights.applied_erasures(undone) == [] and weights.applied_erasures(out) != []  # out untouched
    with pytest.raises(ValueError, match="carries no RECE erasure"):
        RECEDeriveEmbedding().derive(undone, clip, "nudity", 0.1)
    half = ApplyErasedWeights().apply(ApplyErasedWeights().apply(model, erasure, 0.5)["result"][0],
                                      erasure, -0.5)["result"][0]
    assert all(torch.equal(v, base[k]) for k, v in effective_weights(half, keys).items())
    assert model.patches == {}


def test_negative_strength_of_an_erasure_not_carried_is_refused(erased):
    model, _, out, erasure = erased
    for m, t in ((model, -1.0), (out, -0.5)):
        with pytest.raises(ValueError, match="a negative strength undoes an erasure this model carries"):
            ApplyErasedWeights().apply(m, erasure, t)
    assert model.patches == {}


# 9. The bar ticks per encoder call, so it moves while the first chunk is encoded.
def test_progress_ticks_after_every_encoder_call(monkeypatch):
    seen, calls = [], []

    class Counting(FakeCLIP):
        def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
            calls.append(len(seen))  # bar updates so far
            return super().encode_from_tokens(tokens, return_pooled, return_dict)

    ticks = iter(range(10**6))

    class OneSecondACall(encoding.EncoderCalls):
        """An injected clock: every call takes one second, so calls stay at four prompts."""

        def __init__(self, **kw):
            super().__init__(clock=lambda: float(next(ticks)), **kw)

    monkeypatch.setattr(encoding, "EncoderCalls", OneSecondACall)
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        erase(clip=Counting(), concepts="\n".join(f"concept {i}" for i in range(12)))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert len(calls) == 4  # 14 prompts (12 concepts, '' and ' ') in calls of 4, all before any weight is read
    assert all(calls[i] > calls[i - 1] for i in range(1, len(calls)))  # the bar moved between any two calls
    values = [v for v, _ in seen]
    assert values == sorted(values) and seen[-1][0] == seen[-1][1]


def test_cancel_is_honoured_within_a_chunks_sums():
    """The float64 sums of a chunk run in blocks of rows, Cancel checked before each."""
    from rece_comfyui.rece_core import streamed

    class Stop(Exception):
        pass

    d, rows = 16, 3 * streamed.BLOCK_ROWS + 5
    stats = streamed.Statistics(d, torch.device("cpu"))
    c = torch.randn(rows, d, dtype=torch.float64)
    g = torch.randn(rows, d, dtype=torch.float64)
    chunk = streamed.Chunk(c, [rows], [g], [0], [0])
    checks = []

    def check():
        checks.append(1)
        if len(checks) == 3:
            raise Stop

    with pytest.raises(Stop):
        streamed.gather(stats, torch.eye(d, dtype=torch.float64), chunk, check)
    whole = streamed.Statistics(d, torch.device("cpu"))
    streamed.gather(whole, torch.eye(d, dtype=torch.float64), chunk)
    assert torch.allclose(whole.gram, c.T @ c, rtol=1e-12)
