"""Real `python -m blocknode serve` processes driven through the CLI (the contract)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocknode import fastpath
from blocknode.config import load_config
from blocknode.rpc.handshake import ClientKey
from tests.cluster.harness import ServeProcesses, cli, free_ports, write_cluster

pytestmark = pytest.mark.slow


@pytest.fixture
def three(tmp_path):
    configs = write_cluster(tmp_path, 3, rpc_timeout=3.0)
    procs = ServeProcesses(configs)
    try:
        procs.start_all()
        yield procs, configs
    finally:
        procs.close()


def _err(r: subprocess.CompletedProcess[bytes]) -> str:
    return r.stderr.decode()


def test_put_get_ref_unref_status(three, tmp_path):
    procs, configs = three
    src = tmp_path / "data.bin"
    data = os.urandom(300_000)
    src.write_bytes(data)
    r = cli("put", str(src), "--ref", "obj1", config=configs[0])
    assert r.returncode == 0, _err(r)
    h = r.stdout.decode().strip()
    assert h == fastpath.block_hash(data).hex()  # a single block: its own hash, alone on stdout
    r = cli("get", h, config=configs[1])
    assert r.returncode == 0 and r.stdout == data
    out = tmp_path / "out.bin"
    r = cli("get", h, "-o", str(out), config=configs[2])
    assert r.returncode == 0 and out.read_bytes() == data
    # without --ref a fresh reference is made and shown on stderr
    r = cli("put", str(src), config=configs[0])
    assert r.returncode == 0 and "reference: ref-" in _err(r)
    assert cli("ref", h, "another", config=configs[0]).returncode == 0
    assert cli("unref", h, "another", config=configs[0]).returncode == 0
    r = cli("status", "--json", config=configs[0])
    assert r.returncode == 0, _err(r)
    st = json.loads(r.stdout)
    for key in ("node_id", "peers", "blocks", "rc_entries", "resync_queue", "errors"):
        assert key in st
    assert st["node_id"] == "node1"
    assert {p["id"] for p in st["peers"]} >= {"node2", "node3"}
    assert all(set(p) >= {"id", "addr", "up"} for p in st["peers"])
    assert st["blocks"] >= 1 and st["rc_entries"] >= 1
    r = cli("status", config=configs[0])
    assert r.returncode == 0 and b"node1" in r.stdout


def test_large_file_through_manifest(three, tmp_path):
    procs, configs = three
    src = tmp_path / "big.bin"
    data = os.urandom(2 * 1024 * 1024 + 777)
    src.write_bytes(data)
    r = cli("put", str(src), "--ref", "big", config=configs[0])
    assert r.returncode == 0, _err(r)
    h = r.stdout.decode().strip()
    assert len(h) == 64
    r = cli("get", h, config=configs[2])
    assert r.returncode == 0 and r.stdout == data


def test_node_down_quorum_and_errors(three, tmp_path):
    procs, configs = three
    src = tmp_path / "f"
    src.write_bytes(b"hello")
    procs.kill(2)
    r = cli("put", str(src), "--ref", "a", config=configs[0])
    assert r.returncode == 0, _err(r)
    h = r.stdout.decode().strip()
    assert cli("get", h, config=configs[1]).stdout == b"hello"
    procs.kill(1)
    r = cli("put", str(src), "--ref", "b", config=configs[0])
    assert r.returncode != 0
    msg = _err(r)
    assert msg.count("\n") == 1 and "Traceback" not in msg
    assert "quorum" in msg and "node2" in msg and "node3" in msg
    # a large file is put block by block, concurrently: still one line, not a group
    big = tmp_path / "big"
    big.write_bytes(os.urandom(2 * 1024 * 1024 + 5))
    r = cli("put", str(big), "--ref", "c", config=configs[0])
    msg = _err(r)
    assert r.returncode != 0 and msg.count("\n") == 1 and "Traceback" not in msg, msg
    assert "quorum" in msg


def test_cli_errors_are_one_line(three, tmp_path):
    procs, configs = three
    cases = [
        (cli("get", "nothex", config=configs[0]), "64 hex"),
        (cli("get", "ab" * 32, config=configs[0]), "not found"),
        (cli("get", "ab" * 32, "-o", str(tmp_path / "out"), config=configs[0]), "not found"),
        (cli("put", str(tmp_path / "missing"), config=configs[0]), "no such file"),
    ]
    # a key the node does not know (a client's config holds a key, not the cluster secret)
    (tmp_path / "stranger.key").write_text(f"{ClientKey.generate()}\n")
    (tmp_path / "stranger.key").chmod(0o600)
    bad = tmp_path / "bad.toml"
    bad.write_text(f'rpc_public_addr = "{load_config(configs[0]).public_addr}"\n'
                   'client_key_file = "stranger.key"\n')
    cases.append((cli("status", config=bad), "does not know client key"))
    # no key at all
    nokey = tmp_path / "nokey.toml"
    nokey.write_text(f'rpc_public_addr = "{load_config(configs[0]).public_addr}"\n')
    cases.append((cli("status", config=nokey), "no client key"))
    # unreachable node
    port = free_ports(1)[0]
    down = tmp_path / "down.toml"
    down.write_text(f'rpc_bind_addr = "127.0.0.1:{port}"\nclient_key_file = "stranger.key"\n')
    cases.append((cli("status", config=down), "unreachable"))
    assert not list(tmp_path.glob("out*"))  # a failed get leaves no file behind
    for r, needle in cases:
        msg = _err(r)
        assert r.returncode != 0, msg
        assert "Traceback" not in msg and msg.count("\n") == 1, msg
        assert needle in msg.lower(), msg


def test_address_in_use_is_one_clear_line(tmp_path):
    configs = write_cluster(tmp_path, 1, rf=1)
    port = int(load_config(configs[0]).rpc_bind_addr.rpartition(":")[2])
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        r = cli("serve", config=configs[0], timeout=30)
    msg = _err(r)
    assert r.returncode != 0 and "Traceback" not in msg and msg.count("\n") == 1, msg
    assert "cannot listen on" in msg and "rpc_bind_addr" in msg


def test_sigterm_shuts_down_cleanly(tmp_path):
    configs = write_cluster(tmp_path, 1, rf=1)
    procs = ServeProcesses(configs)
    try:
        procs.start_all()
        procs.signal(0, signal.SIGTERM)
        rc = procs.procs[0].wait(timeout=15)
        assert rc == 0
        log = (configs[0].parent / "serve.log").read_text()
        assert "shutting down" in log and "stopped" in log and "Traceback" not in log
    finally:
        procs.close()


@contextlib.contextmanager
def _default_node(cwd: Path) -> Iterator[None]:
    """`serve` with no config, run in `cwd`, on the embedded default port; ready on entry."""
    # The embedded default listens on 127.0.0.1:3901 and keeps its data in ./blocknode-data:
    # run it in a scratch directory, on the real default port.
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 3901))
    except OSError:
        pytest.skip("port 3901 (the embedded default) is busy on this machine")
    finally:
        s.close()
    p = subprocess.Popen([sys.executable, "-m", "blocknode", "serve"], cwd=cwd,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         env=_NO_CONFIG_ENV)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if (cwd / "blocknode-data" / "rpc_secret").exists():
                r = _no_config_cli(cwd, "status", "--json")
                if r.returncode == 0:
                    break
            time.sleep(0.1)
        assert r.returncode == 0, r.stderr
        yield
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=15)


# Run from another directory, `python -m blocknode` must still import this checkout.
_REPO = str(Path(__file__).resolve().parents[2])
_NO_CONFIG_ENV = {**{k: v for k, v in os.environ.items() if k != "BLOCKNODE_CONFIG"},
                  "PYTHONPATH": os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p)}


def _no_config_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "blocknode", *args], cwd=cwd,
                          capture_output=True, timeout=30, env=_NO_CONFIG_ENV)


def test_default_node_without_config(tmp_path):
    """`serve` with no config: single node, ./blocknode-data, secret made with mode 0600."""
    with _default_node(tmp_path):
        r = _no_config_cli(tmp_path, "status", "--json")
        assert json.loads(r.stdout)["node_id"] == "node1"
        mode = os.stat(tmp_path / "blocknode-data" / "rpc_secret").st_mode & 0o777
        assert mode == 0o600
        (tmp_path / "f").write_bytes(b"abc")
        r = _no_config_cli(tmp_path, "put", "f")
        assert r.stdout.decode().strip() == fastpath.block_hash(b"abc").hex()
        assert (tmp_path / "blocknode-data" / "meta").is_dir()


def test_default_node_found_from_a_subdirectory(tmp_path):
    """D6: with no config, the CLI looked for ./blocknode-data relative to the working
    directory only: from a subdirectory it failed on a relative secret path."""
    with _default_node(tmp_path):
        sub = tmp_path / "a" / "b"
        sub.mkdir(parents=True)
        (sub / "f").write_bytes(b"from below")
        r = _no_config_cli(sub, "put", "f", "--ref", "below")
        assert r.returncode == 0, r.stderr
        h = r.stdout.decode().strip()
        r = _no_config_cli(tmp_path, "get", h)
        assert r.returncode == 0 and r.stdout == b"from below"
        # a second default serve from below finds the same node, so it is refused
        r = subprocess.run([sys.executable, "-m", "blocknode", "serve"], cwd=sub, capture_output=True,
                           timeout=30, env=_NO_CONFIG_ENV)
        assert r.returncode == 1 and b"in use by another blocknode serve" in r.stderr, r.stderr
        assert not (sub / "blocknode-data").exists()
    elsewhere = tmp_path.parent / (tmp_path.name + "-elsewhere")
    elsewhere.mkdir()
    r = _no_config_cli(elsewhere, "status")
    assert r.returncode == 2 and str(elsewhere).encode() in r.stderr, r.stderr


def _three_consecutive_free_ports() -> int:
    for _ in range(50):
        base = free_ports(1)[0]
        socks = []
        try:
            for port in range(base, base + 3):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no 3 consecutive free ports")


def test_init_cluster_writes_working_configs(tmp_path):
    base = _three_consecutive_free_ports()
    r = cli("init-cluster", str(tmp_path / "c"), "--nodes", "3", "--base-port", str(base))
    assert r.returncode == 0, _err(r)
    out = r.stdout.decode()
    assert out.count("python -m blocknode serve --config") == 3
    configs = [tmp_path / "c" / f"node{i}" / "config.toml" for i in (1, 2, 3)]
    assert all(c.exists() for c in configs)
    assert os.stat(tmp_path / "c" / "rpc_secret").st_mode & 0o777 == 0o600
    procs = ServeProcesses(configs)
    try:
        procs.start_all()
        (tmp_path / "f").write_bytes(b"through init-cluster")
        r = cli("put", str(tmp_path / "f"), "--ref", "x", config=configs[0])
        assert r.returncode == 0, _err(r)
        assert cli("get", r.stdout.decode().strip(), config=configs[2]).stdout == b"through init-cluster"
    finally:
        procs.close()
    r = cli("init-cluster", str(tmp_path / "c"), "--nodes", "3")
    assert r.returncode != 0 and "already" in _err(r)
