"""zstd compression (issue 14): the forms a block is stored and sent in, and their checks."""

from __future__ import annotations

import os
import tracemalloc

import pytest
import zstandard
from bg_helpers import FakeCluster

from blocknode import block, fastpath
from blocknode.context import NodeContext, run_in_thread
from blocknode.errors import BlockCorrupted, HashMismatch, RemoteError
from blocknode.storage.block_files import ZST_SUFFIX
from blocknode.workers.scrub import Scrub

MiB = 1024 * 1024


def text(n: int, seed: int = 0) -> bytes:
    """Compressible data: English-like lines (compresses ~4x at level 1)."""
    words = [b"block", b"node", b"store", b"garage", b"replica", b"quorum", b"hash", b"zstd"]
    out = bytearray()
    i = seed
    while len(out) < n:
        out += b" ".join(words[(i * k) % len(words)] for k in range(1, 9)) + b" %d\n" % i
        i += 1
    return bytes(out[:n])


def forms(node, h: bytes) -> set[str]:
    """Where and how `node` holds `h`: "file", "file.zst", "inline", "inline.zst"."""
    out = set()
    path = fastpath.block_path(node.files.data_dir, h)
    if os.path.exists(path):
        out.add("file")
    if os.path.exists(path + ZST_SUFFIX):
        out.add("file.zst")
    found = node.meta.inline.get_form(h)
    if found is not None:
        out.add("inline.zst" if found[1] else "inline")
    return out


# ------------------------------------------------------------------ block.py


@pytest.mark.parametrize("level", [None, -5, 1, 3, 19])
def test_compress_decides_the_form_once_and_the_stored_form_reads_back(level):
    for data in (text(300_000), os.urandom(300_000), text(2000), b""):
        blk = block.compress(block.hashed(data), level)
        form, z = block.stored_form(blk)
        expect_z = level is not None and data[:1] not in (b"",) and data == text(len(data))
        assert z is expect_z, (level, len(data))
        assert (len(form) < 0.9 * len(data)) if z else form == data
        back = block.from_stored(form, blk.hash, compressed=z)
        assert back == data and back.hash == blk.hash and back.zst == (form if z else None)


def test_a_corrupt_frame_is_block_corrupted():
    blk = block.compress(block.hashed(text(100_000)), 1)
    bad = bytearray(blk.zst)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(BlockCorrupted):
        block.from_stored(bytes(bad), blk.hash, compressed=True)
    with pytest.raises(BlockCorrupted):  # a valid frame of other bytes
        block.from_stored(zstandard.ZstdCompressor().compress(b"other"), blk.hash, compressed=True)
    with pytest.raises(BlockCorrupted):  # trailing bytes after the frame
        block.from_stored(blk.zst + b"x", blk.hash, compressed=True)


