"""Several data directories (issue 14): config, placement by capacity, rebalance,
markers, and a directory that fails."""

from __future__ import annotations

import errno
import os
from collections import Counter
from pathlib import Path

import pytest
import trio

from blocknode import fastpath
from blocknode.block import hashed
from blocknode.config import DataDir, load_config
from blocknode.errors import BlockNotFound, ConfigError
from blocknode.storage import BlockFiles, LocalBlocks, MetadataStore, RefEntry
from blocknode.storage.block_files import MARKER_NAME, PARTITION_BYTES, Written
from blocknode.storage.local_blocks import DATA_DIRS_KEY
from blocknode.workers.rebalance import Rebalance

# ------------------------------------------------------------------ config


def test_capacities_take_garage_size_strings(tmp_path):
    p = tmp_path / "node.toml"
    p.write_text('data_dir = [{ path = "a", capacity = "2T" }, { path = "b", capacity = "4TiB" }, '
                 '{ path = "c", capacity = "256M" }, { path = "d", capacity = 1000 }]\n')
    assert [d.capacity for d in load_config(p).data_dirs] == [2 * 10**12, 4 * 2**40, 256 * 10**6, 1000]


def test_data_dir_forms(tmp_path):
    p = tmp_path / "node.toml"
    p.write_text('data_dir = [{ path = "/mnt/hdd1", capacity = "2T" }, '
                 '{ path = "hdd2", capacity = "4T" }, { path = "/mnt/old", read_only = true }]\n'
                 'compression_level = "none"\n')
    cfg = load_config(p)
    assert cfg.data_dirs == (DataDir("/mnt/hdd1", 2 * 10**12), DataDir(str(tmp_path / "hdd2"), 4 * 10**12),
                             DataDir("/mnt/old", None, True))
    assert cfg.compression_level is None
    p.write_text('data_dir = "d"\ncompression_level = 7\n')
    cfg = load_config(p)
    assert cfg.data_dirs == (DataDir(str(tmp_path / "d")),) and cfg.compression_level == 7
    assert load_config(None).compression_level == 1


