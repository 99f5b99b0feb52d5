"""The command line keeps its contract (issue 9, section D): `main()` run in this
process against one real `serve` process shared by the module (fast), or the CLI
run as a process where the test is about the process (exit status, stdout, RSS).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from blocknode import fastpath
from blocknode.cli import main
from blocknode.config import load_config
from tests.cluster.harness import ServeProcesses, cli, free_ports, write_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def serving(tmp_path_factory) -> ServeProcesses:
    root = tmp_path_factory.mktemp("node")
    configs = write_cluster(root, 1, rf=1, block_size=256 * 1024, inline_threshold=1024)
    procs = ServeProcesses(configs)
    try:
        procs.start_all()
        yield procs
    finally:
        procs.close()


@pytest.fixture
def node(serving) -> Path:
    return serving.configs[0]


def run(node: Path, *args: str) -> int:
    return main([*args, "--config", str(node)])


def put_bytes(node: Path, tmp_path: Path, data: bytes, capsys) -> str:
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    assert run(node, "put", str(src), "--ref", "t") == 0
    return capsys.readouterr().out.strip()


# ---------------------------------------------------------------- get -o PATH

def test_get_o_leaves_a_foreign_part_file_alone(node, tmp_path, capsys):
    """D1: `get -o PATH` truncated, then deleted, a PATH.part it had not created."""
    data = os.urandom(5000)
    h = put_bytes(node, tmp_path, data, capsys)
    out = tmp_path / "out.bin"
    part = tmp_path / "out.bin.part"
    part.write_bytes(b"someone else's file")
    assert run(node, "get", h, "-o", str(out)) == 0
    assert out.read_bytes() == data
    assert part.read_bytes() == b"someone else's file"
    # a failed get leaves PATH, the foreign .part and nothing else
    out.write_bytes(b"old")
    assert run(node, "get", "ab" * 32, "-o", str(out)) == 1
    assert out.read_bytes() == b"old" and part.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "out.bin.part", "src.bin"]


def test_get_o_writes_directly_to_a_fifo(node, tmp_path, capsys):
    """D1: a FIFO at PATH was replaced by a regular file instead of being written to."""
    data = os.urandom(3000)  # fits in the pipe buffer: no reader thread needed
    h = put_bytes(node, tmp_path, data, capsys)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert run(node, "get", h, "-o", str(fifo)) == 0
        assert os.read(rfd, 10_000) == data
    finally:
        os.close(rfd)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "src.bin"]


def test_get_o_dev_null(node, tmp_path, capsys):
    """D1: `-o /dev/null` wrote /dev/null.part, then renamed it over /dev/null."""
    h = put_bytes(node, tmp_path, b"x" * 2000, capsys)
    # First a private twin of /dev/null (when we may make one): the old code replaced it.
    twin = tmp_path / "null"
    try:
        os.mknod(twin, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except OSError:
        pass
    else:
        assert run(node, "get", h, "-o", str(twin)) == 0, capsys.readouterr().err
        assert stat.S_ISCHR(os.stat(twin).st_mode)
    assert run(node, "get", h, "-o", os.devnull) == 0, capsys.readouterr().err
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert not Path(os.devnull + ".part").exists()


def test_get_o_errors_name_path_not_the_temp_file(node, tmp_path, capsys):
    """D1: errors named `PATH.part`, an internal name."""
    h = put_bytes(node, tmp_path, b"y" * 2000, capsys)
    missing = tmp_path / "no" / "such" / "dir" / "out"
    assert run(node, "get", h, "-o", str(missing)) == 1
    err = capsys.readouterr().err
    assert err == f"error: cannot write {missing}: No such file or directory\n"
    d = tmp_path / "adir"
    d.mkdir()
    assert run(node, "get", h, "-o", str(d)) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot write {d}: is a directory\n"
    assert list(d.iterdir()) == [] and not list(tmp_path.glob("*.part"))


def test_get_o_replaces_a_regular_file_and_keeps_its_mode(node, tmp_path, capsys):
    data = os.urandom(700_000)  # several blocks (block_size 256 KiB)
    h = put_bytes(node, tmp_path, data, capsys)
    out = tmp_path / "out"
    out.write_bytes(b"old")
    out.chmod(0o640)
    link = tmp_path / "link"
    link.symlink_to(out)
    assert run(node, "get", h, "-o", str(link)) == 0
    assert link.is_symlink() and out.read_bytes() == data
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


# ---------------------------------------------------------------- put

def test_put_dir_says_it_is_a_directory(node, tmp_path, capsys):
    """D2: `put DIR` said "no such file"."""
    assert run(node, "put", str(tmp_path)) == 2
    assert capsys.readouterr().err == f"error: cannot read {tmp_path}: is a directory (put stores one file)\n"


def test_put_reads_a_fifo_as_a_stream(node, tmp_path, capsys):
    """D2: `put <(cmd)` and FIFOs were refused as "no such file"."""
    data = os.urandom(600_000)  # more than one block: the manifest path
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    assert run(node, "put", str(src), "--ref", "file") == 0
    h_file = capsys.readouterr().out.strip()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"cat {src} > {fifo}"])
    try:
        assert run(node, "put", str(fifo), "--ref", "fifo") == 0
    finally:
        writer.wait(timeout=30)
    assert capsys.readouterr().out.strip() == h_file  # same bytes, same blocks, same hash
    # `<(cmd)` is a pipe under /dev/fd
    r = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -m blocknode put <(cat "{src}") --config "{node}"'],
        capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == h_file


def test_put_small_stdin_is_one_block(node):
    r = subprocess.run([sys.executable, "-m", "blocknode", "put", "-", "--config", str(node)],
                       input=b"hello", capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == fastpath.block_hash(b"hello").hex()


def _put_stdin_max_rss(node: Path, size: int) -> int:
    """Peak RSS (KiB) of `put -` fed `size` bytes through a pipe."""
    p = subprocess.Popen([sys.executable, "-m", "blocknode", "put", "-", "--config", str(node)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunk = os.urandom(1 << 20)
    try:
        for _ in range(size >> 20):
            p.stdin.write(chunk)
        p.stdin.close()
        out = p.stdout.read()
        err = p.stderr.read()
    finally:
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    assert p.returncode == 0, err
    assert len(out.strip()) == 64
    return usage.ru_maxrss


def test_put_stdin_streams_block_by_block(node):
    """D2: `put -` read all of stdin into memory (50 MiB took 141 MB of RSS)."""
    small = _put_stdin_max_rss(node, 1 << 20)
    big = _put_stdin_max_rss(node, 48 << 20)
    assert big - small < 24 * 1024, (small, big)  # KiB: a few blocks in flight, not the data


# ---------------------------------------------------------------- closed stdout

def _with_closed_stdout(node: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    r, w = os.pipe()
    os.close(r)  # the reader is gone before we write anything: every write is EPIPE
    try:
        return subprocess.run([sys.executable, "-m", "blocknode", *args, "--config", str(node)],
                              stdout=w, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(w)


@pytest.mark.parametrize("command", ["status", "status --json", "get", "put"])
def test_closed_stdout_exits_quietly(node, tmp_path, command):
    """D3: `status | head -1`, `get … | head -c 10` printed `error: [Errno 32] Broken pipe`."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(600_000))
    args = command.split()
    if command == "get":
        r = subprocess.run([sys.executable, "-m", "blocknode", "put", str(src), "--ref", "p",
                            "--config", str(node)], capture_output=True, timeout=60)
        args.append(r.stdout.decode().strip())
    elif command == "put":
        args += [str(src), "--ref", "p"]
    r = _with_closed_stdout(node, *args)
    assert r.stderr == b"" and r.returncode == 141, (r.returncode, r.stderr)


