"""bench/loader_peers.py --quick: it writes its table, and our loader's resume rows say exact.

The peers (MosaicML streaming, LitData) live in .venv-peers (``make peers-venv``: their pins conflict
with ours), so this test runs the script in the project's environment, where it measures ours and
stock webdataset and writes the peers down as not installed; `make bench` runs the full comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.integration


def test_quick_bench_writes_the_table_and_our_resume_is_exact(tmp_path: Path) -> None:
    table, js = tmp_path / "peers.md", tmp_path / "peers.json"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "loader_peers.py"), "--quick", "--table", str(table),
                          "--json", str(js)], cwd=ROOT, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    text = table.read_text()
    assert "| ours (vitscale) | A | local |" in text and "| webdataset | B | local |" in text, text
    res = json.loads(js.read_text())
    for key in ("ours|A|local", "webdataset|A|local", "webdataset|B|local"):
        m = res["speed"][key]
        assert m["img_s"] > 0 and m["ttfb_s"] > 0 and m["cpu_ms_img"] > 0, (key, m)
    assert res["decode_limit_img_s"] > 0
    ours = res["resume"]["ours"]
    assert ours["same"].startswith("exact"), ours
    assert ours["elastic"].startswith("no repeats"), ours
    assert "no resume API" in res["resume"]["webdataset"]["same"]
