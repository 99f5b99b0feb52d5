"""Issue 10 part 2 on real processes: the time of a reference version is the cluster's.

Clients whose clocks are an hour off (the CLI run with its clock shifted,
`tests.cluster.shifted_cli`) against three `serve` processes: the later
operation in real order wins, and GC never deletes a block whose last
operation was `ref` — the issue's scenario, where a client an hour ahead
deleted a reference, a correct client then ran `ref HASH doc` (exit 0), and GC
deleted the block 13 s later.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.cluster.probes import GC_DELAY, LARGE, probe_cluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def cli_at(shift_s: float, config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """The CLI on a machine whose clock is `shift_s` seconds off."""
    return subprocess.run(
        [sys.executable, "-m", "tests.cluster.shifted_cli", str(shift_s), *args, "--config", str(config)],
        capture_output=True, timeout=60, cwd=ROOT)


async def test_clients_an_hour_apart_the_later_operation_wins_and_gc_keeps_a_referenced_block(
        tmp_path: Path) -> None:
    with trio.fail_after(90), probe_cluster(tmp_path) as probe:
        src = tmp_path / "doc.bin"
        data = os.urandom(LARGE)
        src.write_bytes(data)
        cfg = probe.paths[0]
        r = cli_at(0, cfg, "put", str(src), "--ref", "doc")
        assert r.returncode == 0, r.stderr
        h = r.stdout.decode().strip()
        # the scenario: a client an hour ahead deletes the reference, then a
        # correct client adds it again
        r = cli_at(3600, probe.paths[1], "unref", h, "doc")
        assert r.returncode == 0, r.stderr
        r = cli_at(0, probe.paths[2], "ref", h, "doc")
        assert r.returncode == 0, r.stderr
        # the other way round: a correct client adds a reference, then a client an hour
        # behind deletes it
        assert cli_at(0, cfg, "ref", h, "keep").returncode == 0
        r = cli_at(-3600, probe.paths[1], "unref", h, "keep")
        assert r.returncode == 0 and b"note" not in r.stderr, r.stderr
        await trio.sleep(GC_DELAY + 0.5)
        await probe.converge(deadline_s=40)  # runs the GC checks (due at gc_delay + 10 s)
        for i in range(3):
            info = await probe.info(i, bytes.fromhex(h))
            assert {r["ref_id"]: r["deleted"] for r in info["refs"]} == {"doc": False, "keep": True}
            assert info["present"] and info["rc"] == 1, f"node{i + 1}: {info}"
        r = cli_at(0, cfg, "get", h)
        assert r.returncode == 0 and r.stdout == data
