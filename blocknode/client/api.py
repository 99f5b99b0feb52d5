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

import logging
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import trio

from blocknode import block, threads
from blocknode.auth import ClientKey, load_client_key
from blocknode.client.batcher import BATCH_MAX_BLOCK, PutBatcher
from blocknode.client.direct import DIRECT_MIN_BLOCK, DirectPath
from blocknode.client.manifest import (
    MANIFEST_MAGIC,
    block_count,
    decode_manifest,
    encode_manifest,
    max_manifest_blocks,
    new_ref_id,
    parse_hash,
    split,
)
from blocknode.config import NodeConfig
from blocknode.errors import (
    BlocknodeError,
    HashMismatch,
    NodeUnreachable,
    RemoteProtocolError,
    single_error,
)
from blocknode.protocol import (
    CLIENT_GET,
    CLIENT_PUT,
    CLIENT_PUT_MANY,
    CLIENT_REF,
    STATUS,
    THREAD_HASH_MIN,
    max_message_size,
)
from blocknode.rpc.connect import open_connection
from blocknode.rpc.connection import RpcConnection
from blocknode.rpc.handshake import ROLE_CLIENT

log = logging.getLogger("blocknode.client")

_PARALLEL_BLOCKS = 8
"""Blocks of one large put or get in flight at once."""

IDEMPOTENT_KINDS = frozenset({CLIENT_GET, CLIENT_PUT, CLIENT_PUT_MANY, CLIENT_REF, STATUS})
"""RPC kinds sent again on a new connection when the one they were sent on broke:
a get and a status read; a ref change of the same (hash, ref) says the same thing
twice; a put is named by its content's hash and its ref."""

_MAX_RESENDS = 2
"""How many times one idempotent call is sent again after its connection broke."""

_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 1.0
"""Seconds between reconnect attempts: doubling from the first to the max."""

Reconnect = Callable[[float], Awaitable[RpcConnection]]
"""Opens a new running connection to the same node within the seconds given."""