# ---------------------------------------------------------------- bad input refused by the node

def test_bad_input_refused_by_the_node_exits_2_without_a_tag(node, tmp_path, capsys):
    """D4: the node's `bad_request` exited 1 and showed `[bad_request]` to people."""
    h = put_bytes(node, tmp_path, b"refs", capsys)
    long_ref = "r" * 300  # the node's limit is 255 bytes; the CLI does not check it itself
    for args in (["ref", h, long_ref], ["unref", h, long_ref],
                 ["put", str(tmp_path / "src.bin"), "--ref", long_ref],
                 ["worker", "set", "resync-workers", "100000"],
                 ["worker", "set", "resync-workers", "1e300"]):
        assert run(node, *args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: node node1: ") and err.count("\n") == 1, err
        assert "[" not in err and "bad_request" not in err, err
    # operational errors from the node stay 1, and lose their tag too
    assert run(node, "get", "ab" * 32) == 1
    err = capsys.readouterr().err
    assert "not found" in err and "[not_found]" not in err


# ---------------------------------------------------------------- one serve per directory

@pytest.mark.parametrize("shared", ["data_dir", "metadata_dir"])
def test_second_serve_on_the_same_dir_refuses_to_start(serving, tmp_path, shared):
    """D5: a second `serve` on the same data_dir or metadata_dir (another port) started."""
    cfg = load_config(serving.configs[0])
    port = free_ports(1)[0]
    mine = {"data_dir": str(tmp_path / "data"), "metadata_dir": str(tmp_path / "meta")}
    mine[shared] = getattr(cfg, shared)
    second = tmp_path / "second.toml"
    second.write_text(tomli_w.dumps({**mine, "node_id": "node1", "rpc_bind_addr": f"127.0.0.1:{port}",
                                     "rpc_secret": cfg.rpc_secret}))
    r = cli("serve", config=second, timeout=30)
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1, err
    assert f"{shared} {getattr(cfg, shared)} is in use by another blocknode serve" in err
    assert f"pid {serving.procs[0].pid}," in err
    # the first node was not disturbed, and the refused one left nothing behind
    assert run(serving.configs[0], "status", "--json") == 0
    other = "metadata_dir" if shared == "data_dir" else "data_dir"
    assert not os.path.exists(mine[other]) or os.listdir(mine[other]) == ["blocknode.lock"]


# ---------------------------------------------------------------- block info

def store_while_stopped(serving: ServeProcesses, node: Path, *refs: tuple[str, str, bool, int]) -> None:
    """Store reference versions (hash hex, ref id, deleted, ts) into the node's metadata
    while it is stopped, then start it again: how a version written before issue 10
    (when clients chose the times) may still be there. No client can do it any more."""
    from blocknode.storage import MetadataStore, RefEntry

    cfg = load_config(node)
    serving.kill(0)
    meta = MetadataStore(cfg.metadata_dir, map_size=cfg.lmdb_map_size)
    try:
        for h, ref_id, deleted, ts in refs:
            version = RefEntry(bytes.fromhex(h), ref_id, deleted, ts)
            meta.env.write_now(lambda txn, v=version: meta.refs.tx_apply(txn, v))
    finally:
        meta.close()
    serving.start(0)
    serving.wait_ready(0)


def test_block_info_with_the_largest_timestamp(serving, node, tmp_path, capsys):
    """D8: a reference timestamped 2**63 - 1 made `block info` print a traceback."""
    h = put_bytes(node, tmp_path, b"far future", capsys)
    store_while_stopped(serving, node, (h, "far", False, 2**63 - 1))
    assert run(node, "block", "info", h) == 0
    out = capsys.readouterr().out
    assert f"ref      far  live  {2**63 - 1} ms since the epoch (not a calendar date)" in out
    assert run(node, "block", "info", h, "--json") == 0
    assert {"ref_id": "far", "deleted": False, "ts": 2**63 - 1}.items() <= next(
        r for r in json.loads(capsys.readouterr().out)["refs"] if r["ref_id"] == "far").items()


# ---------------------------------------------------------------- ref / unref

def test_unref_of_a_reference_that_does_not_exist_says_so(node, tmp_path, capsys):
    """Issue 9 C.14: `unref` of a reference that does not exist succeeded silently (and
    wrote a tombstone). It still exits 0 (the deletion is recorded), with a note."""
    h = put_bytes(node, tmp_path, b"unref me", capsys)
    assert run(node, "unref", h, "nosuch") == 0
    err = capsys.readouterr().err
    assert err == f"note: {h} had no reference 'nosuch': nothing was deleted\n"
    assert run(node, "unref", h, "t") == 0
    assert capsys.readouterr().err == ""
    assert run(node, "unref", h, "t") == 0  # again: it is gone now
    assert "had no reference 't'" in capsys.readouterr().err


def test_a_change_that_lost_to_a_newer_version_says_so_and_exits_1(serving, node, tmp_path, capsys):
    """Issue 10 part 2: a deletion timestamped an hour ahead (stored before the cluster
    set the times) wins over a `ref` until then: the command says so, exit 1."""
    import time

    h = put_bytes(node, tmp_path, b"lost ref", capsys)
    store_while_stopped(serving, node, (h, "gone", True, time.time_ns() // 1_000_000 + 3600_000))
    assert run(node, "ref", h, "gone") == 1
    err = capsys.readouterr().err
    assert "lost to a newer deletion" in err and "it is not in effect" in err, err
    assert err.count("\n") == 1 and "[conflict]" not in err
    assert run(node, "ref", h, "other") == 0  # any other reference is fine
