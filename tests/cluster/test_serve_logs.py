"""The log of a real `serve` process (issue 13 part 2): every line has time, level, node id
and logger; `log_format = "json"` gives one JSON object per line; background outcomes
(here: "scrub complete") come out at INFO instead of being dropped."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.harness import ServeProcesses, cli, write_cluster

pytestmark = pytest.mark.slow

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) node1 [\w.]+: ")


def _wait_for(log: Path, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text()
        if text in content:
            return content
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the log within {timeout}s:\n{log.read_text()[-3000:]}")


def _run_and_stop(tmp_path: Path, text: str, **fields) -> str:
    """Start one node, put a block, run a scrub, wait for `text`, SIGTERM; the whole log."""
    configs = write_cluster(tmp_path, 1, rf=1, **fields)
    log = configs[0].parent / "serve.log"
    procs = ServeProcesses(configs)
    try:
        procs.start_all()
        src = tmp_path / "f"
        src.write_bytes(b"log me")
        assert cli("put", str(src), "--ref", "r", config=configs[0]).returncode == 0
        r = cli("scrub", "start", "--tranquility", "0", config=configs[0])
        assert r.returncode == 0, r.stderr
        _wait_for(log, text)
        procs.signal(0, signal.SIGTERM)
        assert procs.procs[0].wait(timeout=15) == 0
        return log.read_text()
    finally:
        procs.close()


def test_text_log_lines_carry_time_level_and_node(tmp_path):
    content = _run_and_stop(tmp_path, "scrub complete")
    lines = content.splitlines()
    assert lines, content
    bad = [line for line in lines if not TEXT_LINE.match(line)]
    assert not bad, bad
    assert any(re.search(r" INFO node1 blocknode\.serve: .*listening on 127\.0\.0\.1:\d+", x) for x in lines)
    assert any(" INFO node1 blocknode.workers.scrub: scrub complete: 1 blocks checked, 0 corrupt" in x for x in lines)
    assert any(x.endswith("blocknode.serve: SIGTERM: shutting down") for x in lines)
    assert lines[-1].endswith("blocknode.serve: stopped")
    # nothing per request at INFO: the put and the scrub command left no line of their own
    assert not any("put" in x.lower() for x in lines), lines


def test_json_log_format_gives_one_object_per_line(tmp_path):
    content = _run_and_stop(tmp_path, "scrub complete", log_format="json")
    objs = [json.loads(line) for line in content.splitlines()]
    assert objs
    for obj in objs:
        assert {"time", "level", "node", "logger", "message"} <= obj.keys(), obj
        assert obj["node"] == "node1"
    messages = [(o["level"], o["logger"], o["message"]) for o in objs]
    assert ("INFO", "blocknode.workers.scrub", "scrub complete: 1 blocks checked, 0 corrupt") in messages
    assert objs[-1]["message"] == "stopped"


def test_log_level_flag_overrides_the_config(tmp_path):
    """log_level = "debug" in the file, --log-level WARNING on the command line: no INFO line."""
    configs = write_cluster(tmp_path, 1, rf=1, log_level="debug")
    p = subprocess.Popen([sys.executable, "-m", "blocknode", "serve", "--config", str(configs[0]),
                          "--log-level", "WARNING"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while cli("status", config=configs[0]).returncode != 0:
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.stderr else ""
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0
    assert b"INFO" not in err and b"DEBUG" not in err and b"listening" not in err, err