@pytest.mark.parametrize("declared", [True, False])
def test_a_decompression_bomb_is_refused_without_allocating_it(declared):
    # 1 GiB of zeros in ~40 KiB: it must be refused past block_size (1 MiB), whether the
    # frame declares its size (refused before decompressing) or not (output limit).
    c = zstandard.ZstdCompressor(level=19, write_content_size=declared)
    chunk = b"\0" * (64 * MiB)
    bomb = c.compress(chunk) if declared else b"".join([c.compress(chunk)])
    if not declared:
        assert zstandard.frame_content_size(bomb) == -1
    h = fastpath.block_hash(b"whatever")
    tracemalloc.start()
    try:
        with pytest.raises(HashMismatch, match="refused"):
            block.verify_compressed(bomb, h, block_size=MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, peak


async def test_accept_takes_a_frame_handed_over_in_process_and_verifies_one_from_the_wire():
    blk = block.compress(block.hashed(text(200_000)), 3)
    form, z = block.wire_form(blk)
    assert z and isinstance(form, block.CompressedForm) and form == blk.zst
    assert await block.accept(form, blk.hash, block_size=MiB, run_sync=run_in_thread,
                              compressed=True) is blk
    got = await block.accept(bytes(form), blk.hash, block_size=MiB, run_sync=run_in_thread,
                             compressed=True)
    assert got == blk and got.zst == blk.zst
    with pytest.raises(HashMismatch):
        await block.accept(bytes(form), fastpath.block_hash(b"x"), block_size=MiB,
                           run_sync=run_in_thread, compressed=True)
    with pytest.raises(HashMismatch):  # decompresses past this block_size
        await block.accept(bytes(form), blk.hash, block_size=100_000, run_sync=run_in_thread,
                           compressed=True)


async def test_a_batch_carries_each_blocks_form():
    blks = [block.compress(block.hashed(d), 1) for d in (text(5000), os.urandom(5000), b"tiny")]
    payload = block.join(blks)
    flags = [z for _, _, z in payload.items]
    assert flags == [True, False, False]  # 4 bytes do not save 10 %
    chunks, off = [], 0
    for h, n, _ in payload.items:
        chunks.append((h, bytes(payload[off:off + n])))
        off += n
    assert off == len(payload)
    got = await block.accept_batch(payload, chunks, block_size=MiB, run_sync=run_in_thread,
                                   compressed=flags)
    assert got == blks and all(a is b for a, b in zip(got, blks, strict=True))
    got = await block.accept_batch(bytes(payload), chunks, block_size=MiB,
                                   run_sync=run_in_thread, compressed=flags)
    assert [bytes(g) for g in got] == [bytes(b) for b in blks] and got[0].zst == blks[0].zst
    with pytest.raises(HashMismatch):  # the flags say plain: the frame does not hash
        await block.accept_batch(bytes(payload), chunks, block_size=MiB,
                                 run_sync=run_in_thread, compressed=None)


# ------------------------------------------------------------------ a node


@pytest.mark.parametrize("level", [None, 1, 3, 19])
async def test_round_trip_at_each_level(tmp_path, level):
    c = FakeCluster(str(tmp_path), n=1, rf=1, inline_threshold=4096)
    try:
        n1 = c["n1"]
        n1.manager.compression_level = level
        datas = {"file text": text(300_000), "file random": os.urandom(300_000),
                 "inline text": text(3000), "inline random": os.urandom(3000),
                 "empty": b""}
        hashes = {k: await n1.manager.put(d, "r") for k, d in datas.items()}
        for k, h in hashes.items():
            assert h == fastpath.block_hash(datas[k])  # named by the plaintext at any level
            got = await n1.manager.get(h)
            assert got == datas[k]
        z = level is not None
        assert forms(n1, hashes["file text"]) == {"file.zst" if z else "file"}
        assert forms(n1, hashes["inline text"]) == {"inline.zst" if z else "inline"}
        assert forms(n1, hashes["file random"]) == {"file"}  # saves nothing: plain
        assert forms(n1, hashes["inline random"]) == {"inline"}
        if z:
            size = os.path.getsize(fastpath.block_path(n1.files.data_dir, hashes["file text"])
                                   + ZST_SUFFIX)
            assert size < 300_000 / 3
        # a batch (put_many) stores the same forms
        more = [(text(2000, seed=7), "r"), (os.urandom(9000), "r"), (text(9000, 3), "r")]
        hs = await n1.manager.put_many(more)
        for (d, _), h in zip(more, hs, strict=True):
            assert await n1.manager.get(h) == d
        assert forms(n1, hs[0]) == {"inline.zst" if z else "inline"}
        assert forms(n1, hs[2]) == {"file.zst" if z else "file"}
    finally:
        c.close()


async def test_a_store_with_mixed_forms_reads_scrubs_and_keeps_its_copies(tmp_path):
    c = FakeCluster(str(tmp_path), n=1, rf=1, inline_threshold=4096)
    try:
        n1 = c["n1"]
        datas: dict[bytes, bytes] = {}
        for level in (None, 1, 19, None, 3):  # the level changes between writes
            n1.manager.compression_level = level
            for d in (text(100_000, seed=level or 0), text(2500, seed=(level or 0) + 100),
                      os.urandom(20_000)):
                datas[await n1.manager.put(d, "r")] = d
        seen = {f for h in datas for f in forms(n1, h)}
        assert seen == {"file", "file.zst", "inline", "inline.zst"}
        # a re-put at another level finds the intact copy in its old form and keeps it
        h = next(h for h in datas if forms(n1, h) == {"file"} and datas[h][:5] == b"block")
        path = fastpath.block_path(n1.files.data_dir, h)
        mtime = os.stat(path).st_mtime_ns
        n1.manager.compression_level = 19
        assert await n1.manager.put(datas[h], "r2") == h
        assert forms(n1, h) == {"file"} and os.stat(path).st_mtime_ns == mtime
        hz = next(h for h in datas if forms(n1, h) == {"inline.zst"})
        n1.manager.compression_level = None
        await n1.manager.put(datas[hz], "r2")
        assert forms(n1, hz) == {"inline.zst"}
        for h, d in datas.items():
            assert await n1.manager.get(h) == d
        assert n1.blocks.count() == len(datas) and sorted(n1.blocks.walk()) == sorted(datas)
        scrub = Scrub(n1.manager, NodeContext(), tranquility=0)
        await scrub.start()
        await scrub.run_to_completion()
        assert scrub.status()["blocks_checked"] == len(datas)
        assert scrub.status()["corruptions"] == 0
    finally:
        c.close()


async def test_plain_values_written_before_compression_existed_still_read(tmp_path):
    c = FakeCluster(str(tmp_path), n=1, rf=1, inline_threshold=4096)
    try:
        n1 = c["n1"]
        small, large = block.hashed(text(1000)), block.hashed(text(50_000))
        # the old formats: the plain bytes in `blocks`, a plain file named by the hash
        n1.meta.env.write_now(lambda txn: n1.meta.inline.tx_put(txn, small.hash, bytes(small)))
        n1.files.write(large)
        n1.manager.compression_level = 3
        assert await n1.blocks.read(small.hash) == small
        assert await n1.blocks.read(large.hash) == large
        assert forms(n1, small.hash) == {"inline"} and forms(n1, large.hash) == {"file"}
    finally:
        c.close()


async def test_replicas_get_the_frame_and_compression_happens_once(tmp_path, monkeypatch):
    c = FakeCluster(str(tmp_path), n=3, rf=3, inline_threshold=4096)
    calls = []
    real = block.compress

    def counting(blk, level):
        calls.append(level)
        return real(blk, level)

    monkeypatch.setattr(block, "compress", counting)
    try:
        for n in c.nodes.values():
            n.manager.compression_level = 1
        data = text(200_000)
        h = await c["n1"].manager.put(data, "r")
        assert calls == [1]
        for n in c.nodes.values():
            assert forms(n, h) == {"file.zst"}
        # get_block: the frame when asked for it, the plain bytes otherwise (old peers, probes)
        reply, raw = await c["n2"].handlers["get_block"]("n1", {"hash": h, "z": True}, None)
        assert reply == {"z": True} and zstandard.ZstdDecompressor().decompress(raw) == data
        reply, raw = await c["n2"].handlers["get_block"]("n1", {"hash": h}, None)
        assert reply == {} and raw == data
        # a resync fetch stores the frame it receives, without compressing it again
        c["n3"].files.delete(h)
        await c["n3"].manager.blocks.write(await c["n3"].manager.get(h, nodes=["n1"]))
        assert forms(c["n3"], h) == {"file.zst"} and calls == [1]
    finally:
        c.close()


async def test_a_bomb_or_a_lying_frame_from_a_peer_is_refused(tmp_path):
    c = FakeCluster(str(tmp_path), n=2, rf=2, inline_threshold=4096)
    try:
        n2 = c["n2"]
        bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (16 * MiB))
        h = fastpath.block_hash(b"\0" * (16 * MiB))
        for fields in ({"hash": h, "ref_id": "r", "ts": 1, "z": True},
                       {"hash": h, "z": True}):
            with pytest.raises(RemoteError, match="refused"):
                await c["n1"].net.call("n2", "put_block", fields, bomb, timeout=5)
        # a frame of other bytes, and a frame flagged plain: the hash does not match
        other = zstandard.ZstdCompressor().compress(text(5000))
        with pytest.raises(RemoteError, match="HashMismatch|does not hash"):
            await c["n1"].net.call("n2", "put_block", {"hash": fastpath.block_hash(text(4000)),
                                                       "z": True}, other, timeout=5)
        with pytest.raises(RemoteError):
            await c["n1"].net.call("n2", "put_block", {"hash": fastpath.block_hash(text(5000))},
                                   other, timeout=5)
        with pytest.raises(RemoteError, match="booleans"):
            await c["n1"].net.call("n2", "put_blocks", {
                "items": [[fastpath.block_hash(text(5000)), "r", 1, len(other)]],
                "z": [True, False]}, other, timeout=5)
        assert n2.blocks.count() == 0
    finally:
        c.close()


