"""The key commands' contract and a client's key on the command line (issue 10 part 1),
against one real `serve` process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from blocknode.config import load_config
from tests.cluster.harness import ServeProcesses, write_cluster

pytestmark = pytest.mark.slow

KEY_LINE = re.compile(rb"BK[0-9a-f]{24}:[0-9a-f]{64}\n")


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("node")
    configs = write_cluster(root, 1, rf=1)
    procs = ServeProcesses(configs)
    try:
        procs.start_all()
        yield configs[0]
    finally:
        procs.close()


def run(*args: str, config: Path | None = None, key: str | None = None,
        input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("BLOCKNODE_KEY", "BLOCKNODE_CONFIG")}
    if key is not None:
        env["BLOCKNODE_KEY"] = key
    cmd = [sys.executable, "-m", "blocknode", *args]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(cmd, input=input, capture_output=True, timeout=60, env=env)


def test_key_create_prints_exactly_the_key_and_the_key_works(node, tmp_path):
    r = run("key", "create", "app", "--read", "--write", config=node)
    assert r.returncode == 0, r.stderr
    assert KEY_LINE.fullmatch(r.stdout), r.stdout  # one line, the key, nothing else
    key = r.stdout.decode().strip()
    assert b"shown only" in r.stderr

    r = run("key", "list", "--json", config=node)
    assert r.returncode == 0, r.stderr
    listed = {k["name"]: k for k in json.loads(r.stdout)}
    assert listed["app"]["id"] == key.split(":")[0]
    assert listed["app"]["permissions"] == ["read", "write"]
    assert key.split(":")[1].encode() not in r.stdout  # the secret is stored nowhere
    assert listed["admin@node1"]["permissions"] == ["read", "write", "admin"]
    r = run("key", "list", config=node)
    assert r.returncode == 0 and b"app" in r.stdout

    # An application's config: the node's address and a key file; no cluster secret.
    (tmp_path / "app.key").write_text(key + "\n")
    (tmp_path / "app.key").chmod(0o600)
    app = tmp_path / "app.toml"
    app.write_text(tomli_w.dumps({"rpc_public_addr": load_config(node).public_addr,
                                  "client_key_file": "app.key"}))
    r = run("put", "-", "--ref", "a", config=app, input=b"from the app")
    assert r.returncode == 0, r.stderr
    h = r.stdout.decode().strip()
    assert run("get", h, config=app).stdout == b"from the app"
    r = run("scrub", "status", config=app)
    assert r.returncode == 3 and b"'admin' permission" in r.stderr, r.stderr
    assert r.stderr.count(b"\n") == 1

    # BLOCKNODE_KEY wins over the file: a read-only key cannot put
    r = run("key", "create", "ro", "--read", config=node)
    ro = r.stdout.decode().strip()
    r = run("put", "-", config=app, key=ro, input=b"refused")
    assert r.returncode == 3 and b"'write' permission" in r.stderr, r.stderr
    assert run("get", h, config=app, key=ro).stdout == b"from the app"

    # deleted: refused at once (exit 3), on the next command
    r = run("key", "delete", "app", config=node)
    assert r.returncode == 0 and b"deleted key app" in r.stdout, r.stderr
    r = run("get", h, config=app)
    assert r.returncode == 3 and b"does not know client key" in r.stderr, r.stderr
    r = run("key", "delete", "app", config=node)
    assert r.returncode == 1 and b"no key named 'app'" in r.stderr


def test_key_commands_refuse_bad_usage(node, tmp_path):
    r = run("key", "create", "nothing", config=node)
    assert r.returncode == 2 and b"--read" in r.stderr and r.stdout == b""
    r = run("key", "create", "", "--read", config=node)
    assert r.returncode == 2 and r.stdout == b"", r.stderr
    r = run("key", "create", "twice", "--admin", config=node)
    assert r.returncode == 0
    r = run("key", "create", "twice", "--admin", config=node)
    assert r.returncode == 2 and b"exists already" in r.stderr and r.stdout == b""
    bad = run("status", config=node, key="BKnot-a-key")
    assert bad.returncode == 2 and b"BLOCKNODE_KEY" in bad.stderr
    assert bad.stderr.count(b"\n") == 1
