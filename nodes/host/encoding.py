"""Encoding text as CLIPTextEncode does: tokenize and align token rows per family, batched encoding
sized for Cancel, width checks, and CONDITIONING for derived rows."""

from __future__ import annotations

import math
import re
import time
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from ...rece_core import TextEmbedding
from . import architectures
from .architectures import Architecture
from .weights import model_type, norm_eps, norm_scale


def _end_index(arch: Architecture, tokenizer, ids: list[int]) -> int | None:
    """Index (in the token ids) of the token after the prompt's last word; ``None`` if not found."""
    if arch.template_end is not None and arch.template_end in ids:
        return len(ids) - 1 - ids[::-1].index(arch.template_end)
    end = getattr(tokenizer, "end_token", None)
    if end is not None and end in ids:
        return ids.index(end)
    if arch.name != "unet" and getattr(tokenizer, "end_token", 0) is None:
        return len(ids)  # no end token (Gemma): the last token is the last word
    return None


def last_word_token(text: str, ids: list, tokenizer, name: str) -> int:
    """CLIP: index of the prompt's last word token, found by position: the end token the tokenizer
    appends follows it (with end-token padding, the first of the trailing run of end tokens).

    A start or end token among the word tokens (a literal ``<|endoftext|>`` in the prompt, which CLIP's
    tokenizer reads as the special token) is refused: it would move the alignment. Entries that are not
    token ids (textual-inversion embeddings) count as words.
    """
    end, start = getattr(tokenizer, "end_token", None), getattr(tokenizer, "start_token", None)
    ids = [i if isinstance(i, int) else None for i in ids]
    if end is None or end not in ids:
        raise ValueError(f"cannot find the end token of the {name!r} tokenizer to align token rows")
    j = len(ids) - 1 - ids[::-1].index(end)
    if getattr(tokenizer, "pad_token", end) == end:
        while j > 1 and ids[j - 1] == end:
            j -= 1
    first = 1 if ids[0] is not None and ids[0] == start else 0
    if any(i is not None and i in (start, end) for i in ids[first:j]):
        raise ValueError(f"the prompt {text[:60]!r} contains the tokenizer's start or end token (e.g. a literal "
                         "<|endoftext|>); remove it, RECE aligns token rows on the end token")
    return max(j - 1, 0)


# Literal special tokens of the tokenizers the families use, which they read as the special token, not as
# text: CLIP's, Qwen's and Llama-3's <|...|>, T5's / UMT5's / Pile-T5's </s> <pad> <unk> <extra_id_N>, Gemma's
# <bos> <eos> <start_of_turn>, Mistral's <s> [INST] [SYSTEM_PROMPT]…
SPECIAL_TOKENS = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?s>|<pad>|<unk>|<mask>|<bos>|<eos>|<extra_id_\d+>"
                            r"|<(?:start|end)_of_(?:turn|image)>|</?think>|</?tool_call>"
                            r"|\[/?(?:INST|SYSTEM_PROMPT|AVAILABLE_TOOLS|TOOL_CALLS|TOOL_RESULTS)\]")


def special_tokens_in(text: str, tokenizer) -> list[str]:
    """The literal special tokens in ``text``: the known ones and the tokenizer's own (``all_special_tokens``
    of the Hugging Face tokenizer an ``SDTokenizer`` wraps, where it has one)."""
    found = set(SPECIAL_TOKENS.findall(text))
    try:
        own = list(getattr(getattr(tokenizer, "tokenizer", None), "all_special_tokens", None) or ())
    except Exception:  # noqa: BLE001 - a tokenizer without the list: the known ones still count
        own = []
    found.update(t for t in own if isinstance(t, str) and len(t) > 1 and t in text)
    return sorted(found)


