"""Block files read on their xxh3-128 checksum attribute instead of a second BLAKE2b
(issue 15): corruption still caught, a damaged attribute repaired, BLAKE2b when
there is none or the file system has none, the scrubber always hashes."""

from __future__ import annotations

import errno
import os

import pytest
import trio
from bg_helpers import FakeCluster
from storage_helpers import add_ref

from blocknode import block, fastpath
from blocknode.block import compress, hashed
from blocknode.errors import BlockCorrupted
from blocknode.fs import OsFileSystem
from blocknode.sim.disk import SimDisk
from blocknode.storage import BlockFiles, LocalBlocks, MetadataStore, checksum
from blocknode.workers.scrub import Scrub

NAME = checksum.XATTR_NAME


@pytest.fixture
def hashes(monkeypatch) -> list[int]:
    """Counts the BLAKE2b verifies of stored bytes (`fastpath.verify`, as `block` calls it)."""
    calls: list[int] = []
    real = fastpath.verify

    def counting(data, hash):  # noqa: ANN001, ANN202 - same signature as fastpath.verify
        calls.append(len(data))
        return real(data, hash)

    monkeypatch.setattr(fastpath, "verify", counting)
    return calls


def _blocks(tmp_path, **kw) -> LocalBlocks:
    meta = MetadataStore(str(tmp_path / "meta"), map_size=1 << 26, sync=False)
    return LocalBlocks(BlockFiles(str(tmp_path / "data"), fsync=False, **kw), meta, 4096)


def _flip(path: str, offset: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_digest_is_xxh3_128_of_any_buffer():
    data = os.urandom(5000)
    d = checksum.digest(data)
    assert len(d) == checksum.DIGEST_SIZE == 16
    assert checksum.digest(memoryview(data)) == d and checksum.digest(bytearray(data)) == d
    assert checksum.matches(data, d) and not checksum.matches(data[:-1], d)
    assert not checksum.matches(data, None) and not checksum.matches(data, d[:8])


async def test_written_file_carries_the_checksum_of_its_stored_bytes(tmp_path):
    b = _blocks(tmp_path)
    plain = hashed(os.urandom(50_000))
    packed = compress(hashed(b"abc" * 20_000), 3)
    assert packed.zst is not None
    for blk in (plain, packed):
        await b.write(blk)
        path = b.files.path(blk.hash)
        with open(path, "rb") as f:
            raw = f.read()
        assert raw == block.file_bytes(blk)  # the file format is unchanged
        assert os.getxattr(path, NAME) == checksum.digest(raw)
        assert not os.path.exists(path + ".tmp")


async def test_a_matching_checksum_skips_blake2b(tmp_path, hashes):
    b = _blocks(tmp_path)
    plain = hashed(os.urandom(50_000))
    packed = compress(hashed(b"xyz" * 20_000), 3)
    for blk in (plain, packed):
        await b.write(blk)
    hashes.clear()
    for blk in (plain, packed):
        got = await b.read(blk.hash)
        assert got == blk and got.hash == blk.hash and got.zst == blk.zst
    assert hashes == []
    assert b.files.checksum_stats == {"fast": 2, "hashed": 0, "repaired": 0}


async def test_corrupt_file_with_its_attribute_kept_is_quarantined(tmp_path, hashes):
    b = _blocks(tmp_path)
    blk = hashed(os.urandom(50_000))
    await b.write(blk)
    path = b.files.path(blk.hash)
    recorded = os.getxattr(path, NAME)
    _flip(path)
    assert os.getxattr(path, NAME) == recorded  # the attribute survives the damage
    hashes.clear()
    with pytest.raises(BlockCorrupted):
        await b.read(blk.hash)
    assert hashes  # the mismatch went to BLAKE2b, which refused it
    assert os.path.exists(path + ".corrupted") and not os.path.exists(path)
    assert os.getxattr(path + ".corrupted", NAME) == recorded  # not "repaired" to the bad bytes
    assert b.files.checksum_stats["repaired"] == 0


async def test_corrupt_compressed_frame_matching_its_attribute_is_corruption(tmp_path):
    # The checksum covers the stored (zstd) bytes; a frame that does not decompress is
    # corruption even when an attribute matches it.
    b = _blocks(tmp_path)
    blk = compress(hashed(b"q" * 40_000), 3)
    await b.write(blk)
    path = b.files.path(blk.hash)
    assert path.endswith(".zst")
    garbage = b"\x28\xb5\x2f\xfd" + os.urandom(200)
    with open(path, "wb") as f:
        f.write(garbage)
    os.setxattr(path, NAME, checksum.digest(garbage))
    with pytest.raises(BlockCorrupted):
        await b.read(blk.hash)
    assert os.path.exists(path + ".corrupted")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "removed"])
