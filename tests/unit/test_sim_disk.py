"""The simulated disk (`blocknode.sim.disk`): crash semantics and write faults, alone and
under the block files."""

from __future__ import annotations

import errno
import os
import random

import pytest

from blocknode.block import hashed
from blocknode.errors import StoreError
from blocknode.sim.disk import SimDisk
from blocknode.storage import BlockFiles

ROOT = "/simdisk/n1"
W = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def _write(disk: SimDisk, path: str, data: bytes, *, fsync: bool) -> None:
    fd = disk.open(path, W, 0o600)
    try:
        assert disk.write(fd, data) == len(data)
        if fsync:
            disk.fsync(fd)
    finally:
        disk.close(fd)


def _read(disk: SimDisk, path: str) -> bytes:
    with disk.open_read(path) as f:
        return f.read()


def _disk() -> SimDisk:
    d = SimDisk(ROOT)
    d.makedirs(f"{ROOT}/a", exist_ok=True)
    d.fsync_dir(ROOT)
    return d


def test_fsynced_data_and_synced_entries_survive_every_crash() -> None:
    for seed in range(50):
        d = _disk()
        _write(d, f"{ROOT}/a/f.tmp", b"durable", fsync=True)
        d.rename(f"{ROOT}/a/f.tmp", f"{ROOT}/a/f")
        d.fsync_dir(f"{ROOT}/a")
        _write(d, f"{ROOT}/a/g", b"maybe", fsync=False)  # not synced: may go
        d.crash(random.Random(seed))
        assert _read(d, f"{ROOT}/a/f") == b"durable"
        assert not d.exists(f"{ROOT}/a/f.tmp")
        assert d.unsynced() == 0


def test_unsynced_data_is_kept_dropped_or_torn_by_the_seed() -> None:
    seen = set()
    for seed in range(60):
        d = _disk()
        _write(d, f"{ROOT}/a/f", b"", fsync=False)
        d.fsync_dir(f"{ROOT}/a")  # the name is durable, its data is not
        fd = d.open(f"{ROOT}/a/f", os.O_WRONLY)
        d.write(fd, b"0123456789")
        d.close(fd)
        rep = d.crash(random.Random(seed))
        got = _read(d, f"{ROOT}/a/f")
        assert b"0123456789".startswith(got)  # a prefix: kept, dropped (empty) or torn
        if got == b"0123456789":
            seen.add("kept")
            assert rep.data_kept == 1 and rep.lost == 0
        elif got == b"":
            seen.add("dropped or torn at 0")
            assert rep.lost == 1
        else:
            seen.add("torn")
            assert rep.data_torn == 1
    assert seen == {"kept", "dropped or torn at 0", "torn"}


def test_a_rename_without_directory_fsync_may_revert() -> None:
    outcomes = set()
    for seed in range(40):
        d = _disk()
        _write(d, f"{ROOT}/a/f.tmp", b"x", fsync=True)
        d.fsync_dir(f"{ROOT}/a")
        d.rename(f"{ROOT}/a/f.tmp", f"{ROOT}/a/f")  # no directory fsync
        d.crash(random.Random(seed))
        outcomes.add((d.exists(f"{ROOT}/a/f.tmp"), d.exists(f"{ROOT}/a/f")))
        for name in ("f", "f.tmp"):
            if d.exists(f"{ROOT}/a/{name}"):
                assert _read(d, f"{ROOT}/a/{name}") == b"x"  # the data itself was synced
    assert (True, False) in outcomes  # reverted
    assert (False, True) in outcomes  # kept


def test_an_unsynced_unlink_may_come_back_and_a_new_dir_may_vanish_with_its_files() -> None:
    back = gone = 0
    for seed in range(40):
        d = _disk()
        _write(d, f"{ROOT}/a/old", b"old", fsync=True)
        d.fsync_dir(f"{ROOT}/a")
        d.unlink(f"{ROOT}/a/old")
        d.makedirs(f"{ROOT}/a/new")  # its entry in a/ is not synced
        _write(d, f"{ROOT}/a/new/f", b"f", fsync=True)
        d.fsync_dir(f"{ROOT}/a/new")  # synced inside a directory that may itself vanish
        d.crash(random.Random(seed))
        back += d.exists(f"{ROOT}/a/old")
        if not d.exists(f"{ROOT}/a/new"):
            gone += 1
            assert not d.exists(f"{ROOT}/a/new/f")
        else:
            assert _read(d, f"{ROOT}/a/new/f") == b"f"
    assert back and gone


def test_crash_is_deterministic_per_seed() -> None:
    def run(seed: int) -> tuple:
        d = _disk()
        for i in range(10):
            _write(d, f"{ROOT}/a/f{i}", bytes(range(i + 5)), fsync=i % 2 == 0)
        rep = d.crash(random.Random(seed))
        return rep, [(p, _read(d, p)) for p in d.files(ROOT)]

    assert run(7) == run(7)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EROFS])