def tokenize(clip, text: str, arch: Architecture | None = None) -> tuple[dict, int, int]:
    """``clip.tokenize(text)`` checked for ``arch``, the index (in the reader's token ids) of the
    prompt's last word token, and the number of those ids."""
    arch = arch or architectures.by_name("unet")
    if clip is None:
        raise ValueError("clip input is invalid: None. If it comes from a checkpoint loader, the "
                         "checkpoint has no text encoder.")
    text = text if text.strip() else ""  # blank = the empty prompt, every family's unconditional
    tokens = clip.tokenize(text)
    name = arch.encoder or next(iter(tokens))
    if name not in tokens:
        raise ValueError(f"this CLIP gives no {name!r} text; the {arch.title} model reads it; use the text "
                         f"encoder that belongs to the model (this one gives {', '.join(tokens)})")
    chunks = tokens[name]
    for value in (tokens.values() if arch.name == "unet" else [chunks]):
        if len(value) != 1:
            raise ValueError(
                f"the prompt {text[:60]!r} is longer than one 77-token chunk ({len(value)} chunks); "
                "RECE aligns token rows within one chunk, so shorten it")
    tokenizer = getattr(clip.tokenizer, f"clip_{name}", None) or getattr(clip.tokenizer, name, None)
    ids = [t[0] for t in chunks[0]]
    if arch.name == "unet":
        return tokens, last_word_token(text, ids, tokenizer, name), len(ids)
    special = special_tokens_in(text, tokenizer)
    if special:  # T5 reads a literal </s> as its end token: the rows would align on the wrong word
        raise ValueError(f"the prompt {text[:60]!r} contains the special token {special[0]!r} of the {arch.title} "
                         "text encoder's tokenizer; remove it, RECE aligns token rows on the end token")
    end = _end_index(arch, tokenizer, [i if isinstance(i, int) else -1 for i in ids])
    if end is None:
        raise ValueError(f"cannot find the end token of the {name!r} tokenizer to align token rows")
    return tokens, end - 1, len(ids)


def _embedding(rows: Tensor, last: int, n_ids: int, arch: Architecture, model,
               device: torch.device | None) -> TextEmbedding:
    """The rows the readers see (normed first where ``arch`` norms them), the last word token among them.

    ``device=None`` keeps the rows as the encoder returned them (dtype and device)."""
    rows = rows.detach() if device is None else rows.detach().to(device=device, dtype=torch.float32)
    offset = max(n_ids - rows.shape[0], 0)  # a template head the encoder strips (Qwen-Image)
    scale = norm_scale(model, arch, rows.device if device is None else device)
    if scale is not None:
        rows = architectures.rms_norm(rows.float(), scale, norm_eps(model, arch))
    return TextEmbedding(rows, min(max(last - offset, 0), rows.shape[0] - 1))


def split_conditioning(out) -> tuple[Tensor, dict]:
    """``(cond [B, rows, d], extra)`` of what ``encode_from_tokens(..., return_pooled=True, return_dict=True)``
    returned (a dict, or the ``(cond, pooled)`` pair of older hosts); a ``None`` ``pooled_output`` dropped."""
    if isinstance(out, dict):
        extra = dict(out)
        cond = extra.pop("cond")
    else:
        cond, pooled = out
        extra = {"pooled_output": pooled}
    if extra.get("pooled_output") is None:
        extra.pop("pooled_output", None)
    return cond, extra


def encode(clip, text: str, device: torch.device, arch: Architecture | None = None,
           model=None) -> tuple[TextEmbedding, Tensor, dict]:
    """Encode ``text`` as CLIPTextEncode does; return the rows the model's readers see, the raw
    cond and the rest of the conditioning (``pooled_output``, ``conditioning_llama3``...).

    ``last_token`` is the index of the last word token (one before the end token) in those rows.
    Where ``arch`` has a norm before its readers, the rows are normed with ``model``'s norm weight.
    """
    arch = arch or architectures.by_name("unet")
    tokens, last, n_ids = tokenize(clip, text, arch)
    cond, extra = split_conditioning(clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True))
    return _embedding(cond[0], last, n_ids, arch, model, device), cond, extra


