"""The async client API (Trio): put, get, ref, unref and admin calls through one node.

    async with open_client(load_config(path)) as client:
        hash_hex = await client.put(data, ref="my-object")
        data = await client.get(hash_hex)

The client talks to one node (the one its config names), which coordinates
the cluster operation. Data up to `block_size` is one block whose hash is
Garage's blake2sum of the bytes. Larger data is split into blocks plus a
manifest block; the manifest's hash names the whole, and `get`, `ref` and
`unref` follow it transparently. A manifest is
``MANIFEST_MAGIC + msgpack({"size": n, "blocks": [hash, ...]})``; small data
that happens to begin with the magic is stored behind a one-block manifest too,
so a manifest can never be mistaken for data.
"""


from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import trio

from blocknode import block
from blocknode.client.batcher import BATCH_MAX_BLOCK, PutBatcher
from blocknode.client.manifest import (
    MANIFEST_MAGIC,
    decode_manifest,
    encode_manifest,
    new_ref_id,
    parse_hash,
    split,
)
from blocknode.config import NodeConfig, load_or_create_secret
from blocknode.errors import (
    BlocknodeError,
    HashMismatch,
    RemoteProtocolError,
)
from blocknode.protocol import (
    CLIENT_GET,
    CLIENT_PUT,
    CLIENT_REF,
    STATUS,
    max_message_size,
)
from blocknode.rpc.connect import open_client as _open_connection
from blocknode.rpc.connection import RpcConnection

_PARALLEL_BLOCKS = 8
"""Blocks of one large put or get in flight at once."""


