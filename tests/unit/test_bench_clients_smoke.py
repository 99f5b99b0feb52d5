"""`python -m bench.clients` runs end to end (tiny config) and prints its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_clients_runs(tmp_path: Path) -> None:
    out = tmp_path / "clients.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("BLOCKNODE_PURE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.clients", "--duration", "0.2", "--rounds", "1",
         "--sizes", "4096", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| 4 KiB | put |" in proc.stdout and "| 4 KiB | get |" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["op"] for r in rows] == ["put", "get"]
    for r in rows:
        for flavour in ("trio", "sync", "asyncio", "guest"):
            assert r[flavour] > 0, (flavour, r)
