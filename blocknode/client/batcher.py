"""Batching of concurrent small puts into one `client_put_many` call."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from blocknode.errors import (
    RemoteError,
    RemoteProtocolError,
    RpcError,
)
from blocknode.protocol import (
    CLIENT_PUT_MANY,
    HEAD_MAX,
    MAX_BATCH_ROWS,
)

if TYPE_CHECKING:
    from blocknode.client.api import Client

__all__ = ["BATCH_MAX_BLOCK", "BATCH_MAX_BYTES", "BATCH_MAX_ITEMS", "PutBatcher"]


BATCH_MAX_BLOCK = 64 * 1024  # puts up to this size may share one RPC with concurrent ones
BATCH_MAX_BYTES = 1024 * 1024
BATCH_MAX_ITEMS = MAX_BATCH_ROWS  # a node refuses larger batches
_BATCH_HEAD_ROOM = HEAD_MAX - 1024  # the rows of one batch must fit in its message head
_ROW_HEAD_BYTES = 12  # msgpack cost of a row besides its ref id: [str hdr, u32 length]


class _PendingPut:
    __slots__ = ("data", "ref_id", "done", "hash", "error")

    def __init__(self, data: bytes, ref_id: str) -> None:
        self.data, self.ref_id = data, ref_id
        self.done = trio.Event()
        self.hash: bytes | None = None
        self.error: BaseException | None = None


class PutBatcher:
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

    async def put(self, data: bytes, ref_id: str) -> bytes:
        item = _PendingPut(data, ref_id)
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
                {"items": [[it.ref_id, len(it.data)] for it in batch]},
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


