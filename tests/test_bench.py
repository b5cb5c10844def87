"""The benchmark harness runs end to end (quick mode): a smoke test, not a speed check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_mode_runs_and_reports_every_target(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    targets = report["targets"]
    for key in ("1 warm one stream / nginx", "2 warm 16 ranges / nginx", "3 cold time / aria2c -x16",
                "4 upstream bytes / blob", "5 manifest p99 (ms)", "5 manifest req/s, held head / not held",
                "6 peak RSS MB (big blob)", "7 unthrottled fill MB/s", "7 upstream client alone MB/s",
                "7 new-file write, dd MB/s", "7 cold manifest p99 during the fill (ms)",
                "7 mirror cores busy during the fill"):
        assert targets[key]["value"] > 0, key
    assert report["results"]["4_ten_clients_upstream_bytes"]["median"] <= 1.05  # coalescing holds even here
    assert "docker_registry" in report["results"]
    assert "target" in result.stdout  # the table was printed