def test_faults_raise_their_errno_and_reads_keep_working(code: int) -> None:
    d = _disk()
    _write(d, f"{ROOT}/a/f", b"data", fsync=True)
    d.set_fault(code)
    for call in (lambda: d.open(f"{ROOT}/a/new", W),
                 lambda: d.makedirs(f"{ROOT}/b")):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == code
    fd = d.open(f"{ROOT}/a/f", os.O_WRONLY) if code == errno.ENOSPC else None
    if fd is not None:  # a full disk: opening an existing file works, writing does not
        with pytest.raises(OSError) as e:
            d.write(fd, b"more")
        assert e.value.errno == errno.ENOSPC
        d.close(fd)
        assert d.free_bytes(ROOT) == 0
    else:  # EIO, EROFS: every change fails
        for call in (lambda: d.unlink(f"{ROOT}/a/f"),
                     lambda: d.rename(f"{ROOT}/a/f", f"{ROOT}/a/g"),
                     lambda: d.fsync_dir(f"{ROOT}/a"),
                     lambda: d.open(f"{ROOT}/a/f", os.O_WRONLY)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == code
    assert _read(d, f"{ROOT}/a/f") == b"data"
    d.set_fault(None)
    _write(d, f"{ROOT}/a/new", b"ok", fsync=True)
    assert _read(d, f"{ROOT}/a/new") == b"ok"


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="absolute"):
        SimDisk("relative/root")
    with pytest.raises(ValueError, match="ENOSPC, EIO or EROFS"):
        SimDisk(ROOT).set_fault(errno.EPERM)
    d = _disk()
    with pytest.raises(FileNotFoundError):
        d.open("/elsewhere/f", W)
    with pytest.raises(OSError) as e:
        d.write(12345, b"x")
    assert e.value.errno == errno.EBADF


# ------------------------------------------------------------------ under the block files

def _files(disk: SimDisk, *, fsync: bool = True) -> BlockFiles:
    bf = BlockFiles(f"{ROOT}/data", fsync=fsync, fs=disk)
    bf.init_dirs([])
    return bf


def test_block_files_with_fsync_survive_any_crash() -> None:
    for seed in range(20):
        disk = SimDisk(ROOT)
        bf = _files(disk)
        blks = [hashed(os.urandom(3000 + i)) for i in range(8)]
        for b in blks:
            bf.write(b)
        bf.delete(blks[0].hash)
        assert disk.unsynced() == 0  # write and delete sync everything they change
        disk.crash(random.Random(seed))
        again = _files(disk)
        assert not again.exists(blks[0].hash)
        for b in blks[1:]:
            assert again.read(b.hash) == b


def test_block_files_without_fsync_may_lose_blocks_on_a_crash_never_return_bad_bytes() -> None:
    lost = 0
    for seed in range(20):
        disk = SimDisk(ROOT)
        _files(disk, fsync=True)  # the directory and its marker are durable
        bf = _files(disk, fsync=False)
        blks = [hashed(os.urandom(3000)) for _ in range(8)]
        for b in blks:
            bf.write(b)
        disk.crash(random.Random(seed))
        again = _files(disk)
        again.sweep_tmp()
        for b in blks:
            try:
                assert again.read(b.hash) == b
            except Exception as exc:  # noqa: BLE001 - gone, or torn (caught by the hash check)
                assert type(exc).__name__ in ("BlockNotFound", "BlockCorrupted")
                lost += 1
    assert lost > 0


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EIO])
def test_block_files_on_a_faulty_disk_raise_a_named_error_and_keep_reading(code: int) -> None:
    disk = SimDisk(ROOT)
    bf = _files(disk)
    old = hashed(os.urandom(5000))
    bf.write(old)
    disk.set_fault(code)
    with pytest.raises(StoreError) as e:
        bf.write(hashed(os.urandom(5000)))
    assert {errno.ENOSPC: "the disk is full", errno.EROFS: "read-only",
            errno.EIO: "Input/output error"}[code] in str(e.value)
    # A full or read-only disk is not a failed one (it still reads); an I/O error fails it.
    assert bf.dirs[0].in_service is (code != errno.EIO)
    if code != errno.EIO:
        assert bf.read(old.hash) == old
        disk.set_fault(None)
        new = hashed(os.urandom(5000))
        bf.write(new)  # the disk takes writes again: they work again, no restart
        assert bf.read(new.hash) == new


def test_a_power_cut_stops_the_disk_at_the_armed_change() -> None:
    for after in range(1, 6):
        d = _disk()
        cuts: list[int] = []
        d.arm_power_cut(after, lambda cuts=cuts: cuts.append(1))
        done = 0
        for i in range(5):  # each write of a file: open (create), write, fsync = 3 changes
            try:
                _write(d, f"{ROOT}/a/f{i}", b"x" * 10, fsync=True)
                done += 1
            except OSError as exc:
                assert exc.errno == errno.EIO
        assert cuts == [1] and d.cut
        assert done == (after - 1) // 3  # the writes wholly before the cut
        d.crash(random.Random(after))
        assert not d.cut
        _write(d, f"{ROOT}/a/after", b"y", fsync=True)  # the disk works after the restart
        assert _read(d, f"{ROOT}/a/after") == b"y"
    with pytest.raises(ValueError, match="after must be >= 1"):
        _disk().arm_power_cut(0, lambda: None)
