"""Concept lists: the pack's own lists and the user's models/rece/lists, confined to their folders."""

from __future__ import annotations

import os

import pytest

import folder_paths
from conftest import ROOT, load_pack
from factory import FakeCLIP, make_model

load_pack()
from rece_comfyui.nodes import files  # noqa: E402
from rece_comfyui.nodes.rece import RECEEraseConcept  # noqa: E402

ARGS = dict(guide="", preserve="", concept_kind="unsafe", rounds=1, reg=0.1, lamb=0.1, erase_scale=1.0,
            preserve_scale=0.1)


@pytest.fixture()
def lists_dir(tmp_path, monkeypatch):
    user = tmp_path / "lists"
    user.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, files.LISTS, ([str(user), str(ROOT / "lists")], {".txt"}))
    if hasattr(folder_paths, "filename_list_cache"):
        monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return user


def erase(concepts: str, concept_list: str):
    out = RECEEraseConcept().erase(make_model(), FakeCLIP(), concepts=concepts, concept_list=concept_list, **ARGS)
    return out["result"][1]


def test_the_pack_ships_the_paper_lists_and_they_erase(lists_dir):
    names = files.concept_list_names()
    assert names[0] == files.NO_LIST and {"i2p_categories.txt", "paper_artists.txt"} <= set(names)
    erasure = erase("", "i2p_categories.txt")
    assert erasure.concepts == ("hate", "harassment", "violence", "self-harm", "sexual", "shocking",
                                "illegal activity")
    assert "Van Gogh" in files.read_concept_list("paper_artists.txt")
    assert "(none)" in RECEEraseConcept.INPUT_TYPES()["optional"]["concept_list"][0]


def test_a_users_list_with_comments_adds_to_the_widget(lists_dir):
    (lists_dir / "mine.txt").write_text("# my franchise\n\nMickey Mouse\n  Donald Duck  \n# done\nnudity\n")
    erasure = erase("nudity\nblood", "mine.txt")
    assert erasure.concepts == ("nudity", "blood", "Mickey Mouse", "Donald Duck")  # once each


@pytest.mark.parametrize("name, message", [
    ("missing.txt", "missing.txt: no such file in models/rece/lists"),
    ("../secret.txt", "plain name inside the models folder"),
    ("/tmp/list.txt", "plain name inside the models folder"),
    ("list.safetensors", "only .txt lists"),
])
def test_bad_list_names_are_refused(lists_dir, name, message):
    with pytest.raises(ValueError, match=message):
        erase("nudity", name)


def test_unreadable_empty_and_linked_lists_are_refused(lists_dir, tmp_path_factory):
    (lists_dir / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: cannot be read"):
        erase("nudity", "latin1.txt")
    (lists_dir / "empty.txt").write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="empty.txt: has no concepts"):
        erase("", "empty.txt")
    outside = tmp_path_factory.mktemp("elsewhere") / "x.txt"
    outside.write_text("nudity\n")
    os.symlink(outside, lists_dir / "link.txt")
    with pytest.raises(ValueError, match="links outside models/rece/lists"):
        erase("", "link.txt")


def test_no_concepts_at_all_is_refused(lists_dir):
    with pytest.raises(ValueError, match="or choose a concept list"):
        erase("  \n", files.NO_LIST)
