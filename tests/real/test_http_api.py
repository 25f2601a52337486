"""Bad input through a real ComfyUI server's HTTP API (real tier: COMFYUI_PATH).

ComfyUI is started on loopback (as tests/web/test_browser.py does) with this pack and a seeded
real-format SD1.5 checkpoint; prompts are queued with POST /prompt and read back from /history.
A JSON ``NaN`` strength passes ComfyUI's own min/max check (comparisons with NaN are false): the
node must refuse it, so the prompt ends in error, and nothing the pack puts into /history (its
``ui`` reports) may carry NaN. (ComfyUI itself echoes the submitted prompt, NaN included, in the
history entry's ``prompt`` and the error's ``current_inputs``: that copy is the client's own input.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="real tier: set COMFYUI_PATH")
CKPT = "v1-5-pruned-emaonly.safetensors"
START_S, PROMPT_S = 300, 420  # bounds on the server's start and on each prompt (a busy 2-core CPU)


def _strict(text: str):
    def refuse(constant):
        raise AssertionError(f"/history carries {constant}, which is not JSON")
    return json.loads(text, parse_constant=refuse)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests" / "real"))
    from checkpoint import make_sd15_checkpoint

    base = tmp_path_factory.mktemp("comfy")
    (base / "custom_nodes").mkdir()
    (base / "models" / "checkpoints").mkdir(parents=True)
    os.symlink(ROOT, base / "custom_nodes" / "rece-comfyui")
    make_sd15_checkpoint(base / "models" / "checkpoints" / CKPT)
    port = _free_port()
    log_path = base / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", str(base), "--disable-auto-launch"],
                            cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while True:
            try:
                urllib.request.urlopen(url + "/object_info/RECEApplyErasedWeights", timeout=5)
                break
            except OSError:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "ComfyUI did not start in time\n" + log_path.read_text()[-3000:]
                time.sleep(1)
        yield url, base, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def graph(strength="1.0", concepts="nudity", guide="") -> str:
    """Checkpoint → Erase → Apply (at ``strength``, raw JSON text so NaN can be sent) → Preview."""
    nodes = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "RECEEraseConcept", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "concepts": concepts, "guide": guide, "preserve": "",
            "concept_kind": "nudity", "rounds": 1, "reg": 0.1, "lamb": 0.1, "erase_scale": 1.0,
            "preserve_scale": 0.1}},
        "3": {"class_type": "RECEApplyErasedWeights", "inputs": {"model": ["1", 0], "erasure": ["2", 1],
                                                                 "strength": "STRENGTH"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    }
    return json.dumps({"prompt": nodes, "client_id": "rece-test"}).replace('"STRENGTH"', strength)


def queue(url: str, body: str, strict: bool = True) -> tuple[str, dict]:
    """POST /prompt, wait (bounded) for /history; return (raw history text, this prompt's entry)."""
    req = urllib.request.Request(url + "/prompt", data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        prompt_id = json.loads(r.read())["prompt_id"]
    deadline = time.monotonic() + PROMPT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/history/{prompt_id}", timeout=60) as r:
                text = r.read().decode()
        except TimeoutError:  # the server is busy loading or running: ask again, within the deadline
            continue
        entry = (_strict(text) if strict else json.loads(text)).get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str"):
            return text, entry
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not finish in {PROMPT_S} s")


def error_of(entry: dict) -> str:
    return " ".join(str(m[1].get("exception_message", "")) for m in entry["status"]["messages"]
                    if m[0] == "execution_error")


def test_strength_nan_through_the_api_is_an_error_and_history_stays_json(server):
    url = server[0]
    assert "NaN" in graph("NaN")
    text, entry = queue(url, graph("NaN"), strict=False)
    assert entry["status"]["status_str"] == "error"
    assert "strength must be a finite number from -10 to 10, got nan" in error_of(entry)
    assert "3" not in entry["outputs"]  # Apply Erased Weights produced nothing
    json.dumps(entry["outputs"], allow_nan=False)  # and what ran (Erase) reported strict JSON
    for message in entry["status"]["messages"]:  # NaN only in ComfyUI's echo of the submitted inputs
        data = {k: v for k, v in message[1].items() if k not in ("current_inputs", "current_outputs")}
        json.dumps(data, allow_nan=False)


def test_a_good_prompt_succeeds_and_its_reports_are_strict_json(server):
    text, entry = queue(server[0], graph("0.5"))
    assert entry["status"]["status_str"] == "success", error_of(entry)
    reports = {k: v["rece_report"][0] for k, v in entry["outputs"].items() if "rece_report" in v}
    assert reports["3"]["strength"] == 0.5 and reports["3"]["concepts"] == ["nudity"]
    assert "NaN" not in text and "Infinity" not in text


@pytest.mark.parametrize("concepts, guide, message", [
    ("nudity", "Nudity", "encode to the same text embedding"),
    ("a <|endoftext|> b", "", "contains the tokenizer's start or end token"),
])
def test_real_clip_text_edge_cases_are_refused_through_the_api(server, concepts, guide, message):
    text, entry = queue(server[0], graph("1.0", concepts, guide))
    assert entry["status"]["status_str"] == "error"
    assert message in error_of(entry)


def test_out_of_range_strength_is_refused_by_comfyui_before_running(server):
    with pytest.raises(urllib.error.HTTPError) as info:
        queue(server[0], graph("1e30"))
    assert info.value.code == 400
