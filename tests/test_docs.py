"""The README and docs render as meant (no table split by a blank line, links to files that exist), and the
example workflows are exactly what scripts/build_example_workflows.py writes."""

from __future__ import annotations

import importlib.util
import re

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def broken_tables(text: str) -> list[str]:
    """Table rows that Markdown would show as raw ``|`` text: a block of ``|`` lines (outside code) whose
    second line is not a header separator, e.g. the rest of a table after a blank line."""
    problems, block, fenced = [], [], False
    for line in text.splitlines() + [""]:
        if line.lstrip().startswith("```"):
            fenced = not fenced
        is_row = not fenced and line.startswith("|")
        if is_row:
            block.append(line)
            continue
        if block and (len(block) < 2 or not SEPARATOR.match(block[1])):
            problems.append(block[0])
        block = []
    return problems


def test_the_checker_finds_a_split_table():
    good = "| a | b |\n| --- | --- |\n| 1 | 2 |\n"
    assert broken_tables(good) == []
    assert broken_tables(good + "\n| 3 | 4 |\n") == ["| 3 | 4 |"]
    assert broken_tables("```\n| not | a table |\n```\n") == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_markdown_tables_are_whole(path):
    assert broken_tables(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_relative_links_lead_to_files(path):
    text = path.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (path.parent / target).exists(), f"{path.name}: link to {target} leads nowhere"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_anchor_links_lead_to_headings(path):
    text = path.read_text(encoding="utf-8")
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in anchors, f"{path.name}: #{anchor} is no heading"


def test_example_workflows_are_what_the_script_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("build_example_workflows",
                                                  ROOT / "scripts" / "build_example_workflows.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.OUT = tmp_path
    for build in script.BUILDERS:
        build()
    written = sorted(p.name for p in tmp_path.glob("*.json"))
    assert written == sorted(p.name for p in (ROOT / "example_workflows").glob("*.json"))
    for name in written:
        assert (tmp_path / name).read_bytes() == (ROOT / "example_workflows" / name).read_bytes(), name


def test_the_readme_sample_report_is_what_the_demo_prints(capsys):
    """The report shown under "Reading the report" is the demo's own output (the time aside)."""
    from rece_core.__main__ import main

    assert main(["demo"]) == 0
    printed = capsys.readouterr().out.splitlines()[1:]
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = text.split("### Reading the report", 1)[1].split("\n\n")[2].splitlines()
    assert [line.strip() for line in shown] != []

    def timeless(line: str) -> str:
        return re.sub(r"; [\d.]+ s on \w+", "", line.strip())

    assert [timeless(x) for x in shown] == [timeless(x) for x in printed]


def test_supported_models_names_every_family_the_pack_knows():
    from conftest import load_pack

    load_pack()
    from rece_comfyui.nodes.host import architectures

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Supported models", 1)[1].split("\n## ", 1)[0]
    missing = [a.title.split(" (")[0] for a in architectures.ARCHITECTURES if a.title.split(" (")[0] not in section]
    assert missing == []
    pooled = [a.title.split(" (")[0] for a in architectures.ARCHITECTURES if a.pooled]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.endswith("| — |")]
    assert all(any(name in row for row in rows) for name in pooled)  # a pooled path is stated for each


def test_other_methods_bad_input_rows_are_asserted_by_their_tests():
    """Each row of "Bad input in the other methods" quotes a message the node code raises and that the
    named test asserts (in a ``pytest.raises(..., match=...)``), so the README cannot promise a refusal
    nobody checks."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Bad input in the other methods", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| input", "| ---"))]
    assert len(rows) >= 10
    sources = "".join(p.read_text(encoding="utf-8") for d in ("nodes", "rece_core") for p in (ROOT / d).rglob("*.py"))
    for row in rows:
        fragment, test = re.findall(r"`([^`]+)`", row)[-2:]
        assert fragment in sources, f"{fragment!r}: no such message in the code"
        matches = re.findall(r"match=(?:f?[\"'])(.+?)[\"']", (ROOT / test).read_text(encoding="utf-8"))
        assert any(fragment in m for m in matches), f"{fragment!r}: {test} asserts no such message"