class Client:
    """A connection to one node, with the cluster operations on top (see module docstring)."""

    def __init__(self, conn: RpcConnection, *, block_size: int, timeout: float) -> None:
        self._conn = conn
        self.block_size = block_size
        self.timeout = timeout
        self._batcher = PutBatcher(self)

    async def call(self, kind: str, fields: dict[str, Any], data: bytes | None = None,
                   *, timeout: float | None = None) -> tuple[dict[str, Any], bytes | None]:
        """A raw RPC to the node (admin calls use this)."""
        return await self._conn.call(kind, fields, data, timeout=timeout or self.timeout)

    async def aclose(self) -> None:
        """Close the connection."""
        await self._conn.aclose()

    # ---- blocks ----

    async def put_block(self, data: bytes, ref_id: str) -> bytes:
        """Put one block (at most `block_size` bytes) with a reference; returns its hash.

        Small blocks put concurrently through one client travel together (see
        `PutBatcher`); each caller still gets its own result or error. The
        reference's time is set by the cluster.
        """
        if len(data) <= BATCH_MAX_BLOCK:
            return await self._batcher.put(data, ref_id)
        reply, _ = await self.call(CLIENT_PUT, {"ref_id": ref_id}, data)
        return reply["hash"]

    async def get_block(self, h: bytes) -> bytes:
        """Get one block's verified bytes."""
        _, data = await self.call(CLIENT_GET, {"hash": h})
        try:
            return block.verify(data or b"", h, block_size=self.block_size)
        except HashMismatch:
            raise RemoteProtocolError(f"node returned bad data for block {h.hex()}") from None

    async def set_ref(self, h: bytes, ref_id: str, *, deleted: bool) -> bool:
        """Add or delete one block's reference; True when it was live before on a
        write node that answered (the cluster sets the version's time)."""
        reply, _ = await self.call(CLIENT_REF, {"hash": h, "ref_id": ref_id, "deleted": deleted})
        return reply.get("existed") is True

    # ---- data of any size ----

    async def put(self, data: bytes, ref: str | None = None) -> str:
        """Store `data` under reference `ref` (default: a fresh one); returns the hash hex."""
        return await self.put_chunks(split(data, self.block_size), ref=ref, small=data)

    async def put_file(self, path: str, ref: str | None = None) -> str:
        """Store a file's bytes, streaming it block by block."""
        size = os.path.getsize(path)
        if size <= self.block_size:
            with open(path, "rb") as f:
                return await self.put(f.read(), ref)

        def chunks() -> Iterable[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(self.block_size):
                    yield chunk
        return await self.put_chunks(chunks(), ref=ref)

    async def put_chunks(self, chunks: Iterable[bytes] | AsyncIterable[bytes], *, ref: str | None,
                         small: bytes | None = None) -> str:
        """Store a sequence of blocks and, when more than one, their manifest.

        `chunks` may be an async iterable (e.g. reading a pipe in a worker
        thread): blocks are uploaded while the next is read, a few at a time.
        """
        ref_id = ref or new_ref_id()
        if small is not None and len(small) <= self.block_size and not small.startswith(MANIFEST_MAGIC):
            return (await self.put_block(small, ref_id)).hex()
        hashes: list[bytes] = []
        total = 0
        limiter = trio.Semaphore(_PARALLEL_BLOCKS)

        async def put_one(i: int, chunk: bytes) -> None:
            try:
                hashes[i] = await self.put_block(chunk, ref_id)
            finally:
                limiter.release()

        async with trio.open_nursery() as nursery:
            async for chunk in _aiter(chunks):
                await limiter.acquire()
                hashes.append(b"")
                total += len(chunk)
                nursery.start_soon(put_one, len(hashes) - 1, chunk)
        manifest = encode_manifest(total, hashes)
        if len(manifest) > self.block_size:
            raise BlocknodeError(
                f"data of {total} bytes needs {len(hashes)} blocks: too many for one manifest"
            )
        return (await self.put_block(manifest, ref_id)).hex()

    async def get(self, hash_hex: str) -> bytes:
        """The exact bytes stored under `hash_hex` (manifests reassembled and verified)."""
        parts = [chunk async for chunk in self.iter_get(hash_hex)]
        return b"".join(parts)

    async def iter_get(self, hash_hex: str) -> AsyncIterator[bytes]:
        """The bytes under `hash_hex`, block by block (a few blocks fetched ahead)."""
        h = parse_hash(hash_hex)
        data = await self.get_block(h)
        manifest = decode_manifest(data)
        if manifest is None:
            yield data
            return
        size, hashes = manifest
        got = 0
        window = _PARALLEL_BLOCKS
        for start in range(0, len(hashes), window):
            batch = hashes[start:start + window]
            results: list[bytes] = [b""] * len(batch)

            async def fetch(i: int, bh: bytes, results: list[bytes] = results) -> None:
                results[i] = await self.get_block(bh)

            async with trio.open_nursery() as nursery:
                for i, bh in enumerate(batch):
                    nursery.start_soon(fetch, i, bh)
            for chunk in results:
                got += len(chunk)
                yield chunk
        if got != size:
            raise RemoteProtocolError(f"manifest {hash_hex} says {size} bytes but its blocks hold {got}")

    async def _blocks_of(self, h: bytes) -> list[bytes]:
        data = await self.get_block(h)
        manifest = decode_manifest(data)
        return [h] if manifest is None else [*manifest[1], h]

    async def ref(self, hash_hex: str, ref_id: str) -> None:
        """Add reference `ref_id` to the data (to every block of a manifest too).

        Raises `RemoteError` with code ``conflict`` when the change lost to a newer
        version made meanwhile elsewhere (running it again applies it after that).
        """
        h = parse_hash(hash_hex)
        for bh in await self._blocks_of(h):
            await self.set_ref(bh, ref_id, deleted=False)

    async def unref(self, hash_hex: str, ref_id: str) -> bool:
        """Delete reference `ref_id` (from every block of a manifest too).

        Returns whether the reference existed (was live on a write node of the
        data's block that answered); a deletion is recorded either way.
        """
        h = parse_hash(hash_hex)
        try:
            blocks = await self._blocks_of(h)
        except BlocknodeError:
            blocks = [h]  # the data may already be gone: the deletion must still go through
        existed = False
        for bh in blocks:
            existed |= await self.set_ref(bh, ref_id, deleted=True) and bh == h
        return existed

    async def status(self) -> dict[str, Any]:
        """The node's status (see `Node.status`)."""
        reply, _ = await self.call(STATUS, {})
        return reply


async def _aiter(chunks: Iterable[bytes] | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk


@asynccontextmanager
async def open_client(cfg: NodeConfig, *, timeout: float | None = None) -> AsyncIterator[Client]:
    """Connect to the node `cfg` describes (its public address, its cluster secret).

    The connection's engine runs in a nursery this context manager holds; an
    error raised by the body comes out as itself.
    """
    secret = load_or_create_secret(cfg, create=False)
    async with _open_connection(cfg.public_addr, secret, timeout=cfg.connect_timeout,
                                max_message_size=max_message_size(cfg.block_size)) as conn:
        client = Client(conn, block_size=cfg.block_size, timeout=timeout or cfg.rpc_timeout * 2)
        try:
            yield client
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()




__all__ = ["Client", "open_client"]
