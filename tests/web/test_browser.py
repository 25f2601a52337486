"""Real browser, real server (real tier: COMFYUI_PATH): the report appears on the node.

Starts ComfyUI on loopback (its frontend from the comfyui-frontend-package on PyPI) with this
pack as a custom node and a seeded real-format SD1.5 checkpoint, drives Debian's Chromium with
playwright-core (no browser download), loads example_workflows/red_team_derive_embedding.json,
queues it and asserts the RECE reports appear; saves a screenshot to out/web_report.png.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMFYUI = os.environ.get("COMFYUI_PATH")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not COMFYUI or not shutil.which("node") or not os.path.exists(CHROMIUM),
                                reason="real tier: needs COMFYUI_PATH, node and Debian's chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_report_appears_on_the_canvas(tmp_path):
    browser_dir = ROOT / "tests" / "web" / "browser"
    if not (browser_dir / "node_modules" / "playwright-core").is_dir():
        subprocess.run(["npm", "install", "--no-save", "--no-audit", "--no-fund", "playwright-core@1"],
                       cwd=browser_dir, check=True, capture_output=True)
    sys.path.insert(0, str(ROOT / "tests" / "real"))
    from checkpoint import make_sd15_checkpoint

    base = tmp_path / "comfy"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    os.symlink(ROOT, base / "custom_nodes" / "rece-comfyui")
    make_sd15_checkpoint(base / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors")
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                               "--base-directory", str(base), "--disable-auto-launch"],
                              cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/object_info/RECEEraseConcept", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(1)
        out_dir = ROOT / "out"
        out_dir.mkdir(exist_ok=True)
        shot = out_dir / "web_report.png"
        run = subprocess.run(["node", "run.mjs", url, str(ROOT / "example_workflows" / "red_team_derive_embedding.json"),
                              str(shot)], cwd=browser_dir, capture_output=True, text=True, timeout=540)
        assert run.returncode == 0, run.stderr[-3000:] + (tmp_path / "server.log").read_text()[-3000:]
        result = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    reports = "\n".join(result["reports"])
    print(reports)
    assert "RECE erasure" in reports and "round 3 · nudity" in reports and "reach" in reports
    assert "RECE derived embedding" in reports
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert result["preset"]["before"] == {"reg": 0.1, "rounds": 3}
    assert result["preset"]["after"] == {"reg": 0.001, "rounds": 1}
    assert len(result["preset"]["saved"]) == 9  # the report widget is not saved into widgets_values
