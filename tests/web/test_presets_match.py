"""The frontend's preset table (web/report.js) is the engine's (rece_core.PRESETS)."""

import re
from pathlib import Path

from rece_core import PRESETS


def test_web_presets_match_rece_core():
    src = (Path(__file__).resolve().parents[2] / "web" / "report.js").read_text()
    table = dict(re.findall(r"(\w+): \{ reg: ([\d.e-]+), rounds: \d+ \}", src))
    rounds = dict(re.findall(r"(\w+): \{ reg: [\d.e-]+, rounds: (\d+) \}", src))
    assert set(table) == set(PRESETS)
    for kind, preset in PRESETS.items():
        assert float(table[kind]) == preset.reg and int(rounds[kind]) == preset.epochs
