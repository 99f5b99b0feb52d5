"""Batching of concurrent small puts into one `client_put_many` call."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from blocknode.errors import (
    RemoteError,
    RemoteProtocolError,
    RpcError,
    RpcTimeout,
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
    __slots__ = ("data", "ref_id", "wakeup", "finished", "taken", "hash", "error")

    def __init__(self, data: bytes, ref_id: str) -> None:
        self.data, self.ref_id = data, ref_id
        self.wakeup = trio.Event()  # set when finished, or when asked to take over collecting
        self.finished = False
        self.taken = False  # in a batch being sent (no longer in the queue)
        self.hash: bytes | None = None
        self.error: BaseException | None = None

    def finish(self) -> None:
        self.finished = True
        self.wakeup.set()


class PutBatcher:
    """Coalesces concurrent small puts of one client into `client_put_many` calls.

    The first caller to find no batch being collected becomes its collector: it
    yields once so that concurrent callers can join, then sends everything
    queued (bounded in items and bytes) as one RPC at a time and wakes each caller
    with its own result. A lone put pays one scheduler round of latency; 64
    concurrent ones share one RPC and one commit.

    Every caller gets an answer: a batch that fails gives its error to its own
    callers only, and the collector goes on with the queue; a collector that
    stops (its own put answered, or cancelled) hands the queue to the caller at
    its head. Each `put` has a deadline (`timeout`, the client's by default):
    waiting past it raises `RpcTimeout` (a put not yet sent is then not sent).
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._pending: list[_PendingPut] = []
        self._collecting = False

    async def put(self, data: bytes, ref_id: str, *, timeout: float | None = None) -> bytes:
        item = _PendingPut(data, ref_id)
        self._pending.append(item)
        deadline = self._client.timeout if timeout is None else timeout
        give_up = trio.current_time() + deadline
        try:
            while not item.finished:
                if not self._collecting and not item.taken:
                    # Sending is bounded by the call's own timeout; the deadline is not
                    # applied to it, so a batch is never cut short for its other callers.
                    await self._collect(item)
                    continue
                item.wakeup = trio.Event()
                with trio.move_on_at(give_up):
                    await item.wakeup.wait()
                if not item.finished and trio.current_time() >= give_up:
                    raise RpcTimeout(f"put of {len(data)} bytes: no answer within {deadline:g}s")
        finally:
            if not item.taken and item in self._pending:
                self._pending.remove(item)  # given up before it was sent
                if self._pending and not self._collecting:
                    self._pending[0].wakeup.set()
        if item.error is not None:
            raise item.error
        assert item.hash is not None
        return item.hash

    async def _collect(self, mine: _PendingPut) -> None:
        # Send batches in queue order until our own item is answered, then hand the
        # rest of the queue to the caller at its head.
        self._collecting = True
        try:
            await trio.sleep(0)  # let concurrent callers join
            while self._pending and not mine.finished:
                await self._send(self._take())
        finally:
            self._collecting = False
            if self._pending:
                self._pending[0].wakeup.set()

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
            item = self._pending.pop(0)
            item.taken = True
            batch.append(item)
            size += n
            head += row
        return batch

    async def _send(self, batch: list[_PendingPut]) -> None:
        """Send one batch; its callers get their results or its error (which stops here,
        unless it is a cancellation)."""
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
        except Exception as exc:  # noqa: BLE001 - this batch's callers get it; the queue goes on
            for it in batch:
                if it.hash is None and it.error is None:
                    it.error = exc
        except BaseException:
            for it in batch:
                if it.hash is None and it.error is None:
                    it.error = RpcError("put cancelled: the call sending it was interrupted")
            raise
        finally:
            for it in batch:
                it.finish()
