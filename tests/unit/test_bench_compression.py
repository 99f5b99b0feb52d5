"""`python -m bench.compression` runs end to end (2 blocks per cell)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_compression_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "bench.compression", "--blocks", "2",
                           "--json", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| text | 1 |" in proc.stdout and "space saved" in proc.stdout
    doc = json.loads(out.read_text())
    cells = {(c["data"], c["level"]): c for c in doc["cells"]}
    assert len(cells) == 6
    assert cells[("text", 1)]["saved"] > 0.5 and cells[("text", None)]["saved"] == 0
    assert cells[("random", 3)]["saved"] == 0
    # Throughput is always measurable; CPU time comes in scheduler ticks, so two
    # small blocks may cost "0 ms" (a smoke test checks the field, not its size).
    assert all(c["put_mib_s"] > 0 and c["get_cpu_ms_per_mib"] >= 0 for c in cells.values())