async def test_a_peer_answering_get_with_a_bomb_is_skipped(tmp_path):
    c = FakeCluster(str(tmp_path), n=3, rf=3, inline_threshold=0)
    try:
        data = text(100_000)
        for n in c.nodes.values():
            n.manager.compression_level = 1
        h = await c["n1"].manager.put(data, "r")
        bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (16 * MiB))

        async def evil(peer, fields, d):
            return {"z": True}, bomb

        c["n2"].handlers["get_block"] = evil
        got = await c["n1"].manager.get(h, nodes=["n2", "n3"])
        assert got == data
    finally:
        c.close()


def test_a_large_incompressible_block_is_probed_not_compressed_whole(monkeypatch):
    calls: list[int] = []
    real = block._compressor

    class Spy:
        def __init__(self, c):
            self.c = c

        def compress(self, data):
            calls.append(len(data))
            return self.c.compress(data)

    monkeypatch.setattr(block, "_compressor", lambda level: Spy(real(level)))
    n = block.COMPRESS_PROBE_MIN * 4
    blk = block.compress(block.hashed(os.urandom(n)), 1)
    assert blk.zst is None
    assert calls == [2 * block.COMPRESS_PROBE_PART]  # the probe only, never the whole block
    calls.clear()
    blk = block.compress(block.hashed(text(n)), 1)  # compressible: probe, then the whole block
    assert blk.zst is not None and calls == [2 * block.COMPRESS_PROBE_PART, n]
    calls.clear()
    small = block.compress(block.hashed(os.urandom(block.COMPRESS_PROBE_MIN - 1)), 1)
    assert small.zst is None and calls == [block.COMPRESS_PROBE_MIN - 1]  # below the probe size
