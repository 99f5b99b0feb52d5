"""The block concept (`blocknode.block`): one verify path, in-process hand-over, stored forms."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from bg_helpers import FakeCluster

from blocknode import block, fastpath
from blocknode.block import VerifiedBatch, VerifiedBlock
from blocknode.context import run_in_thread
from blocknode.errors import BlockCorrupted, HashMismatch, ProtocolError


def test_verify_checks_the_size_first_then_the_hash():
    data = os.urandom(1000)
    h = fastpath.block_hash(data)
    blk = block.verify(data, h, block_size=1000)
    assert isinstance(blk, VerifiedBlock) and blk == data and blk.hash == h
    with pytest.raises(ProtocolError, match="exceeds block_size 999"):
        block.verify(data, b"\0" * 32, block_size=999)  # too large: never hashed
    with pytest.raises(HashMismatch):
        block.verify(data[:-1] + b"x", h, block_size=1000)
    assert block.hashed(data).hash == h
    with pytest.raises(ProtocolError):
        block.hashed(data, block_size=10)


async def test_accept_trusts_only_a_verified_block_of_that_hash():
    blk = block.hashed(os.urandom(100))
    assert await block.accept(blk, blk.hash, block_size=100, run_sync=run_in_thread) is blk
    plain = bytes(blk)  # as from the wire: verified again
    got = await block.accept(plain, blk.hash, block_size=100, run_sync=run_in_thread)
    assert got == plain and got.hash == blk.hash
    other = block.hashed(b"other")
    with pytest.raises(HashMismatch):  # a verified block of another hash is not this one
        await block.accept(other, blk.hash, block_size=100, run_sync=run_in_thread)
    with pytest.raises(ProtocolError):  # and the size limit holds for handed-over blocks too
        await block.accept(blk, blk.hash, block_size=99, run_sync=run_in_thread)
    big = os.urandom(block.HASH_IN_THREAD_MIN + 1)
    got = await block.averify(big, fastpath.block_hash(big), block_size=None, run_sync=run_in_thread)
    assert got.hash == fastpath.block_hash(big)


async def test_accept_batch_trusts_only_the_batch_made_of_these_blocks():
    blks = [block.hashed(os.urandom(n)) for n in (10, 20, 30)]
    payload = block.join(blks)
    assert isinstance(payload, VerifiedBatch) and payload == b"".join(blks)
    chunks = [(b.hash, bytes(b)) for b in blks]
    got = await block.accept_batch(payload, chunks, block_size=30, run_sync=run_in_thread)
    assert [g.hash for g in got] == [b.hash for b in blks]
    bad = [(blks[1].hash, chunks[0][1]), *chunks[1:]]  # rows that do not match the batch
    with pytest.raises(HashMismatch):
        await block.accept_batch(payload, bad, block_size=30, run_sync=run_in_thread)
    with pytest.raises(HashMismatch):
        await block.accept_batch(bytes(payload), bad, block_size=30, run_sync=run_in_thread)
    with pytest.raises(ProtocolError):
        await block.accept_batch(payload, chunks, block_size=29, run_sync=run_in_thread)


def test_stored_forms_verify_on_the_way_back():
    blk = block.hashed(b"some bytes")
    assert block.from_file_bytes(block.file_bytes(blk), blk.hash) == blk
    assert block.from_inline_bytes(block.inline_bytes(blk), blk.hash).hash == blk.hash
    with pytest.raises(BlockCorrupted):
        block.from_file_bytes(b"some bytez", blk.hash)


async def test_a_put_hashes_its_block_once_in_process(tmp_path, monkeypatch):
    # The coordinator hashes; its own replica takes the VerifiedBlock as it is.
    c = FakeCluster(str(tmp_path), n=1, rf=1, inline_threshold=0)
    try:
        calls = {"hash": 0, "verify": 0}
        real_hash, real_verify = fastpath.block_hash, fastpath.verify

        def counting_hash(data):
            calls["hash"] += 1
            return real_hash(data)

        def counting_verify(data, h):
            calls["verify"] += 1
            return real_verify(data, h)

        monkeypatch.setattr(fastpath, "block_hash", counting_hash)
        monkeypatch.setattr(fastpath, "verify", counting_verify)
        data = os.urandom(5000)
        h = await c["n1"].manager.put(data, "r")
        assert calls == {"hash": 1, "verify": 0}
        assert await c["n1"].blocks.read(h) == data
    finally:
        c.close()


def test_the_block_module_and_the_client_import_no_lmdb():
    code = ("import sys, blocknode.block, blocknode.client; "
            "bad = [m for m in ('lmdb', 'blocknode.storage', 'blocknode.manager') if m in sys.modules]; "
            "sys.exit(str(bad) if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_check_block_and_hash_of_check_without_copying():
    data = os.urandom(5000)
    h = fastpath.block_hash(data)
    assert block.hash_of(data) == h
    assert block.hash_of(memoryview(data), block_size=5000) == h
    with pytest.raises(ProtocolError, match="exceeds block_size 4999"):
        block.hash_of(data, block_size=4999)
    block.check_block(data, h, block_size=5000)  # no error: the bytes are the block
    block.check_block(bytearray(data), h)
    with pytest.raises(ProtocolError, match="exceeds block_size 4999"):
        block.check_block(data, b"\0" * 32, block_size=4999)  # too large: never hashed
    with pytest.raises(HashMismatch):
        block.check_block(data[:-1] + b"x", h, block_size=5000)


def test_zstd_form_is_the_frame_compress_sets_or_none():
    text = b"the same words again and again " * 400
    z = block.zstd_form(text, 3)
    assert z is not None and len(z) < len(text) // 2
    assert block.from_stored(z, fastpath.block_hash(text), compressed=True) == text
    assert block.compress(block.hashed(text), 3).zst == z
    assert block.zstd_form(text, None) is None and block.zstd_form(b"", 3) is None
    noise = os.urandom(300 * 1024)  # probed (>= COMPRESS_PROBE_MIN) and found incompressible
    assert block.zstd_form(noise, 3) is None
    assert block.compress(block.hashed(noise), 3).zst is None