async def test_good_file_with_damaged_or_missing_attribute_is_served_and_repaired(
        tmp_path, hashes, damage):
    b = _blocks(tmp_path)
    blk = hashed(os.urandom(50_000))
    await b.write(blk)
    path = b.files.path(blk.hash)
    good = os.getxattr(path, NAME)
    if damage == "garbage":
        os.setxattr(path, NAME, bytes(16))
    elif damage == "truncated":
        os.setxattr(path, NAME, good[:5])
    else:  # a file written before checksums existed
        os.removexattr(path, NAME)
    hashes.clear()
    assert await b.read(blk.hash) == blk
    assert hashes == [len(blk)]  # verified by BLAKE2b
    assert os.path.exists(path) and not os.path.exists(path + ".corrupted")
    assert os.getxattr(path, NAME) == good  # (re)written
    assert b.files.checksum_stats == {"fast": 0, "hashed": 1, "repaired": 1}
    hashes.clear()
    assert await b.read(blk.hash) == blk
    assert hashes == []  # the next read is on the checksum again


async def test_read_only_directory_is_verified_but_never_written(tmp_path, hashes):
    from blocknode.config import DataDir

    files = BlockFiles(str(tmp_path / "d"), fsync=False)
    blk = hashed(os.urandom(20_000))
    files.write(blk)
    path = files.path(blk.hash)
    os.removexattr(path, NAME)
    ro = BlockFiles([DataDir(str(tmp_path / "d"), read_only=True)], fsync=False)
    hashes.clear()
    assert ro.read(blk.hash) == blk and hashes == [len(blk)]
    with pytest.raises(OSError) as e:
        os.getxattr(path, NAME)
    assert e.value.errno == errno.ENODATA


async def test_thorough_reads_always_hash_and_write_nothing(tmp_path, hashes):
    b = _blocks(tmp_path)
    blk = hashed(os.urandom(50_000))
    await b.write(blk)
    path = b.files.path(blk.hash)
    os.removexattr(path, NAME)
    hashes.clear()
    with checksum.thorough_reads():
        assert checksum.is_thorough()
        assert await b.read(blk.hash) == blk  # through a worker thread
    assert not checksum.is_thorough()
    assert hashes == [len(blk)]
    with pytest.raises(OSError):
        os.getxattr(path, NAME)  # a thorough read leaves the disk as it is
    os.setxattr(path, NAME, checksum.digest(blk))
    hashes.clear()
    assert b.files.read(blk.hash, thorough=True) == blk and hashes == [len(blk)]


async def test_scrub_hashes_and_catches_what_the_checksum_cannot(tmp_path, hashes):
    # Damage that rewrote the attribute to match the damaged bytes: only BLAKE2b sees it.
    c = FakeCluster(str(tmp_path), n=1, rf=1)
    try:
        with trio.fail_after(10):
            n1 = c["n1"]
            blks = [hashed(os.urandom(20_000)) for _ in range(3)]
            for blk in blks:
                await n1.blocks.write(blk)
                await add_ref(n1.meta, blk.hash, "r")
            victim = blks[1].hash
            path = n1.files.path(victim)
            _flip(path)
            with open(path, "rb") as f:
                os.setxattr(path, NAME, checksum.digest(f.read()))
            hashes.clear()
            s = Scrub(n1.manager, n1.ctx, tranquility=0)
            await s.start()
            await s.run_to_completion()
            # every block hashed; the corrupt one twice (the read, then again under its lock)
            assert hashes == [20_000] * 4
            st = s.status()
            assert st["blocks_checked"] == 3 and st["corruptions"] == 1
            assert os.path.exists(path + ".corrupted")
    finally:
        c.close()


class _CountingFs(OsFileSystem):
    """The OS file system, without extended attributes (ENOTSUP, like old tmpfs)."""

    def __init__(self) -> None:
        self.xattr_calls = 0

    def setxattr(self, target: int | str, name: str, value: bytes) -> None:
        self.xattr_calls += 1
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    def getxattr(self, path: str, name: str) -> bytes:
        self.xattr_calls += 1
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