class EncoderCalls:
    """Sizes the encoder calls of a batched encoding so each takes about ``seconds``.

    Cancel (``check``) is honoured between calls, so within about ``seconds`` even where one chunk of
    prompts takes minutes (CPU, bigG); where the encoder is fast (a GPU) the calls grow to whole chunks
    after the first. Each call's time per prompt sizes the next (``clock``: injectable for tests); the
    first is small (``first``), since its cost is not yet known.
    """

    def __init__(self, seconds: float = 1.0, first: int = 4, check: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 tick: Callable[[int], None] | None = None) -> None:
        self.seconds, self.size, self.check, self.clock = seconds, max(1, first), check or (lambda: None), clock
        self.tick = tick  # ``tick(prompts)`` after every call: the progress bar moves while a chunk is encoded
        self.sizes: list[int] = []  # every call's number of prompts, in order

    def run(self, n: int, call: Callable[[int, int], None]) -> None:
        """``call(start, stop)`` over ``range(n)`` in calls of the current size, ``check()`` before each."""
        start = 0
        while start < n:
            self.check()
            stop = min(n, start + self.size)
            t0 = self.clock()
            call(start, stop)
            per_prompt = max(self.clock() - t0, 1e-9) / (stop - start)
            self.sizes.append(stop - start)
            self.size = max(1, int(min(self.seconds / per_prompt, 2**31)))
            start = stop
            if self.tick is not None:
                self.tick(self.sizes[-1])


def encode_many(clip, texts: list[str], arch: Architecture | None = None, model=None,
                calls: EncoderCalls | None = None) -> list[TextEmbedding]:
    """Encode prompts as CLIPTextEncode does, several in one encoder forward (CLIP and T5 families).

    ComfyUI's CLIP encodes every chunk of a token list in one batch and concatenates their rows
    (``encode_from_tokens``, its public API), weighting each chunk against the same empty
    sequence; so the one-chunk token lists of several prompts, put one after another, give each
    prompt's own rows (SD3's encoder gives every prompt's CLIP rows, then every prompt's T5 rows:
    ``_split_batch``). Prompts whose token lists differ in length go into separate calls, and
    ``calls`` (default: one call per length) bounds how long each call takes. Rows stay as the
    encoder returns them (its dtype, ComfyUI's intermediate device). Encoders that strip a template
    are encoded one prompt at a time. For the DiT families (``arch.batch_encode``) the first batch
    of each CLIP is checked against the last of its prompts encoded alone.
    """
    arch = arch or architectures.by_name("unet")

    def one_by_one() -> list[TextEmbedding]:
        out = [None] * len(texts)
        one_calls = calls or EncoderCalls(seconds=math.inf)

        def one(start: int, stop: int) -> None:
            for i in range(start, stop):
                one_calls.check()  # one prompt per encoder call here: Cancel between any two
                out[i] = encode(clip, texts[i], None, arch, model)[0]

        one_calls.run(len(texts), one)
        return out

    if arch.name != "unet" and (not arch.batch_encode or _seen(_BATCHES_ALIKE, clip) is False):
        return one_by_one()
    try:
        return _encode_batched(clip, texts, arch, model, calls)
    except _Unbatchable:  # this encoder does not give each prompt its own rows in a batch: one at a time
        _note(_BATCHES_ALIKE, clip, False)
        return one_by_one()


class _Unbatchable(Exception):
    pass


class _NoRows(Exception):
    pass


_BATCHES_ALIKE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # CLIP → its batches were checked

def _encode_batched(clip, texts: list[str], arch: Architecture, model, calls: EncoderCalls | None) -> list[TextEmbedding]:
    tokenized = [tokenize(clip, t, arch) for t in texts]
    groups: dict[tuple, list[int]] = {}
    for i, (tokens, _, _) in enumerate(tokenized):
        groups.setdefault(tuple((k, len(v[0])) for k, v in tokens.items()), []).append(i)
    out: list[TextEmbedding | None] = [None] * len(texts)
    # DiT encoders (T5): the first batch of each CLIP is checked once against one-at-a-time encoding
    checked = arch.name == "unet" or bool(_seen(_BATCHES_ALIKE, clip))
    for shape, members in groups.items():

        def batch(start: int, stop: int) -> None:
            nonlocal checked
            part = members[start:stop]
            cond = clip.encode_from_tokens({name: [tokenized[i][0][name][0] for i in part] for name, _ in shape})
            rows = _split_batch(cond[0], len(part), arch, dict(shape))
            if not checked and len(part) > 1:
                alone = clip.encode_from_tokens(tokenized[part[-1]][0])[0]
                if alone.shape != rows[-1].shape or not torch.allclose(alone.float(), rows[-1].float(), rtol=1e-3,
                                                                        atol=1e-4 * float(alone.float().abs().max())):
                    raise _Unbatchable
                checked = True
                _note(_BATCHES_ALIKE, clip, True)
            for i, r in zip(part, rows):
                out[i] = _embedding(r, tokenized[i][1], tokenized[i][2], arch, model, None)

        (calls or EncoderCalls(seconds=math.inf, first=len(members))).run(len(members), batch)
    return out


