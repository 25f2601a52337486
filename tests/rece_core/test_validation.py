"""Bad input gets a clear ValueError naming the problem, never a NaN result."""

from __future__ import annotations

import pytest
import torch

from rece_core import TextEmbedding, closed_form_edit, derive_embedding, rece
from rece_core.toy import ToyTextEncoder, cross_attention_weights

W = cross_attention_weights("tiny", seed=5)
ENC = ToyTextEncoder(64, seed=5)
E, G = ENC("nudity").rows[1:], ENC(" ").rows[:-1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(erase=[torch.randn(5, 32)], guide=[torch.randn(5, 32)]), "width 32"),
    (dict(erase=[E], guide=[G[:-1]]), "shape"),
    (dict(erase=[], guide=[]), "nothing to erase"),
    (dict(erase=[E], guide=[G, G]), "pair them"),
    (dict(erase=[E.clone().fill_(float("nan"))], guide=[G]), "NaN or Inf"),
    (dict(erase=[E], guide=[G], erase_scale=-1.0), "erase_scale must be non-negative"),
    (dict(erase=[E], guide=[G], preserve_scale=float("inf")), "preserve_scale must be a finite"),
    (dict(erase=[E[:3]], guide=[G[:3]], lamb=0.0), "singular"),
])
def test_closed_form_edit_refuses(kwargs, message):
    args = dict(preserve=[], lamb=0.1, erase_scale=1.0, preserve_scale=0.1) | kwargs
    with pytest.raises(ValueError, match=message):
        closed_form_edit(W, args.pop("erase"), args.pop("guide"), args.pop("preserve"), **args)


def test_bad_weights_refused():
    with pytest.raises(ValueError, match="non-empty mapping"):
        closed_form_edit({}, [E], [G], [])
    bad = dict(W)
    bad[next(iter(bad))] = torch.full((32, 64), float("inf"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        closed_form_edit(bad, [E], [G], [])
    with pytest.raises(ValueError, match="2-D"):
        closed_form_edit({"a": torch.randn(4, 4, 4)}, [E], [G], [])
    mixed = dict(W, extra=torch.randn(8, 32))
    with pytest.raises(ValueError, match="width 32, expected 64"):
        closed_form_edit(mixed, [E], [G], [])


def test_derive_refuses_singular_and_mismatched():
    zero = {k: torch.zeros_like(w) for k, w in W.items()}
    with pytest.raises(ValueError, match="singular"):
        derive_embedding(zero, W, ENC("x").rows, reg=0.0)
    with pytest.raises(ValueError, match="same names"):
        derive_embedding({"other": next(iter(W.values()))}, W, ENC("x").rows, reg=0.1)
    with pytest.raises(ValueError, match="reg must be non-negative"):
        derive_embedding(W, W, ENC("x").rows, reg=-1.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(concepts=[]), "non-empty prompt"),
    (dict(concepts=["  "]), "non-empty prompt"),
    (dict(concepts=["a", "b"], guide=["x", "y", "z"]), "one guide or one per concept"),
    (dict(epochs=-1), "epochs"),
    (dict(epochs=1.5), "epochs"),
    (dict(reg=float("nan")), "reg must be a finite"),
    (dict(concepts=["nudity"], guide="nudity"), "encode to the same text embedding"),
    (dict(concepts=["nudity", "blood"], guide=["x", "BLOOD"]), "'blood' and its guide 'BLOOD' encode to the same"),
])
def test_rece_refuses(kwargs, message):
    args = dict(concepts=["nudity"]) | kwargs
    with pytest.raises(ValueError, match=message):
        rece(W, ENC, **args)


def test_rece_refuses_encoder_of_wrong_width():
    with pytest.raises(ValueError, match="width 32, expected 64"):
        rece(W, lambda t: TextEmbedding(torch.randn(77, 32), 1), ["nudity"])


class Cancelled(Exception):
    pass


def test_check_runs_before_every_encoder_call_and_every_round():
    """Cancel takes effect at the next encoder call or round, not after all prompts are encoded."""
    concepts = [f"concept {i}" for i in range(20)]
    calls = []

    def encode(text):
        calls.append(text)
        return ENC(text)

    def check_after(n):
        def check():
            if len(calls) >= n:
                raise Cancelled
        return check

    with pytest.raises(Cancelled):
        rece(W, encode, concepts, epochs=2, check=check_after(3))
    assert len(calls) == 3  # stopped right away, 17 concepts left unencoded
    checks = []
    rece(W, ENC, concepts[:2], epochs=3, check=lambda: checks.append(1))
    # one per distinct prompt (2 concepts, ' ' as guide, '' preserved), one per concept pair, one per round
    assert len(checks) >= 3 + 2 + 3
    rounds = []
    with pytest.raises(Cancelled):
        def in_rounds():
            rounds.append(1)
            if len(rounds) > 3 + 2 + 1:  # past encoding and pairing: inside the rounds
                raise Cancelled
        rece(W, ENC, concepts[:2], epochs=3, check=in_rounds)


def test_transform_bound_refuses_absurd_factors_and_accepts_real_erasures():
    from rece_core.validation import MAX_TRANSFORM_NORM, check_transform

    e = rece(W, ENC, ["nudity", "blood"], epochs=2)
    check_transform(e.transform.up, e.transform.down)  # a real erasure: ‖P − I‖ of order 10
    up, down = e.transform.up.double(), e.transform.down.double()
    assert float((up @ down).norm()) < 1e-4 * MAX_TRANSFORM_NORM
    with pytest.raises(ValueError, match="absurdly large"):
        check_transform(e.transform.up * 1e6, e.transform.down)
    with pytest.raises(ValueError, match="NaN or Inf"):
        check_transform(e.transform.up * float("inf"), e.transform.down)
    dense = torch.eye(64) * 2e6
    with pytest.raises(ValueError, match="absurdly large"):
        check_transform(dense, torch.eye(64))
