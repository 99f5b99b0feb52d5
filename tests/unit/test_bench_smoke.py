"""The bench suite runs end to end (tiny config: one 1-node cell, short phases)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("BLOCKNODE_PURE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--skip", "micro,crypto,background",
         "--sizes", "4096", "--concurrency", "2", "--nodes", "1", "--impls", "compiled,pure",
         "--duration", "0.3", "--dir", str(tmp_path), "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert {"environment", "micro", "rpc_crypto", "limits", "macro", "summary"} <= doc.keys()
    names = {r["name"] for r in doc["limits"]}
    assert {"raw write+fsync 1 MiB", "raw write+fsync 4 KiB", "raw read + blake2b 1 MiB",
            "blake2b-512 one core 1 MiB", "loopback tcp one stream"} <= names
    assert all(r["value"] > 0 for r in doc["limits"])
    assert len(doc["macro"]) == 2
    for cell in doc["macro"]:
        assert {"impl", "nodes", "size", "concurrency", "put", "get", "peak_rss_mib"} <= cell.keys()
        for op in ("put", "get"):
            assert cell[op]["errors"] == 0, cell[op]["error_samples"]
            assert cell[op]["ops_s"] > 0
            assert {"mib_s", "spread", "p50_ms", "p99_ms"} <= cell[op].keys()
        assert all(x and x > 0 for x in cell["peak_rss_mib"])
    assert {"fractions", "ratios", "targets", "swift", "encryption"} <= doc["summary"].keys()
    assert len(doc["summary"]["ratios"]) == 2
    # every server was stopped: nothing of the cluster is left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bench-")]