def _split_batch(rows: Tensor, n: int, arch: Architecture, lengths: dict[str, int]) -> list[Tensor]:
    """Each prompt's rows ``[T, d]`` of a call's rows ``[n·T, d]``: one block per prompt, or, where the encoder puts
    one kind of rows after another (``arch.batch_blocks``, SD3), the prompt's rows of each kind, in order."""
    if not arch.batch_blocks:
        return list(rows.split(rows.shape[0] // n))
    sizes = [lengths[k] for k in arch.batch_blocks if k in lengths]
    if len(sizes) != len(arch.batch_blocks) or rows.shape[0] != n * sum(sizes):
        raise _Unbatchable  # e.g. SD3 without its T5: not the layout this family's encoder gives
    out, start = [[] for _ in range(n)], 0
    for size in sizes:
        for i, block in enumerate(rows[start:start + n * size].split(size)):
            out[i].append(block)
        start += n * size
    return [torch.cat(parts) for parts in out]


def encode_checked(clip, text: str, model, d: int, device: torch.device, arch: Architecture | None = None):
    """``encode`` plus a clear error when the CLIP's width is not the width the model's text readers read."""
    emb, cond, extra = encode(clip, text, device, arch, model)
    check_width(emb.rows.shape[-1], d, model, arch)
    return emb, cond, extra


def check_width(width: int, d: int, model, arch: Architecture | None = None) -> None:
    """A clear error when the CLIP's width is not the width the model's text readers read."""
    if width != d:
        raise ValueError(f"the CLIP gives {width}-wide text embeddings but this {model_type(model)} "
                         f"model's {'cross-attention' if arch is None or arch.name == 'unet' else 'text input'} "
                         f"reads {d}; use the CLIP that belongs to the model")


def conditioning(arch: Architecture, rows: Tensor, model, cond: Tensor, extra: dict) -> list:
    """ComfyUI ``CONDITIONING`` carrying ``rows`` (in the space the readers see) for ``model``."""
    scale = norm_scale(model, arch, rows.device)
    if scale is not None:  # back to the encoder's space: the model norms it again
        rows = architectures.rms_norm_preimage(rows, scale)
    out = dict(extra)
    if arch.guidance is not None:
        out.setdefault("guidance", arch.guidance)
    out.pop("attention_mask", None)  # the derived rows attend everywhere
    return [[rows.to(device=cond.device, dtype=cond.dtype).unsqueeze(0), out]]


# ---------------------------------------------------------------- pooled vectors

def pooled_tokens(clip, text: str) -> dict:
    """``clip.tokenize(text)`` for a pooled vector: blank = the empty prompt; where CLIP and T5 are encoded
    side by side (Flux, SD3) T5 gets one token, since the pooled vector is CLIP's and T5's rows are not used."""
    tokens = clip.tokenize(text if text.strip() else "")
    if "t5xxl" in tokens and "l" in tokens:
        tokens["t5xxl"] = [tokens["t5xxl"][0][-1:]]
    return tokens


def encode_pooled(clip, text: str) -> Tensor | None:
    """The pooled vector (``pooled_output``, ``[1, w]``) CLIPTextEncode gives for ``text``; ``None`` if none."""
    out = clip.encode_from_tokens(pooled_tokens(clip, text), return_pooled=True, return_dict=True)
    return out.get("pooled_output") if isinstance(out, dict) else out[1]


def pooled_many(clip, texts: list[str], arch: Architecture, calls: EncoderCalls | None = None) -> list[Tensor | None]:
    """The pooled vector of every prompt (``[1, w]`` each, ``None`` where the CLIP gives none), as
    ``encode_pooled`` gives it one prompt at a time, but several prompts per encoder call where it can.

    ComfyUI's CLIP encodes all chunks of a token list in one batch (its sub-encoder's ``encode``) and
    returns the pooled vector of the first only (``ClipTokenWeightEncoder.encode_token_weights``). So
    the first chunks of several prompts go in one ``clip.encode_from_tokens`` call, and the pooled vectors
    of the whole batch are read from the output of the sub-encoders ``clip_<key>`` (``arch.pooled_encoders``)
    on their way through. The call's own pooled vector must equal the batch's first (else: one prompt per
    call), and the first batch of each CLIP is checked once against its last prompt encoded alone.
    ``calls`` checks Cancel before each call and sizes the calls (default: all prompts in one).
    """
    calls = calls or EncoderCalls(seconds=math.inf, first=max(len(texts), 1))
    if arch.pooled_encoders and _seen(_POOLED_ALIKE, clip) is not False:
        try:
            return _pooled_batched(clip, texts, arch, calls)
        except _Unbatchable:
            _note(_POOLED_ALIKE, clip, False)
    out: list[Tensor | None] = [None] * len(texts)

    def one(start: int, stop: int) -> None:
        for i in range(start, stop):
            calls.check()  # one prompt per call: Cancel between any two
            out[i] = encode_pooled(clip, texts[i])

    calls.run(len(texts), one)
    return out


class _Spy:
    """Records the pooled vectors (``[n, w]``) each named sub-encoder's ``encode`` returns while in the block;
    the sub-encoders' own ``encode`` is back afterwards (an instance attribute only shadows the method)."""

    def __init__(self, subs: dict) -> None:
        self.subs, self.seen = subs, {k: [] for k in subs}
        self.before = {k: vars(sub).get("encode") for k, sub in subs.items()}

    def __enter__(self) -> "_Spy":
        for key, sub in self.subs.items():
            original = sub.encode

            def encode(tokens, _original=original, _key=key):
                o = _original(tokens)
                self.seen[_key].append(o[1])
                return o

            vars(sub)["encode"] = encode
        return self

    def __exit__(self, *exc) -> None:
        for key, sub in self.subs.items():
            if self.before[key] is None:
                vars(sub).pop("encode", None)
            else:
                vars(sub)["encode"] = self.before[key]


def _pooled_batched(clip, texts: list[str], arch: Architecture, calls: EncoderCalls) -> list[Tensor | None]:
    model = getattr(clip, "cond_stage_model", None)
    subs = {k: getattr(model, f"clip_{k}", None) for k in arch.pooled_encoders}
    tokenized = [pooled_tokens(clip, t) for t in texts]
    if any(s is None or not callable(getattr(s, "encode", None)) or not hasattr(s, "__dict__")
           for s in subs.values()) or any(
            k not in t for t in tokenized for k in subs):
        raise _Unbatchable  # not ComfyUI's CLIP layout (a custom text encoder): one prompt per call
    out: list[Tensor | None] = [None] * len(texts)
    checked = bool(_seen(_POOLED_ALIKE, clip))
    groups: dict[tuple, list[int]] = {}
    for i, tokens in enumerate(tokenized):
        groups.setdefault(tuple(len(tokens[k][0]) for k in subs), []).append(i)
    for members in groups.values():

        def batch(start: int, stop: int) -> None:
            nonlocal checked
            part = members[start:stop]
            # the pooled encoders get every prompt's first chunk (the pooled vector is the first chunk's);
            # the other encoders the first prompt's tokens, whose output is not used
            tokens = {k: ([tokenized[i][k][0] for i in part] if k in subs else v)
                      for k, v in tokenized[part[0]].items()}
            with _Spy(subs) as spy:
                got = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
            pooled = got.get("pooled_output") if isinstance(got, dict) else got[1]
            if pooled is None or any(len(v) != 1 or v[0] is None or v[0].shape[0] < len(part)
                                     for v in spy.seen.values()):
                raise _Unbatchable
            seen = torch.cat([spy.seen[k][0][: len(part)].float() for k in subs], dim=-1).to(pooled.device)
            first = pooled.reshape(1, -1).float()
            if seen.shape[-1] != first.shape[-1] or not torch.equal(seen[:1], first):
                raise _Unbatchable  # the CLIP forms its pooled vector otherwise than these sub-encoders give it
            if not checked and len(part) > 1:
                calls.check()
                alone = encode_pooled(clip, texts[part[-1]])
                if alone is None or not torch.allclose(alone.reshape(1, -1).float().to(seen), seen[-1:], rtol=1e-3,
                                                       atol=1e-4 * float(alone.float().abs().max())):
                    raise _Unbatchable
                checked = True
                _note(_POOLED_ALIKE, clip, True)
            for j, i in enumerate(part):
                out[i] = seen[j: j + 1].to(pooled.dtype)

        calls.run(len(members), batch)
    return out


def _seen(memo: "weakref.WeakKeyDictionary", clip) -> bool | None:
    try:
        return memo.get(clip)
    except TypeError:  # not weak-referenceable
        return None


def _note(memo: "weakref.WeakKeyDictionary", clip, alike: bool) -> None:
    try:
        memo[clip] = alike
    except TypeError:
        pass


_POOLED_ALIKE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # CLIP → its pooled batches were checked


# ---------------------------------------------------------------- an encoder's layers, each its own text space

def layer_last_token(ids: list, pad: int) -> int:
    """Index of the last word token in a start-token, words, padding sequence with no end token (HiDream's
    Llama-3 tokens: 128000, words, 128009 …): the token before the first ``pad`` after the start (the start
    token itself for the empty prompt)."""
    ids = [i if isinstance(i, int) else -1 for i in ids]
    end = next((j for j in range(1, len(ids)) if ids[j] == pad), len(ids))
    return max(end - 1, 0)


def layer_rows(clip, texts: list[str], arch: Architecture, layers: list[int],
               calls: EncoderCalls | None = None) -> dict[int, list[TextEmbedding]] | str:
    """The rows of encoder layers ``layers`` (``arch.layers``: HiDream's ``conditioning_llama3``) of every prompt:
    layer → one ``TextEmbedding`` per prompt (``[T, d]`` as the encoder returned them), aligned on the layer
    encoder's tokens. Only these layers are kept: the others are dropped after each call.

    One prompt per ``clip.encode_from_tokens`` call (ComfyUI's public call); T5 gets one token, its rows are
    not used (as for the pooled vectors). A string says why there are no rows (the CLIP gives none, or fewer
    layers than the model reads, or all-zero rows: ComfyUI's HiDream encoder without its Llama part)."""
    spec = arch.layers
    calls = calls or EncoderCalls(seconds=math.inf, first=max(len(texts), 1))
    out: dict[int, list[TextEmbedding | None]] = {layer: [None] * len(texts) for layer in layers}
    tokenizer = getattr(clip.tokenizer, spec.encoder, None) or getattr(clip.tokenizer, f"clip_{spec.encoder}", None)

    def one(start: int, stop: int) -> None:
        for i in range(start, stop):
            calls.check()
            text = texts[i]
            tokens = pooled_tokens(clip, text)
            chunks = tokens.get(spec.encoder)
            if not chunks:
                raise _NoRows(f"the CLIP gives no {spec.encoder!r} tokens")
            if len(chunks) != 1:
                raise ValueError(f"the prompt {text[:60]!r} is {len(chunks)} chunks for the {spec.title}; RECE aligns "
                                 "their rows within one chunk, so shorten it")
            special = special_tokens_in(text, tokenizer)
            if special:
                raise ValueError(f"the prompt {text[:60]!r} contains the special token {special[0]!r} of the "
                                 f"{spec.title}' tokenizer; remove it, RECE aligns their rows on the prompt's last token")
            got = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
            rows = got.get(spec.key) if isinstance(got, dict) else None
            if rows is None or rows.ndim != 4 or rows.shape[1] <= max(layers):
                raise _NoRows(f"the CLIP gives no {spec.key}" if rows is None else
                              f"the CLIP's {spec.key} has shape {tuple(rows.shape)}, the model reads layers up to "
                              f"{max(layers)}")
            last = layer_last_token([t[0] for t in chunks[0]], spec.pad)
            for layer in layers:
                r = rows[0, layer].detach().clone()  # a copy: the call's other layers are freed with it
                out[layer][i] = TextEmbedding(r, min(last, r.shape[0] - 1))
            del got, rows

    try:
        calls.run(len(texts), one)
    except _NoRows as why:
        return str(why)
    if all(not bool(e.rows.any()) for e in out[layers[0]]):
        return f"the CLIP's {spec.key} rows are all zero (a text encoder without its Llama part)"
    return out
