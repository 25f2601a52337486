"""``python -m rece_core demo``: one-line errors, help for every option, the node's kinds, an honest header."""

from __future__ import annotations

import pytest

from rece_core.__main__ import build_parser, main


def run(capsys, *args):
    try:
        code = main(["demo", "--arch", "tiny", *args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args, message", [
    (["--concept", " "], "--concept is empty"),
    (["--concept", "cat", "--guide", "cat"], "encode to the same text embedding"),
    (["--concept", " ".join(["word"] * 80)], "longer than one 77-token chunk"),
    (["--preserve", " ".join(["word"] * 80)], "longer than one 77-token chunk"),
])
def test_bad_input_is_one_line_not_a_traceback(capsys, args, message):
    code, out, err = run(capsys, *args)
    assert code == 2 and message in err and "Traceback" not in err and out == ""
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_every_option_has_help():
    _, demo = build_parser()
    options = [a for a in demo._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} >= {"arch", "concept", "guide", "preserve", "kind", "seed"}
    assert all(a.help and len(a.help) > 10 for a in options)
    kind = next(a for a in options if a.dest == "kind")
    assert "custom" in kind.choices  # as the node offers it


def test_custom_kind_and_the_seeded_model_are_said(capsys):
    code, out, _ = run(capsys, "--kind", "custom", "--reg", "0.01", "--rounds", "1")
    assert code == 0 and "ρ=0.01 rounds=1" in out
    assert "random model and text encoder (seed 0)" in out and "not a real checkpoint" in out
