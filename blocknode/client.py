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
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import trio

from blocknode import block, fastpath
from blocknode.clock import wall_ms
from blocknode.config import NodeConfig, load_or_create_secret
from blocknode.errors import (
    BlocknodeError,
    HashMismatch,
    InvalidHash,
    RemoteError,
    RemoteProtocolError,
    RpcError,
)
from blocknode.protocol import (
    CLIENT_GET,
    CLIENT_PUT,
    CLIENT_PUT_MANY,
    CLIENT_REF,
    HEAD_MAX,
    MAX_BATCH_ROWS,
    STATUS,
    max_message_size,
)
from blocknode.rpc.connect import open_client as _open_connection
from blocknode.rpc.connection import RpcConnection

MANIFEST_MAGIC = b"BLOCKNODE-MANIFEST-1\n"
_PARALLEL_BLOCKS = 8
BATCH_MAX_BLOCK = 64 * 1024  # puts up to this size may share one RPC with concurrent ones
BATCH_MAX_BYTES = 1024 * 1024
BATCH_MAX_ITEMS = MAX_BATCH_ROWS  # a node refuses larger batches
_BATCH_HEAD_ROOM = HEAD_MAX - 1024  # the rows of one batch must fit in its message head
_ROW_HEAD_BYTES = 20  # msgpack cost of a row besides its ref id: [str hdr, u64 ts, u32 length]


def new_ref_id() -> str:
    """A fresh random reference id."""
    return "ref-" + uuid.uuid4().hex


def parse_hash(text: str) -> bytes:
    """A 64-hex-char hash string to bytes; `InvalidHash` with a clear message otherwise."""
    return fastpath.hex_to_hash(text.strip().lower())


def encode_manifest(size: int, hashes: list[bytes]) -> bytes:
    """The bytes of a manifest block."""
    return MANIFEST_MAGIC + msgpack.packb({"size": size, "blocks": hashes})


def decode_manifest(data: bytes) -> tuple[int, list[bytes]] | None:
    """(size, block hashes) when `data` is a manifest, else None."""
    if not data.startswith(MANIFEST_MAGIC):
        return None
    try:
        m = msgpack.unpackb(data[len(MANIFEST_MAGIC):], raw=False)
        size, blocks = m["size"], m["blocks"]
        if not isinstance(size, int) or not all(isinstance(b, bytes) and len(b) == 32 for b in blocks):
            raise ValueError
    except Exception as exc:  # noqa: BLE001 - any malformation is one error
        raise RemoteProtocolError(f"malformed manifest block: {exc}") from None
    return size, list(blocks)


class _PendingPut:
    __slots__ = ("data", "ref_id", "ts", "done", "hash", "error")

    def __init__(self, data: bytes, ref_id: str, ts: int) -> None:
        self.data, self.ref_id, self.ts = data, ref_id, ts
        self.done = trio.Event()
        self.hash: bytes | None = None
        self.error: BaseException | None = None


