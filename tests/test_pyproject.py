"""pyproject.toml against the Comfy Registry's documented rules (docs.comfy.org/registry/specifications).

The checks are the ones the registry and its CLI (comfy-cli) document: node id pattern, X.Y.Z version,
license as a table, Repository URL, PublisherId, Icon (a URL to an SVG/PNG/JPG/GIF, square, at most
400 × 400 px, here stored in this repository), classifiers for OS and accelerators from their fixed
lists, and the version specifier syntax of requires-comfyui.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = CONFIG["project"]
COMFY = CONFIG["tool"]["comfy"]

# The registry's accelerator classifiers (its fixed list) and OS classifier prefixes.
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend", "GPU :: Apple Metal"}
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)$")


def test_node_id_follows_the_registry_pattern():
    name = PROJECT["name"]
    assert len(name) < 100
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", name), "letters, digits, - _ . only; starts with a letter"
    assert not re.search(r"[._-]{2}", name), "no consecutive special characters"
    assert not name.lower().startswith("comfy"), "the registry strips a ComfyUI prefix from ids"


def test_version_is_semver_and_matches_the_package():
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"])
    init = (ROOT / "rece_core" / "__init__.py").read_text(encoding="utf-8")
    assert f'__version__ = "{PROJECT["version"]}"' in init


def test_license_description_and_repository():
    assert PROJECT["license"] == {"file": "LICENSE"} and (ROOT / "LICENSE").is_file()
    assert "GNU GENERAL PUBLIC LICENSE" in (ROOT / "LICENSE").read_text(encoding="utf-8")[:200]
    assert len(PROJECT["description"]) > 20
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", PROJECT["urls"]["Repository"])
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", COMFY["PublisherId"]) and COMFY["DisplayName"]


def test_icon_is_a_url_to_a_square_svg_of_this_repository():
    repo = PROJECT["urls"]["Repository"].removeprefix("https://github.com/")
    match = re.fullmatch(rf"https://raw\.githubusercontent\.com/{re.escape(repo)}/main/(.+)", COMFY["Icon"])
    assert match, "Icon must be the raw URL of a file of the Repository"
    path = ROOT / match.group(1)
    assert path.is_file(), f"{match.group(1)} is not in the repository"
    assert path.suffix.lower() in {".svg", ".png", ".jpg", ".jpeg", ".gif"}
    svg = ElementTree.parse(path).getroot()
    assert svg.tag.endswith("svg")
    width, height = float(svg.attrib["width"]), float(svg.attrib["height"])
    assert width == height <= 400, "square, at most 400 × 400"
    assert svg.attrib["viewBox"].split() == ["0", "0", svg.attrib["width"], svg.attrib["height"]]


def test_classifiers_use_the_registry_lists():
    classifiers = PROJECT["classifiers"]
    oses = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert oses and all(o.startswith(OS_PREFIXES) for o in oses)
    assert accelerators and set(accelerators) <= ACCELERATORS
    assert len(set(classifiers)) == len(classifiers)


def test_requires_comfyui_is_the_supported_range():
    spec = COMFY["requires-comfyui"]
    assert all(VERSION_PART.match(part.strip()) for part in spec.split(","))
    assert spec == ">=0.3.64"  # the oldest ComfyUI the real tier runs against


def requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_dependencies_are_requirements_txt_and_leave_torch_to_comfyui():
    deps = PROJECT["dependencies"]
    assert deps == requirements()
    names = {re.split(r"[<>=!~ \[]", d)[0].lower() for d in deps}
    assert not names & {"torch", "numpy", "torchvision", "comfyui", "comfyui-frontend-package"}