async def test_file_system_without_xattrs_reads_with_blake2b_and_stops_asking(tmp_path, hashes):
    fs = _CountingFs()
    files = BlockFiles(str(tmp_path / "d"), fsync=True, fs=fs)
    blks = [hashed(os.urandom(20_000)) for _ in range(3)]
    for blk in blks:
        files.write(blk)
    assert fs.xattr_calls == 1 and not files.dirs[0].xattrs  # asked once, then no more
    hashes.clear()
    for blk in blks:
        assert files.read(blk.hash) == blk
    assert hashes == [20_000] * 3 and fs.xattr_calls == 1
    _flip(files.path(blks[0].hash))
    with pytest.raises(BlockCorrupted):
        files.read_or_quarantine(blks[0].hash)


async def test_sim_disk_keeps_checksums_and_catches_a_flipped_bit(hashes):
    root = "/sim/n1"
    disk = SimDisk(root)
    files = BlockFiles(root + "/data", fsync=True, fs=disk)
    blk = hashed(os.urandom(30_000))
    files.write(blk)
    path = files.path(blk.hash)
    assert disk.getxattr(path, NAME) == checksum.digest(blk)
    disk.fsync_dir(root)  # (a node's data directory is made durable at its start)
    assert disk.unsynced() == 0  # the file's fsync covered its attribute
    hashes.clear()
    assert files.read(blk.hash) == blk and hashes == []
    disk.flip_bit(path, 7, 3)
    with pytest.raises(BlockCorrupted):
        files.read_or_quarantine(blk.hash)
    assert hashes == [len(blk)] and disk.exists(path + ".corrupted")


async def test_sim_disk_without_xattrs_answers_enotsup(hashes):
    disk = SimDisk("/sim/n2", xattrs=False)
    files = BlockFiles("/sim/n2/data", fsync=True, fs=disk)
    blk = hashed(os.urandom(30_000))
    files.write(blk)
    with pytest.raises(OSError) as e:
        disk.getxattr(files.path(blk.hash), NAME)
    assert e.value.errno == errno.ENOTSUP and not files.dirs[0].xattrs
    hashes.clear()
    assert files.read(blk.hash) == blk and hashes == [len(blk)]


def test_sim_disk_crash_drops_an_unsynced_attribute_only():
    import random

    disk = SimDisk("/sim/n3")
    disk.makedirs("/sim/n3/d", exist_ok=True)
    fds = []
    for name in ("f", "g"):
        fd = disk.open(f"/sim/n3/d/{name}", os.O_WRONLY | os.O_CREAT, 0o600)
        disk.write(fd, b"data")
        fds.append(fd)
    disk.setxattr(fds[0], NAME, b"s" * 16)
    for fd in fds:
        disk.fsync(fd)  # f's attribute is durable with its data
    disk.fsync_dir("/sim/n3/d")
    disk.fsync_dir("/sim/n3")
    disk.setxattr("/sim/n3/d/g", NAME, b"v" * 16)  # after the fsync: not durable
    assert disk.unsynced() == 1
    rep = disk.crash(random.Random(7))
    assert rep.xattrs_dropped == 1 and rep.lost == 0 and disk.unsynced() == 0
    assert disk.getxattr("/sim/n3/d/f", NAME) == b"s" * 16
    with pytest.raises(OSError) as e:
        disk.getxattr("/sim/n3/d/g", NAME)
    assert e.value.errno == errno.ENODATA
    with disk.open_read("/sim/n3/d/g") as f:
        assert f.read() == b"data"  # the data was synced: kept


def test_sim_disk_attribute_writes_fail_under_faults_but_do_not_trigger_a_cut():
    disk = SimDisk("/sim/n4")
    disk.makedirs("/sim/n4/d", exist_ok=True)
    fd = disk.open("/sim/n4/d/f", os.O_WRONLY | os.O_CREAT, 0o600)
    cuts: list[int] = []
    disk.arm_power_cut(1, lambda: cuts.append(1))
    disk.setxattr(fd, NAME, b"a" * 16)  # not counted: the armed cut waits for a data change
    assert not disk.cut and cuts == []
    with pytest.raises(OSError):
        disk.write(fd, b"x")  # this change is the cut
    assert disk.cut and cuts == [1]
    with pytest.raises(OSError) as e:
        disk.setxattr(fd, NAME, b"b" * 16)
    assert e.value.errno == errno.EIO
    disk2 = SimDisk("/sim/n5")
    disk2.makedirs("/sim/n5/d", exist_ok=True)
    fd2 = disk2.open("/sim/n5/d/f", os.O_WRONLY | os.O_CREAT, 0o600)
    disk2.set_fault(errno.EROFS)
    with pytest.raises(OSError) as e:
        disk2.setxattr(fd2, NAME, b"c" * 16)
    assert e.value.errno == errno.EROFS