class _PutBatcher:
    """Coalesces concurrent small puts of one client into `client_put_many` calls.

    The first caller to find no batch being collected becomes its collector: it
    yields once so that concurrent callers can join, then sends everything
    queued (bounded in items and bytes) as one RPC and wakes each caller with its
    own result. Several batches may be in flight at once. A lone put pays one
    scheduler round of latency; 64 concurrent ones share one RPC and one commit.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._pending: list[_PendingPut] = []
        self._collecting = False

    async def put(self, data: bytes, ref_id: str, ts: int) -> bytes:
        item = _PendingPut(data, ref_id, ts)
        self._pending.append(item)
        if not self._collecting:
            self._collecting = True
            try:
                await trio.sleep(0)
            finally:
                self._collecting = False
            # Drain everything queued, not just up to our own item: a caller that
            # joined this collection relies on it and must not be left behind.
            while self._pending:
                await self._send(self._take())
        await item.done.wait()
        if item.error is not None:
            raise item.error
        assert item.hash is not None
        return item.hash

    def _take(self) -> list[_PendingPut]:
        batch: list[_PendingPut] = []
        size = head = 0
        while self._pending and len(batch) < BATCH_MAX_ITEMS:
            n = len(self._pending[0].data)
            row = len(self._pending[0].ref_id.encode()) + _ROW_HEAD_BYTES
            # The whole batch is one message: keep it within the node's message cap.
            if batch and (size + n > min(BATCH_MAX_BYTES, self._client.block_size)
                          or head + row > _BATCH_HEAD_ROOM):
                break
            batch.append(self._pending.pop(0))
            size += n
            head += row
        return batch

    async def _send(self, batch: list[_PendingPut]) -> None:
        try:
            reply, _ = await self._client.call(
                CLIENT_PUT_MANY,
                {"items": [[it.ref_id, it.ts, len(it.data)] for it in batch]},
                b"".join(it.data for it in batch),
            )
            hashes, errors = reply.get("hashes"), reply.get("errors")
            if not isinstance(hashes, list) or not isinstance(errors, list) or \
                    len(hashes) != len(batch) or len(errors) != len(batch):
                raise RemoteProtocolError("malformed client_put_many reply")
            for it, h, err in zip(batch, hashes, errors, strict=True):
                if err is not None or not isinstance(h, bytes):
                    it.error = RemoteError(str(err))
                else:
                    it.hash = h
        except BaseException as exc:
            for it in batch:
                if it.hash is None and it.error is None:
                    it.error = exc if isinstance(exc, Exception) else RpcError("put cancelled")
            raise
        finally:
            for it in batch:
                it.done.set()


class Client:
    """A connection to one node, with the cluster operations on top (see module docstring)."""

    def __init__(self, conn: RpcConnection, *, block_size: int, timeout: float) -> None:
        self._conn = conn
        self.block_size = block_size
        self.timeout = timeout
        self._batcher = _PutBatcher(self)

    async def call(self, kind: str, fields: dict[str, Any], data: bytes | None = None,
                   *, timeout: float | None = None) -> tuple[dict[str, Any], bytes | None]:
        """A raw RPC to the node (admin calls use this)."""
        return await self._conn.call(kind, fields, data, timeout=timeout or self.timeout)

    async def aclose(self) -> None:
        """Close the connection."""
        await self._conn.aclose()

    # ---- blocks ----

    async def put_block(self, data: bytes, ref_id: str, ts_ms: int | None = None) -> bytes:
        """Put one block (at most `block_size` bytes) with a reference; returns its hash.

        Small blocks put concurrently through one client travel together (see
        `_PutBatcher`); each caller still gets its own result or error.
        """
        ts = wall_ms() if ts_ms is None else ts_ms
        if len(data) <= BATCH_MAX_BLOCK:
            return await self._batcher.put(data, ref_id, ts)
        fields = {"ref_id": ref_id, "ts": ts}
        reply, _ = await self.call(CLIENT_PUT, fields, data)
        return reply["hash"]

    async def get_block(self, h: bytes) -> bytes:
        """Get one block's verified bytes."""
        _, data = await self.call(CLIENT_GET, {"hash": h})
        try:
            return block.verify(data or b"", h, block_size=self.block_size)
        except HashMismatch:
            raise RemoteProtocolError(f"node returned bad data for block {h.hex()}") from None

    async def set_ref(self, h: bytes, ref_id: str, *, deleted: bool) -> None:
        """Add or delete one block's reference."""
        await self.call(CLIENT_REF, {"hash": h, "ref_id": ref_id, "deleted": deleted, "ts": wall_ms()})

    # ---- data of any size ----

    async def put(self, data: bytes, ref: str | None = None) -> str:
        """Store `data` under reference `ref` (default: a fresh one); returns the hash hex."""
        return await self.put_chunks(_split(data, self.block_size), ref=ref, small=data)

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
        ts = wall_ms()
        if small is not None and len(small) <= self.block_size and not small.startswith(MANIFEST_MAGIC):
            return (await self.put_block(small, ref_id, ts)).hex()
        hashes: list[bytes] = []
        total = 0
        limiter = trio.Semaphore(_PARALLEL_BLOCKS)

        async def put_one(i: int, chunk: bytes) -> None:
            try:
                hashes[i] = await self.put_block(chunk, ref_id, ts)
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
        return (await self.put_block(manifest, ref_id, ts)).hex()

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
        """Add reference `ref_id` to the data (to every block of a manifest too)."""
        h = parse_hash(hash_hex)
        for bh in await self._blocks_of(h):
            await self.set_ref(bh, ref_id, deleted=False)

    async def unref(self, hash_hex: str, ref_id: str) -> None:
        """Delete reference `ref_id` (from every block of a manifest too)."""
        h = parse_hash(hash_hex)
        try:
            blocks = await self._blocks_of(h)
        except BlocknodeError:
            blocks = [h]  # the data may already be gone: the deletion must still go through
        for bh in blocks:
            await self.set_ref(bh, ref_id, deleted=True)

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


def _split(data: bytes, block_size: int) -> list[bytes]:
    return [data[i:i + block_size] for i in range(0, len(data), block_size)] or [b""]


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


__all__ = ["Client", "open_client", "new_ref_id", "parse_hash", "InvalidHash", "MANIFEST_MAGIC"]
