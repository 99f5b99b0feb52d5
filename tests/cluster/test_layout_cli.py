"""The `layout` commands against real `serve` processes: the JSON contract, staging,
a stale apply refused, an applied version gossiped to every node, history."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from blocknode.cli import main
from tests.cluster.harness import ServeProcesses, free_ports, write_cluster

pytestmark = pytest.mark.slow


def run_json(capsys, config: Path, *args: str) -> dict:
    assert main([*args, "--json", "--config", str(config)]) == 0
    return json.loads(capsys.readouterr().out)


def test_layout_commands_stage_apply_and_gossip(tmp_path: Path, capsys) -> None:
    configs = write_cluster(tmp_path, 3, rf=3)
    procs = ServeProcesses(configs)
    try:
        procs.start_all()
        n1, n2 = configs[0], configs[1]
        shown = run_json(capsys, n1, "layout", "show")
        assert shown["version"] == 1 and isinstance(shown["version"], int)
        assert [n["id"] for n in shown["nodes"]] == ["node1", "node2", "node3"]
        assert shown["staged"] == [] and sum(n["partitions"] for n in shown["nodes"]) == 3 * 256

        addr = f"127.0.0.1:{free_ports(1)[0]}"
        staged = run_json(capsys, n1, "layout", "assign", "node4", "--zone", "z4",
                          "--capacity", "2", "--addr", addr)
        assert staged["version"] == 1
        assert staged["staged"] == [{"id": "node4", "zone": "z4", "capacity": 2, "addr": addr}]
        assert 0 < staged["moves"] < 3 * 256
        assert main(["layout", "show", "--config", str(n1)]) == 0
        assert "partition slot(s) move" in capsys.readouterr().out

        assert main(["layout", "assign", "node5", "--zone", "z", "--capacity", "1",
                     "--addr", "nohost", "--config", str(n1)]) == 2  # a bad address
        assert main(["layout", "assign", "node5", "--zone", "z", "--capacity", "1",
                     "--config", str(n1)]) == 1  # a new node needs --addr
        assert "--addr" in capsys.readouterr().err
        assert run_json(capsys, n1, "layout", "revert")["staged"] == []
        run_json(capsys, n1, "layout", "assign", "node4", "--zone", "z4", "--capacity", "2",
                 "--addr", addr)
        assert main(["layout", "apply", "--version", "5", "--config", str(n1)]) == 1
        assert "current version is 1" in capsys.readouterr().err
        applied = run_json(capsys, n1, "layout", "apply", "--version", "2")
        assert applied["version"] == 2 and applied["live_versions"] == [1, 2]
        assert applied["staged"] == []
        assert main(["layout", "apply", "--version", "2", "--config", str(n1)]) == 1
        capsys.readouterr()

        # Every node has version 2 within seconds (node4 is not running: the old
        # version stays live, and `status` says who has not synced).
        deadline = time.monotonic() + 15
        while True:
            st = run_json(capsys, n2, "status")["layout"]
            if st["version"] == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert st["version"] == 2 and st["digest"] == applied["digest"]
        assert "node4" in st["pending_sync"] and st["live_versions"] == [1, 2]
        assert main(["status", "--config", str(n2)]) == 0
        assert "migrating" in capsys.readouterr().out
        history = run_json(capsys, n2, "layout", "history")
        assert [v["version"] for v in history] == [1, 2]
        assert all(v["live"] for v in history)
        workers = run_json(capsys, n2, "worker", "list")
        assert any(w["name"] == "layout-sync" and w["version"] == 2 for w in workers)
    finally:
        procs.close()