class Client:
    """A connection to one node, with the cluster operations on top (see module docstring).

    With `reconnect` (as `open_client` makes it), a connection that ended (the
    node restarted, a network blip, an idle connection the node closed) is
    reopened by the next call, one reconnect at a time, retried with backoff
    until that call's deadline; a call of an `IDEMPOTENT_KINDS` kind whose
    connection broke under it is sent again on the new one (other kinds are sent
    again only if they were never sent). A node that stays down past the
    deadline gives `NodeUnreachable` saying so.
    """

    def __init__(self, conn: RpcConnection, *, block_size: int, timeout: float,
                 reconnect: Reconnect | None = None, direct: DirectPath | None = None) -> None:
        self._conn = conn
        self.block_size = block_size
        self.timeout = timeout
        self._batcher = PutBatcher(self)
        self._reconnect = reconnect
        self._reconnecting = trio.Lock()
        self._retry_at = 0.0  # no reconnect attempt before this (trio clock)
        self._backoff = _BACKOFF_FIRST
        self.reconnects = 0
        """How many times the connection was reopened."""
        self.direct = direct
        """The direct path (blocks larger than `DIRECT_MIN_BLOCK` to and from their
        replicas, `blocknode.client.direct`), or None: everything through the node."""

    async def call(self, kind: str, fields: dict[str, Any], data: bytes | None = None,
                   *, timeout: float | None = None) -> tuple[dict[str, Any], bytes | None]:
        """A raw RPC to the node (admin calls use this); reconnects as the class says,
        all within `timeout` (default: the client's)."""
        limit = timeout or self.timeout
        conn = self._conn
        if self._reconnect is None:
            return await conn.call(kind, fields, data, timeout=limit)
        deadline = trio.current_time() + limit
        sends = 0
        left = limit
        while True:
            if conn.closed:  # nothing sent on it: any kind may go on a new one
                conn = await self._reopen(conn, deadline, limit)
                left = max(deadline - trio.current_time(), 0.001)
            try:
                return await conn.call(kind, fields, data, timeout=left)
            except NodeUnreachable:
                if not conn.closed or kind not in IDEMPOTENT_KINDS or sends == _MAX_RESENDS:
                    raise
                sends += 1
                left = max(deadline - trio.current_time(), 0.001)

    async def _reopen(self, old: RpcConnection, deadline: float, limit: float) -> RpcConnection:
        """A running connection in place of `old` (which ended), by `deadline`."""
        last: BaseException | None = None
        with trio.move_on_at(deadline):
            async with self._reconnecting:
                while self._conn is old or self._conn.closed:
                    await trio.sleep_until(self._retry_at)
                    old = self._conn
                    if self._reconnect is None:
                        raise NodeUnreachable("the client is closed")
                    try:
                        conn = await self._reconnect(max(deadline - trio.current_time(), 0.01))
                    except NodeUnreachable as exc:
                        last = exc
                        self._retry_at = trio.current_time() + self._backoff
                        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
                        continue
                    self._conn, self._backoff, self._retry_at = conn, _BACKOFF_FIRST, 0.0
                    self.reconnects += 1
                    log.info("reconnected to node %s (%s)", conn.peer_id, conn.addr)
                return self._conn
        reason = old.close_reason or "closed"
        tried = f": {last}" if last is not None else ""
        raise NodeUnreachable(
            f"the connection to node {old.peer_id} ({old.addr}) ended ({reason}) and could not "
            f"be reopened within {limit:g}s{tried}")

    async def aclose(self) -> None:
        """Close the connection (no reconnect after this)."""
        self._reconnect = None
        await self._conn.aclose()

    # ---- blocks ----

    async def put_block(self, data: bytes, ref_id: str, *, direct: bool = True) -> bytes:
        """Put one block (at most `block_size` bytes) with a reference; returns its hash.

        Small blocks put concurrently through one client travel together (see
        `PutBatcher`); each caller still gets its own result or error. The
        reference's time is set by the cluster. A block larger than `DIRECT_MIN_BLOCK`
        goes to its replicas directly when the direct path is on and `direct` (the
        node coordinates manifests: `direct=False`).

        Not cancellable once called (it ends within the client's timeout): a put sent
        is applied by the node whether or not its caller still waits, so a caller that
        releases what a cancelled put stored (`put_chunks`) must know its outcome
        first, or the put could land after the release and keep its reference.
        """
        with trio.CancelScope(shield=True):
            if len(data) <= BATCH_MAX_BLOCK:
                return await self._batcher.put(data, ref_id)
            if direct and self.direct is not None and len(data) > DIRECT_MIN_BLOCK:
                h = await self.direct.put(data, ref_id)
                if h is not None:
                    return h
            reply, _ = await self.call(CLIENT_PUT, {"ref_id": ref_id}, data)
            return reply["hash"]

    async def get_block(self, h: bytes) -> bytes:
        """Get one block's verified bytes (from a replica directly when the direct path
        is on, else, or when no replica answers with it, through the node)."""
        if self.direct is not None:
            found = await self.direct.get(h)
            if found is not None:
                return found
        _, data = await self.call(CLIENT_GET, {"hash": h})
        raw = data or b""
        try:
            # Checked once, here, end to end; the caller gets the very bytes received.
            if len(raw) > THREAD_HASH_MIN:
                await threads.run_sync(
                    lambda: block.check_block(raw, h, block_size=self.block_size))
            else:
                block.check_block(raw, h, block_size=self.block_size)
            return raw
        except HashMismatch:
            raise RemoteProtocolError(f"node returned bad data for block {h.hex()}") from None

    async def set_ref(self, h: bytes, ref_id: str, *, deleted: bool) -> bool:
        """Add or delete one block's reference; True when it was live before on a
        write node that answered (the cluster sets the version's time)."""
        reply, _ = await self.call(CLIENT_REF, {"hash": h, "ref_id": ref_id, "deleted": deleted})
        return reply.get("existed") is True

    # ---- data of any size ----

    async def put(self, data: bytes, ref: str | None = None, *, fresh_ref: bool = False) -> str:
        """Store `data` under reference `ref` (default: a fresh one); returns the hash hex.

        `fresh_ref`: the caller made `ref` just now (see `put_chunks`).
        """
        return await self.put_chunks(split(data, self.block_size), ref=ref, small=data,
                                     size=len(data), fresh_ref=fresh_ref)

    async def put_file(self, path: str, ref: str | None = None, *, fresh_ref: bool = False) -> str:
        """Store a file's bytes, streaming it block by block."""
        size = os.path.getsize(path)
        if size <= self.block_size:
            with open(path, "rb") as f:
                return await self.put(f.read(), ref, fresh_ref=fresh_ref)

        def chunks() -> Iterable[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(self.block_size):
                    yield chunk
        return await self.put_chunks(chunks(), ref=ref, size=size, fresh_ref=fresh_ref)

    async def put_chunks(self, chunks: Iterable[bytes] | AsyncIterable[bytes], *, ref: str | None,
                         small: bytes | None = None, size: int | None = None,
                         fresh_ref: bool = False) -> str:
        """Store a sequence of blocks and, when more than one, their manifest.

        `chunks` may be an async iterable (e.g. reading a pipe in a worker
        thread): blocks are uploaded while the next is read, a few at a time.
        `size`, when known, lets a put too large for one manifest be refused
        before anything is uploaded (else it is refused at the first block past
        the limit).

        A put that fails (quorum lost, a node error, cancelled, Ctrl-C) leaves no
        reference nobody knows behind, best effort (the error says what was done):
        with a fresh reference (none given, or `fresh_ref`: the caller made `ref`
        just now) the blocks stored are released by deleting it from them; with a
        reference given, the blocks are staged under a temporary reference, the
        manifest is stored under `ref`, `ref` is added to the blocks, and the
        temporary reference is deleted: a failure before the manifest releases the
        staging reference; one after it names the manifest's hash (run the command
        again to complete it, or `unref HASH REF`).
        """
        fresh = ref is None or fresh_ref
        ref_id = ref or new_ref_id()
        if small is not None and len(small) <= self.block_size and not small.startswith(MANIFEST_MAGIC):
            try:
                return (await self.put_block(small, ref_id)).hex()
            except BaseException as exc:
                if not fresh:
                    raise
                raise await self._failed(exc, ref_id, [block.hash_of(small)]) from None
        limit = max_manifest_blocks(self.block_size)
        if size is not None:
            count = block_count(size, self.block_size)
            limit = max_manifest_blocks(self.block_size, size)
            if count > limit:
                raise BlocknodeError(
                    f"data of {size} bytes needs {count} blocks of {self.block_size} bytes: more "
                    f"than one manifest can list ({limit}); nothing was stored")
        stage = ref_id if fresh else new_ref_id("staging-")
        hashes: list[bytes] = []
        sending: dict[int, bytes] = {}  # blocks being put: their data, to release them too
        total = 0
        limiter = trio.Semaphore(_PARALLEL_BLOCKS)
        manifest_hash: bytes | None = None
        referenced = False

        async def put_one(i: int, chunk: bytes) -> None:
            try:
                hashes[i] = await self.put_block(chunk, stage)
                del sending[i]
            finally:
                limiter.release()

        try:
            async with trio.open_nursery() as nursery:
                async for chunk in _aiter(chunks):
                    if len(hashes) == limit:
                        raise BlocknodeError(
                            f"data of more than {total} bytes needs more than {limit} blocks of "
                            f"{self.block_size} bytes: more than one manifest can list")
                    await limiter.acquire()
                    hashes.append(b"")
                    sending[len(hashes) - 1] = chunk
                    total += len(chunk)
                    nursery.start_soon(put_one, len(hashes) - 1, chunk)
            manifest = encode_manifest(total, hashes)
            if len(manifest) > self.block_size:  # only if the size given was wrong
                raise BlocknodeError(
                    f"data of {total} bytes needs {len(hashes)} blocks: too many for one manifest")
            manifest_hash = block.hash_of(manifest)
            await self.put_block(manifest, ref_id, direct=False)
            if fresh:
                return manifest_hash.hex()
            referenced = True
            # The manifest holds `ref`: the put is committed. A cancellation (a task
            # cancelled, Ctrl-C) waits for the blocks' references (each call is bounded
            # by the timeout) rather than leave a reference to blocks that may go.
            with trio.CancelScope(shield=True):
                await self._each(hashes, lambda bh: self.set_ref(bh, ref_id, deleted=False))
        except BaseException as exc:
            stored = [h for h in hashes if h] + [block.hash_of(c) for c in sending.values()]
            if fresh and manifest_hash is not None:
                stored.append(manifest_hash)
            err = await self._failed(exc, stage, stored)
            if referenced and manifest_hash is not None:
                err.add_note(f"stored as {manifest_hash.hex()} with reference {ref_id!r} on part of "
                             f"its blocks: run the same command again to complete it, or "
                             f"`unref {manifest_hash.hex()} {ref_id}` to release it")
            elif manifest_hash is not None and not fresh:
                err.add_note(f"its manifest {manifest_hash.hex()} may hold reference {ref_id!r} "
                             "where it was applied: run the same command again to complete it")
            raise err from None
        # Done: the temporary reference goes (best effort: its deletion is newer than it,
        # so wherever it lands, anti-entropy carries it to the other replicas). Shielded:
        # a cancellation now must not leave a reference nobody knows behind.
        with trio.CancelScope(shield=True), trio.move_on_after(self.timeout):
            try:
                await self._each(hashes, lambda bh: self.set_ref(bh, stage, deleted=True))
            except BlocknodeError as exc:
                log.warning("put %s: the staging reference %s could not be deleted everywhere: %s",
                            manifest_hash.hex(), stage, exc)
        return manifest_hash.hex()

    async def _each(self, hashes: list[bytes], fn: Callable[[bytes], Awaitable[object]]) -> None:
        """`fn(h)` for each distinct hash, a few at a time; the first error ends it."""
        limiter = trio.Semaphore(_PARALLEL_BLOCKS)

        async def one(h: bytes) -> None:
            async with limiter:
                await fn(h)

        try:
            async with trio.open_nursery() as nursery:
                for h in dict.fromkeys(hashes):
                    nursery.start_soon(one, h)
        except BaseExceptionGroup as group:
            raise single_error(group) from None

    async def _failed(self, exc: BaseException, ref_id: str, hashes: list[bytes]) -> BaseException:
        """A put failed: delete `ref_id` from the blocks it stored (best effort, shielded,
        within the client's timeout); the error to raise, with a note saying what was done."""
        err = single_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
        cancelled = isinstance(exc, trio.Cancelled) or (
            isinstance(exc, BaseExceptionGroup) and exc.subgroup(trio.Cancelled) is not None)
        if not hashes:
            return exc if cancelled else err
        distinct = list(dict.fromkeys(hashes))
        failed: list[str] = []

        async def release(h: bytes) -> None:
            try:
                await self.set_ref(h, ref_id, deleted=True)
            except (BlocknodeError, OSError) as e:
                failed.append(f"{h.hex()[:16]}…: {e}")

        with trio.CancelScope(shield=True), trio.move_on_after(self.timeout) as scope:
            async with trio.open_nursery() as nursery:
                for h in distinct:
                    nursery.start_soon(release, h)
        if scope.cancelled_caught:
            note = (f"releasing the {len(distinct)} block(s) stored under reference {ref_id!r} "
                    f"did not finish within {self.timeout:g}s")
        elif failed:
            note = (f"reference {ref_id!r} was released from {len(distinct) - len(failed)} of the "
                    f"{len(distinct)} block(s) stored; not everywhere from {len(failed)} "
                    f"(first: {failed[0]}); anti-entropy spreads the deletion where it landed")
        else:
            note = f"reference {ref_id!r} was released from the {len(distinct)} block(s) stored"
        if cancelled:
            return exc  # a cancellation goes on as it is
        err.add_note(note)
        return err

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
        except NodeUnreachable:
            raise  # this client cannot reach its node: the deletion cannot go through either
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
async def open_client(cfg: NodeConfig, *, timeout: float | None = None,
                      key: ClientKey | None = None, direct: bool | None = None) -> AsyncIterator[Client]:
    """Connect to the node `cfg` describes (its public address) with a client key.

    The key is `key`, else ``BLOCKNODE_KEY``, else the config's
    `client_key_file`, else the node's admin key file (see
    `blocknode.auth.load_client_key`); a client never uses the cluster secret.
    `direct` (default: the config's `client_direct`): large blocks go to and
    come from their replicas directly (`blocknode.client.direct`).
    The connection's engine runs in a nursery this context manager holds, and so
    does the new connection's when one that ended is reopened (see `Client`), and
    so do the direct path's connections to the replicas; an error raised by the
    body comes out as itself.
    """
    key = key or load_client_key(cfg)
    use_direct = cfg.client_direct if direct is None else direct
    limit = max_message_size(cfg.block_size)
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:  # the connections' engines run here

        async def connect(seconds: float) -> RpcConnection:
            conn = await open_connection(
                cfg.public_addr, key.secret, local_id=key.id, role=ROLE_CLIENT,
                connect_timeout=seconds, handshake_timeout=seconds, max_message_size=limit)
            await nursery.start(conn.run)
            return conn

        try:
            conn = await connect(cfg.connect_timeout)
        except BaseException as exc:  # re-raised below as itself, outside the nursery
            failure = exc
        else:
            # The home connection is looked up at each use: a reconnect swaps it.
            path = DirectPath(lambda: client._conn, key, nursery, block_size=cfg.block_size,
                              timeout=cfg.rpc_timeout, connect_timeout=cfg.connect_timeout,
                              max_message_size=limit, hedge_delay=cfg.hedge_delay) if use_direct else None
            client = Client(conn, block_size=cfg.block_size, timeout=timeout or cfg.rpc_timeout * 2,
                            reconnect=lambda seconds: connect(min(seconds, cfg.connect_timeout)),
                            direct=path)
            try:
                yield client
            except BaseException as exc:  # re-raised below, outside the nursery
                failure = exc
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure




__all__ = ["Client", "open_client"]