@pytest.mark.parametrize("value, message", [
    ('[{ path = "a" }]', "capacity"),
    ('[{ path = "a", capacity = "2X" }]', "capacity"),
    ('[{ path = "a", capacity = true }]', "capacity"),
    ('[{ path = "a", capacity = 0 }]', "capacity"),
    ('[{ path = "a", capacity = "1T", read_only = "yes" }]', "read_only"),
    ('[{ path = "a", capacity = "1T", size = 3 }]', "unknown field 'size'"),
    ('[{ capacity = "1T" }]', "path"),
    ('[{ path = "a", capacity = "1T" }, { path = "./a", capacity = "1T" }]', "twice"),
    ('[{ path = "a", read_only = true }]', "writable"),
    ('["a"]', "entry 0"),
    ("[]", "data_dir"),
    ("3", "data_dir"),
])
def test_bad_data_dirs_name_the_field(tmp_path, value, message):
    p = tmp_path / "node.toml"
    p.write_text(f"data_dir = {value}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(p)


@pytest.mark.parametrize("value", ['"fast"', "23", "true", "1.5"])
def test_bad_compression_level(tmp_path, value):
    p = tmp_path / "node.toml"
    p.write_text(f"compression_level = {value}\n")
    with pytest.raises(ConfigError, match="compression_level"):
        load_config(p)


# ------------------------------------------------------------------ helpers


def dirs(tmp_path: Path, *caps: int | None, read_only: tuple[int, ...] = ()) -> list[DataDir]:
    return [DataDir(str(tmp_path / f"d{i}"), cap, i in read_only) for i, cap in enumerate(caps)]


def local(tmp_path: Path, specs: list[DataDir], *, meta: MetadataStore | None = None) -> LocalBlocks:
    meta = meta or MetadataStore(str(tmp_path / "meta"), map_size=1 << 27, sync=False)
    b = LocalBlocks(BlockFiles(specs, fsync=False), meta, 0)
    b.startup()
    return b


def held(files: BlockFiles) -> Counter[str]:
    return Counter({d.path: sum(1 for _ in files.walk_dir(d)) for d in files.in_service()})


# ------------------------------------------------------------------ placement


def test_blocks_spread_by_capacity_1_2_1(tmp_path):
    files = BlockFiles(dirs(tmp_path, 10**12, 2 * 10**12, 10**12), fsync=False)
    files.init_dirs([])
    # every partition: within ±3 % of the shares (a binomial spread: 2 % was 3 sigma, and failed once)
    n = 2 ** (8 * PARTITION_BYTES)
    per = Counter(files.primary(p.to_bytes(PARTITION_BYTES, "big") + b"\0" * 30).index
                  for p in range(n))
    for i, share in enumerate((0.25, 0.5, 0.25)):
        assert abs(per[i] / n - share) < 0.03 * share, per
    # real blocks: within ±10 %
    count = 4000
    for _ in range(count):
        files.write(hashed(os.urandom(64)))
    got = [d.blocks for d in files.dirs]
    assert sum(got) == count and held(files) == {d.path: d.blocks for d in files.dirs}
    for g, share in zip(got, (0.25, 0.5, 0.25), strict=True):
        assert abs(g - share * count) <= 0.1 * share * count, got


def test_placement_is_stable_and_adding_a_dir_moves_only_its_share(tmp_path):
    two = BlockFiles(dirs(tmp_path, 100, 100), fsync=False)
    three = BlockFiles(dirs(tmp_path, 100, 100, 100), fsync=False)
    again = BlockFiles(dirs(tmp_path, 100, 100), fsync=False)
    hs = [fastpath.block_hash(os.urandom(8)) for _ in range(3000)]
    moved = 0
    for h in hs:
        assert two.primary(h).index == again.primary(h).index
        if three.primary(h).index != two.primary(h).index:
            assert three.primary(h).index == 2  # only to the new directory
            moved += 1
    assert abs(moved / len(hs) - 1 / 3) < 0.05


def test_a_full_disk_spills_to_the_next_dir(tmp_path, monkeypatch):
    files = BlockFiles(dirs(tmp_path, 100, 100), fsync=False)
    files.init_dirs([])
    full = files.dirs[0].path
    real_open = os.open

    def enospc(path, *a, **kw):
        if str(path).startswith(full + "/") and str(path).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", enospc)
    blk = next(b for b in (hashed(os.urandom(100)) for _ in range(100))
               if files.primary(b.hash).path == full)
    assert files.write(blk) is Written.STORED
    assert files.read(blk.hash) == blk and files.copies(blk.hash)[0].dir.index == 1
    assert files.dirs[0].in_service and files.dirs[0].errors == 1  # full, not failed


# ------------------------------------------------------------------ rebalance


async def test_changing_the_dirs_and_rebalancing_moves_blocks_while_reads_keep_working(tmp_path):
    b = local(tmp_path, dirs(tmp_path, 100, 100))
    blks = [hashed(os.urandom(2000)) for _ in range(300)]
    for blk in blks:
        await b.write(blk, ref=RefEntry(blk.hash, "r", False, 1))
    before = held(b.files)
    assert sum(before.values()) == 300
    meta = b.meta
    # d0 keeps its capacity, d1 becomes read-only (to empty), d2 is new and large
    new = dirs(tmp_path, 100, None, 200, read_only=(1,))
    b = local(tmp_path, new, meta=meta)
    assert b.count() == 300
    for blk in blks:  # readable where they are
        assert await b.read(blk.hash) == blk
    misplaced = sum(1 for blk in blks
                    if b.files.copies(blk.hash)[0].dir is not b.files.primary(blk.hash))
    rb = Rebalance(b, tranquility=0, batch=16)
    reads = 0

    async def reader(stop: trio.Event) -> None:
        nonlocal reads
        while not stop.is_set():
            for blk in blks:
                assert await b.read(blk.hash) == blk
                reads += 1
                if stop.is_set():
                    return
            await trio.sleep(0)

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, stop)
        await rb.start()
        st = await rb.run_to_completion()
        stop.set()
    assert reads > 300
    assert st["state"] == "idle" and st["errors"] == 0 and st["progress"] == 1.0
    after = held(b.files)
    assert after[str(tmp_path / "d1")] == 0  # the read-only dir was emptied
    assert sum(after.values()) == 300 and b.count() == 300
    assert st["moved"] == misplaced > 100
    for blk in blks:
        (c,) = b.files.copies(blk.hash)
        assert c.dir is b.files.primary(blk.hash)
        assert await b.read(blk.hash) == blk
    assert abs(after[str(tmp_path / "d2")] / 300 - 2 / 3) < 0.1
    st = await rb.start()  # a second run moves nothing
    assert (await rb.run_to_completion())["moved"] == 0


async def test_rebalance_survives_a_restart_and_a_duplicate_copy(tmp_path):
    b = local(tmp_path, dirs(tmp_path, 100))
    blks = [hashed(os.urandom(1000)) for _ in range(50)]
    for blk in blks:
        await b.write(blk)
    meta = b.meta
    b = local(tmp_path, dirs(tmp_path, 100, 100), meta=meta)
    # a duplicate: a block copied into its primary already (a move interrupted by a crash)
    dup = next(blk for blk in blks if b.files.primary(blk.hash).index == 1)
    b.files._write_file(b.files.dirs[1], dup.hash, bytes(dup), False)
    rb = Rebalance(b, tranquility=0, batch=8)
    await rb.start()
    await rb.step()
    assert rb.status()["state"] == "running" and rb.status()["scanned"] == 8
    rb2 = Rebalance(b, tranquility=0, batch=8)  # a restart: the saved state carries on
    assert rb2.status()["state"] == "running" and rb2.status()["scanned"] == 8
    await rb2.run_to_completion()
    for blk in blks:
        assert [c.dir.index for c in b.files.copies(blk.hash)] == [b.files.primary(blk.hash).index]
        assert await b.read(blk.hash) == blk


