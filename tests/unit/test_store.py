"""Block files (`blocknode.storage.BlockFiles`): durable writes, verify on read, quarantine, walk, tmp sweep."""

from __future__ import annotations

import os
import stat

import pytest

from blocknode.block import VerifiedBlock, hashed
from blocknode.errors import BlockCorrupted, BlockNotFound
from blocknode.storage import BlockFiles
from blocknode.storage.block_files import Written


def _block(n: int) -> tuple[bytes, VerifiedBlock]:
    blk = hashed(os.urandom(n))
    return blk.hash, blk


def test_write_read_round_trip(tmp_path):
    store = BlockFiles(str(tmp_path))
    h, data = _block(5000)
    assert store.write(data) is Written.STORED
    assert store.read(h) == data
    hh = h.hex()
    assert os.path.exists(tmp_path / hh[0:2] / hh[2:4] / hh)


def test_write_existing_is_noop(tmp_path):
    store = BlockFiles(str(tmp_path))
    h, data = _block(100)
    store.write(data)
    mtime = os.stat(store.path(h)).st_mtime_ns
    assert store.write(data) is Written.PRESENT
    assert os.stat(store.path(h)).st_mtime_ns == mtime


def test_missing_block(tmp_path):
    store = BlockFiles(str(tmp_path))
    h, _ = _block(10)
    with pytest.raises(BlockNotFound):
        store.read(h)


def test_flipped_byte_is_quarantined_and_never_returned(tmp_path):
    store = BlockFiles(str(tmp_path))
    h, data = _block(4096)
    store.write(data)
    path = store.path(h)
    with open(path, "r+b") as f:
        f.seek(1234)
        b = f.read(1)
        f.seek(1234)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(BlockCorrupted):
        store.read(h)  # a plain read reports it and leaves it
    assert os.path.exists(path)
    with pytest.raises(BlockCorrupted):
        store.read_or_quarantine(h)
    assert not os.path.exists(path)
    assert os.path.exists(path + ".corrupted")
    with pytest.raises(BlockNotFound):
        store.read(h)
    assert list(store.walk()) == []
    assert store.write(data) is Written.STORED and store.read(h) == data


def test_write_over_a_corrupt_copy_quarantines_and_replaces_it(tmp_path):
    store = BlockFiles(str(tmp_path))
    h, data = _block(4096)
    store.write(data)
    path = store.path(h)
    with open(path, "r+b") as f:
        f.write(b"\0")  # same size, other bytes
    assert store.write(data) is Written.REPLACED
    assert store.read(h) == data and os.path.exists(path + ".corrupted")
    with open(path, "ab") as f:
        f.write(b"tail")  # wrong size
    assert store.write(data) is Written.REPLACED
    assert store.read(h) == data


def test_crash_between_tmp_write_and_rename(tmp_path, monkeypatch):
    store = BlockFiles(str(tmp_path))
    h, data = _block(2048)

    def crash(src, dst):
        raise KeyboardInterrupt("simulated crash before rename")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        store.write(data)
    monkeypatch.undo()
    assert not store.exists(h)
    assert os.path.exists(store.path(h) + ".tmp")
    assert list(store.walk()) == []
    # a restart sweeps the tmp
    store2 = BlockFiles(str(tmp_path))
    assert store2.sweep_tmp() == 1
    assert not os.path.exists(store.path(h) + ".tmp")
    assert store2.write(data) is Written.STORED
    assert store2.read(h) == data


def test_walk_yields_only_blocks_in_order(tmp_path):
    store = BlockFiles(str(tmp_path))
    hashes = []
    for _ in range(20):
        h, data = _block(64)
        store.write(data)
        hashes.append(h)
    # junk that must be ignored
    (tmp_path / "zz").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    some = hashes[0].hex()
    d = tmp_path / some[0:2] / some[2:4]
    (d / "README").write_text("x")
    (d / ("ab" * 32)).write_text("wrong fan-out dir")
    (d / (some[:-1] + "g")).write_text("not hex")
    assert list(store.walk()) == sorted(hashes)
    mid = sorted(hashes)[9]
    assert list(store.walk(start_after=mid)) == sorted(hashes)[10:]


def test_delete(tmp_path):
    store = BlockFiles(str(tmp_path))
    h, data = _block(64)
    store.write(data)
    assert store.delete(h) is True
    assert store.delete(h) is False
    assert not store.exists(h)


async def test_async_wrappers(tmp_path):
    store = BlockFiles(str(tmp_path))
    h, data = _block(100_000)
    assert await store.awrite(data) is Written.STORED
    assert await store.aread(h) == data
    assert await store.adelete(h) is True


def _watch_durability(monkeypatch) -> list[tuple]:
    """Record os.fsync (of a file or a directory, by inode) and os.rename calls, in order."""
    events: list[tuple] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    def rename(src: str, dst: str) -> None:
        real_rename(src, dst)
        events.append(("rename", src, dst))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    return events


def _assert_durable_order(events: list[tuple], final: str) -> None:
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == final]
    assert len(renames) == 1, events
    r = renames[0]
    assert events[r][1] == final + ".tmp"
    file_ino, dir_ino = os.stat(final).st_ino, os.stat(os.path.dirname(final)).st_ino
    # the data is on disk before the name points at it ...
    assert ("fsync", "file", file_ino) in events[:r], f"no fsync of the file before the rename: {events}"
    # ... and the name is on disk before the write is acknowledged
    assert ("fsync", "dir", dir_ino) in events[r + 1:], f"no fsync of the directory after the rename: {events}"


def test_a_block_write_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path, monkeypatch):
    # issue 9 E: a SIGKILL test cannot see a missing fsync (the page cache survives it);
    # this watches the order itself, so removing either fsync fails here.
    store = BlockFiles(str(tmp_path))
    events = _watch_durability(monkeypatch)
    h, data = _block(3000)
    assert store.write(data) is Written.STORED  # new fan-out directories
    _assert_durable_order(events, store.path(h))
    with open(store.path(h), "r+b") as f:  # a write into an existing directory, over a bad copy
        f.write(b"\0")
    events.clear()
    assert store.write(data) is Written.REPLACED
    _assert_durable_order(events, store.path(h))
