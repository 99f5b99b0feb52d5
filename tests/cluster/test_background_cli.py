"""The admin CLI of the background workers against a real `serve` process (the contract)."""

from __future__ import annotations

import json
import os

import pytest

from tests.cluster.harness import ServeProcesses, cli, write_cluster

pytestmark = pytest.mark.slow


@pytest.fixture
def one(tmp_path):
    configs = write_cluster(tmp_path, 1, rf=1, inline_threshold=100)
    procs = ServeProcesses(configs)
    try:
        procs.start_all()
        yield configs[0]
    finally:
        procs.close()


def ok(*args: str, config) -> bytes:
    r = cli(*args, config=config)
    assert r.returncode == 0, (args, r.stderr.decode())
    return r.stdout


def test_scrub_block_worker_repair_commands(one, tmp_path):
    src = tmp_path / "f"
    data = os.urandom(5000)
    src.write_bytes(data)
    h = ok("put", str(src), "--ref", "r1", config=one).decode().strip()

    r = cli("scrub", "start", "--tranquility", "0", "--wait", config=one)
    # the progress bar is drawn on a terminal only (issue 13): silent here
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    st = json.loads(ok("scrub", "status", "--json", config=one))
    assert {"state", "tranquility", "blocks_checked", "corruptions", "progress",
            "last_completed"} <= set(st)
    assert st["state"] == "idle" and st["blocks_checked"] == 1 and st["progress"] == 1.0
    ok("scrub", "set-tranquility", "3", config=one)
    for action in ("pause", "resume", "cancel"):
        ok("scrub", action, config=one)
    assert json.loads(ok("scrub", "status", "--json", config=one))["tranquility"] == 3

    info = json.loads(ok("block", "info", h, "--json", config=one))
    assert info["hash"] == h and info["rc"] == 1 and info["present"] is True
    assert [r["ref_id"] for r in info["refs"]] == ["r1"] and "error" not in info
    assert json.loads(ok("block", "list-errors", "--json", config=one)) == []
    ok("block", "retry-now", "--all", config=one)
    r = cli("block", "retry-now", config=one)
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1

    r = cli("block", "purge", h, config=one)
    assert r.returncode == 2 and "--yes" in r.stderr.decode()
    ok("block", "purge", h, "--yes", config=one)
    info = json.loads(ok("block", "info", h, "--json", config=one))
    assert info["rc"] == 0 and info["refs"][0]["deleted"] is True

    ok("worker", "set", "resync-workers", "3", config=one)
    ok("worker", "set", "resync-tranquility", "0.5", config=one)
    workers = {w["name"]: w for w in json.loads(ok("worker", "list", "--json", config=one))}
    assert {"resync", "scrub", "repair", "anti-entropy"} <= set(workers)
    assert workers["resync"]["workers"] == 3 and workers["resync"]["tranquility"] == 0.5
    assert "queue_length" in workers["resync"]
    assert workers["resync"]["settings"] == {"resync-workers": 3, "resync-tranquility": 0.5}
    text = ok("worker", "list", config=one).decode()
    assert "resync-workers=3" in text and "scrub-tranquility=" in text
    got = json.loads(ok("worker", "get", "--json", config=one))
    assert {s["name"] for s in got} == {
        "resync-workers", "resync-tranquility", "scrub-tranquility", "rebalance-tranquility"}
    assert ok("worker", "get", "resync-workers", config=one).decode().startswith("resync-workers = 3")
    for args in (("set", "no-such", "1"), ("set", "resync-workers", "inf"),
                 ("set", "scrub-tranquility", "fast"), ("get", "no-such")):
        r = cli("worker", *args, config=one)
        err = r.stderr.decode()
        assert r.returncode == 2 and err.count("\n") == 1, (args, err)
        if "no-such" in args:
            assert "valid settings: resync-workers, resync-tranquility, scrub-tranquility" in err

    out = ok("repair", "--wait", "--rc", config=one).decode()
    assert "repair done" in out
    r = cli("block", "info", "zz", config=one)
    assert r.returncode == 2 and r.stderr.decode().startswith("error:")