async def test_rebalance_admin_rpc_and_worker_task(tmp_path):
    b = local(tmp_path, dirs(tmp_path, 100))
    for _ in range(20):
        await b.write(hashed(os.urandom(500)))
    b = local(tmp_path, dirs(tmp_path, 100, 300), meta=b.meta)
    rb = Rebalance(b, tranquility=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rb.run)
        st, _ = await rb.handle_admin("cli", {"action": "start"}, None)
        assert st["state"] == "running"
        with trio.fail_after(10):
            while rb.status()["state"] == "running":
                await trio.sleep(0.01)
        st, _ = await rb.handle_admin("cli", {"action": "status"}, None)
        assert st["state"] == "idle" and st["moved"] > 0 and st["scanned"] >= 20  # moved ones twice
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ markers, failures


async def test_a_missing_marker_is_detected_at_start(tmp_path):
    specs = dirs(tmp_path, 100, 100)
    b = local(tmp_path, specs)
    assert all((Path(d.path) / MARKER_NAME).is_file() for d in specs)
    assert sorted(b.meta.state_get(DATA_DIRS_KEY)) == sorted(d.path for d in specs)
    blks = [hashed(os.urandom(1000)) for _ in range(40)]
    for blk in blks:
        await b.write(blk, ref=RefEntry(blk.hash, "r", False, 1))
    d1 = Path(specs[1].path)
    on_d1 = {blk.hash for blk in blks if b.files.primary(blk.hash).path == str(d1)}
    assert on_d1
    # "unmount" d1: the mount point stays, empty
    os.rename(d1, tmp_path / "unplugged")
    d1.mkdir()
    b = local(tmp_path, specs, meta=b.meta)
    st = {d["path"]: d for d in b.files.dir_status()}
    assert st[str(d1)]["state"] == "failed" and MARKER_NAME in st[str(d1)]["failure"]
    assert st[specs[0].path]["state"] == "ok" and st[specs[0].path]["free"] > 0
    assert not (d1 / MARKER_NAME).exists()  # not re-initialised: it may get mounted again
    assert b.files.refetch_pending == [str(d1)]
    for blk in blks:  # the others still read; the lost ones are not found
        if blk.hash in on_d1:
            with pytest.raises(BlockNotFound):
                await b.read(blk.hash)
        else:
            assert await b.read(blk.hash) == blk
    new = hashed(os.urandom(1000))
    await b.write(new)  # writes go to the directory in service
    assert b.files.copies(new.hash)[0].dir.path == specs[0].path
    rb = Rebalance(b)
    assert await rb.refetch() == len(on_d1)
    queued = {h for _, h in b.meta.resync_due(now_ms=2**62, limit=1000)}
    assert on_d1 <= queued
    assert b.files.refetch_pending == []
    assert await rb.refetch() == 0


async def test_a_gone_dir_is_made_again_and_a_dropped_one_refetched(tmp_path):
    specs = dirs(tmp_path, 100, 100)
    b = local(tmp_path, specs)
    os.rename(specs[1].path, tmp_path / "lost")  # gone entirely (not a mount point)
    b = local(tmp_path, specs, meta=b.meta)
    assert all(d.in_service for d in b.files.dirs)
    assert (Path(specs[1].path) / MARKER_NAME).is_file()
    assert b.files.refetch_pending == [specs[1].path]
    b = local(tmp_path, specs[:1], meta=b.meta)  # d1 removed from the config
    assert b.files.refetch_pending == [specs[1].path]
    assert b.meta.state_get(DATA_DIRS_KEY) == [specs[0].path]


async def test_an_io_error_takes_a_dir_out_of_service_and_the_node_goes_on(tmp_path, monkeypatch):
    specs = dirs(tmp_path, 100, 100)
    b = local(tmp_path, specs)
    failed: list[str] = []
    b.files.on_failure = failed.append
    bad = specs[1].path
    real_open = os.open

    def eio(path, *a, **kw):
        if str(path).startswith(bad + "/"):
            raise OSError(errno.EIO, "Input/output error", path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", eio)
    blks = [hashed(os.urandom(1000)) for _ in range(30)]
    for blk in blks:
        assert await b.write(blk)  # every write succeeds, on d0 once d1 failed
    assert failed == [bad] and b.files.refetch_pending == [bad]
    st = {d["path"]: d for d in b.files.dir_status()}
    assert st[bad]["state"] == "failed" and "I/O error" in st[bad]["failure"]
    assert st[bad]["errors"] == 1 and st[specs[0].path]["blocks"] == 30
    for blk in blks:
        assert await b.read(blk.hash) == blk


async def test_a_disk_unmounted_while_running_is_not_written_into(tmp_path):
    specs = dirs(tmp_path, 100, 100)
    b = local(tmp_path, specs)
    d1 = Path(specs[1].path)
    os.rename(d1, tmp_path / "unplugged")  # the disk goes away; the mount point stays
    d1.mkdir()
    blks = [hashed(os.urandom(1000)) for _ in range(20)]
    for blk in blks:
        await b.write(blk)
    assert not list(d1.iterdir())  # nothing landed on the mount point
    assert not b.files.dirs[1].in_service and b.files.refetch_pending == [str(d1)]
    for blk in blks:
        assert await b.read(blk.hash) == blk
