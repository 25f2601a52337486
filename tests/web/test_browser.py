"""Real browser, real server (real tier: COMFYUI_PATH): what a user sees of the RECE reports.

Starts ComfyUI on loopback with this pack as a custom node and a seeded real-format SD1.5
checkpoint, once with the frontend ComfyUI pins (its ``comfyui-frontend-package``) and once with
the newest ``comfyui-frontend-package`` on PyPI through ``--front-end-root`` (downloaded into the
ignored ``tests/web/frontends/``; ``RECE_FRONTEND_ROOT=<package>/static`` picks another one).
Debian's Chromium, driven by playwright-core (installed from npm into ``tests/web/browser/``, no
browser download), runs ``browser/run.mjs`` on the classic canvas and on Nodes 2.0: it loads
``example_workflows/red_team_derive_embedding.json``, queues it, and reports what it saw. The
screenshots go to ``out/web_<frontend>_<mode>*.png``; the pinned frontend's classic-canvas one is copied to
``docs/images/canvas_report.png``, the picture the README shows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMFYUI = os.environ.get("COMFYUI_PATH")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
BROWSER_DIR = ROOT / "tests" / "web" / "browser"
FRONTENDS = ROOT / "tests" / "web" / "frontends"
OUT = ROOT / "out"
SCREENSHOT = ROOT / "docs" / "images" / "canvas_report.png"  # the README's picture: the pinned frontend, classic canvas
pytestmark = pytest.mark.skipif(not COMFYUI or not shutil.which("node") or not os.path.exists(CHROMIUM),
                                reason="real tier: needs COMFYUI_PATH, node and Debian's chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def newest_frontend() -> tuple[str, Path]:
    """(version, static folder) of the newest comfyui-frontend-package on PyPI, unpacked once."""
    if os.environ.get("RECE_FRONTEND_ROOT"):
        static = Path(os.environ["RECE_FRONTEND_ROOT"])
        info = next(static.parent.parent.glob("comfyui_frontend_package-*.dist-info"), None)
        return (info.name.split("-")[1].removesuffix(".dist-info") if info else "custom"), static
    wheels = FRONTENDS / "wheels"
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                          "-d", str(wheels), "comfyui-frontend-package"], capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip(f"cannot download the newest comfyui-frontend-package (offline?): {got.stderr[-500:]}")
    saved = re.findall(r"(?:Saved|File was already downloaded) (\S+\.whl)", got.stdout)
    wheel = Path(saved[-1])
    version = wheel.name.split("-")[1]
    target = FRONTENDS / version
    if not (target / "comfyui_frontend_package" / "static" / "index.html").is_file():
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    return version, target / "comfyui_frontend_package" / "static"


@pytest.fixture(scope="module", params=["pinned", "newest"])
def server(request, tmp_path_factory):
    """A ComfyUI server on loopback with the pack, for one frontend; yields (url, frontend version)."""
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        subprocess.run(["npm", "install", "--no-save", "--no-audit", "--no-fund", "playwright-core@1"],
                       cwd=BROWSER_DIR, check=True, capture_output=True)
    if request.param == "pinned":
        version, extra = metadata.version("comfyui-frontend-package"), []
    else:
        version, static = newest_frontend()
        extra = ["--front-end-root", str(static)]
    sys.path.insert(0, str(ROOT / "tests" / "real"))
    from checkpoint import make_sd15_checkpoint

    base = tmp_path_factory.mktemp(f"comfy_{request.param}")
    (base / "custom_nodes").mkdir()
    (base / "models" / "checkpoints").mkdir(parents=True)
    os.symlink(ROOT, base / "custom_nodes" / "rece-comfyui")
    make_sd15_checkpoint(base / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors")
    port = free_port()
    log_path = base / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", str(base), "--disable-auto-launch", *extra],
                            cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/object_info/RECEEraseConcept", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                time.sleep(1)
        yield url, version, log_path, request.param
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def inside(report: dict, node: dict, tol: float = 1.0) -> bool:
    return (report["left"] >= node["left"] - tol and report["right"] <= node["right"] + tol
            and report["top"] >= node["top"] - tol and report["bottom"] <= node["bottom"] + tol)


def assert_within_nodes(bounds: dict, where: str) -> None:
    for node_id, b in bounds.items():
        assert b is not None, f"{where}: node {node_id} has no report widget"
        assert b["visible"], f"{where}: the report of node {node_id} is not visible: {b}"
        assert inside(b["report"], b["node"]), f"{where}: the report of node {node_id} spills out of the node: {b}"
        assert not b["inPanel"], f"{where}: the report of node {node_id} was moved into the properties panel"


@pytest.mark.parametrize("mode", ["classic", "nodes2"])
def test_reports_presets_and_panel_as_a_user_sees_them(server, mode):
    url, version, log_path, frontend = server
    if mode == "nodes2" and tuple(int(x) for x in version.split(".")[:2]) < (1, 28):
        pytest.skip(f"frontend {version}: its Nodes 2.0 is an experimental preview that renders no DOM widget "
                    "(no WidgetDOM/WidgetLegacy component), so no extension's canvas report can show there")
    OUT.mkdir(exist_ok=True)
    run = subprocess.run(["node", "run.mjs", url, str(ROOT / "example_workflows" / "red_team_derive_embedding.json"),
                          str(OUT), version, mode], cwd=BROWSER_DIR, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stderr[-3000:] + log_path.read_text()[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps({k: result[k] for k in ("label", "mode", "frontend", "vueNodes", "sizeBefore", "sizeAfter",
                                              "bounds", "preset")}, indent=1))
    assert result["frontend"] == version  # the frontend we meant to test is the one the page runs
    assert result["vueNodes"] is (mode == "nodes2")

    reports = "\n".join(result["reports"])
    assert "RECE erasure" in reports and "round 3 · nudity" in reports and "reach" in reports
    assert "RECE derived embedding" in reports
    for name in ("", "_panel", "_preset"):
        shot = OUT / f"web_{version}_{mode}{name}.png"
        assert name == "_panel" and result["panel"] is None or shot.stat().st_size > 10_000, shot
    if frontend == "pinned" and mode == "classic":  # what a user of the ComfyUI release sees: the README shows it
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(OUT / f"web_{version}_{mode}.png", SCREENSHOT)

    # the reports are drawn inside their nodes, and nodes only grew to fit them
    assert_within_nodes(result["bounds"], "after the run")
    for key in ("erase", "derive"):
        before, after = result["sizeBefore"][key], result["sizeAfter"][key]
        assert after[0] >= before[0] and after[1] >= before[1], f"{key} node shrank: {before} -> {after}"

    # the properties panel (frontends that have one) lists the node's inputs, not the report
    panel = result["panel"]
    assert panel is not None or frontend == "pinned", "the newest frontend's properties panel did not open"
    if panel is not None:
        assert "rounds" in panel["text"] and "concept_kind" in panel["text"], panel["text"][:500]
        assert "rece_report" not in panel["text"] and panel["reports"] == 0, panel["text"][:500]
        assert_within_nodes(panel["boundsOpen"], "with the properties panel open")
        assert_within_nodes(panel["boundsClosed"], "after closing the properties panel")
        assert result["bounds"][str(2)]["report"]["right"] - result["bounds"][str(2)]["report"]["left"] == pytest.approx(
            panel["boundsClosed"][str(2)]["report"]["right"] - panel["boundsClosed"][str(2)]["report"]["left"], abs=1)

    # choosing a concept kind in the dropdown fills the paper's reg and rounds
    preset = result["preset"]
    assert preset["before"] == {"concept_kind": "nudity", "reg": 0.1, "rounds": 3}
    assert preset["after"] == {"concept_kind": "artistic_style", "reg": 0.001, "rounds": 1}
    assert len(preset["saved"]) == 10  # the widgets (concept_list included), not the report
    assert preset["saved"][3:6] == ["artistic_style", 1, 0.001]

    # nothing in the browser's console comes from this pack
    ours = [m for m in result["console"] if re.search(r"rece", m, re.I)]
    assert not ours, ours
