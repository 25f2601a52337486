"""What ComfyUI shows about every node the pack registers: tooltips, description, search aliases."""

from __future__ import annotations

import pytest

from conftest import load_pack

pack = load_pack()
NODES = sorted(pack.NODE_CLASS_MAPPINGS.items())


def test_the_pack_registers_its_nodes():
    assert len(NODES) >= 6 and set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("node_id, cls", NODES, ids=[n for n, _ in NODES])
def test_every_input_and_output_has_a_tooltip(node_id, cls):
    inputs = cls.INPUT_TYPES()
    specs = {name: spec for section in ("required", "optional") for name, spec in inputs.get(section, {}).items()}
    assert specs, node_id
    for name, spec in specs.items():
        options = spec[1] if len(spec) > 1 else {}
        tip = options.get("tooltip", "")
        assert isinstance(tip, str) and len(tip.strip()) > 10, f"{node_id}.{name} has no tooltip"
    if not cls.RETURN_TYPES:  # an output node without outputs (Save Erased Weights)
        return
    outputs = getattr(cls, "OUTPUT_TOOLTIPS", None)
    assert isinstance(outputs, tuple) and len(outputs) == len(cls.RETURN_TYPES), f"{node_id}: OUTPUT_TOOLTIPS"
    assert all(isinstance(t, str) and len(t.strip()) > 10 for t in outputs), node_id


@pytest.mark.parametrize("node_id, cls", NODES, ids=[n for n, _ in NODES])
def test_every_node_has_a_description_and_search_aliases(node_id, cls):
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 30, node_id
    aliases = cls.SEARCH_ALIASES
    assert isinstance(aliases, list) and len(aliases) >= 3, node_id
    assert all(isinstance(a, str) and a == a.strip() and a for a in aliases), node_id
    assert len({a.lower() for a in aliases}) == len(aliases), f"{node_id}: duplicate aliases"


def search(query: str) -> set[str]:
    """The node ids a node search finds by id, display name or alias (case-insensitive substring)."""
    q = query.lower()
    return {node_id for node_id, cls in NODES
            if q in node_id.lower() or q in pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].lower()
            or any(q in a.lower() for a in cls.SEARCH_ALIASES)}


@pytest.mark.parametrize("query", ["concept erasure", "unlearn", "nsfw", "safety", "remove style", "UCE",
                                   "remove nudity", "remove artist", "censor"])
def test_what_users_type_finds_the_erase_node(query):
    assert "RECEEraseConcept" in search(query)


def test_red_team_and_lora_searches_find_their_nodes():
    assert "RECEDeriveEmbedding" in search("red team")
    assert "RECEExportErasureAsLoRA" in search("lora")
    assert {"RECELoadErasedWeights", "RECEApplyErasedWeights"} <= search("load erasure") | search("apply erasure")
