"""Group commit across clients: small-block batches from different connections share a round.

Each client already batches its own concurrent small puts into one
`client_put_many` (`blocknode.client.batcher`). Many clients, or one client
over many connections, still send many small requests; coordinated one by one,
each costs its own `put_blocks` to every replica and its own LMDB commit there.

`GroupCommit` joins them, self-clocked like a database's group commit: at most
`rounds` batches are being stored at once; a request that arrives while they
are all busy waits in the queue, and when one finishes, the whole queue
(bounded in items and bytes) goes as the next round: one `put_many`, so one
`put_blocks` per write-node set and one commit per replica. A round also takes
the requests that arrived in the same scheduler pass as the one that starts
it. An idle node adds no latency (a lone request starts a round after one
scheduler pass); a busy one batches more. `rounds` is not 1: rounds are
latency-bound (replica round trips, fsyncs), so a node storing one at a time
would serialise its clients.

Each request gets its own items' results. Rounds run as tasks of the nursery
`run` holds (the node's lifetime), not in the task of the request that starts
them: a request cancelled mid-round (its client went away) does not cancel the
round the others in it wait for, and the node shutting down (or crashing, in
the simulation) does cancel it: a round shielded in a request's task once kept
a stopping node waiting forever on its own stopped metadata writer. A round is
bounded by the RPC timeouts of the calls it makes. A request cancelled before
its round starts is taken out of the queue, never sent. Without `run` (off, or
not started) each request is its own `put_many`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

import trio

from blocknode.errors import BlocknodeError, StoreError
from blocknode.protocol import MAX_BATCH_ROWS

__all__ = ["DEFAULT_ROUNDS", "GroupCommit", "PutMany"]

PutMany = Callable[[list[tuple[bytes, str]]], Awaitable[list[bytes | BlocknodeError]]]
"""`BlockManager.put_many`: (data, ref_id) items → per item its hash or its error."""

DEFAULT_ROUNDS = 4
"""Rounds being stored at once (the config's `group_commit_rounds`)."""
ROUND_MAX_BYTES = 4 * 1024 * 1024
"""Bytes of block data in one round at most (a request larger than this is a round alone)."""


class _Request:
    __slots__ = ("blocks", "size", "taken", "done", "results", "error")

    def __init__(self, blocks: list[tuple[bytes, str]]) -> None:
        self.blocks = blocks
        self.size = sum(len(d) for d, _ in blocks)
        self.taken = False
        self.done = False
        self.results: list[bytes | BlocknodeError] = []
        self.error: BaseException | None = None


class GroupCommit:
    """Concurrent `put_many` requests joined into rounds (see module docstring).

    `rounds` 0 turns it off: each request is its own `put_many`.
    """

    def __init__(self, put_many: PutMany, *, rounds: int = DEFAULT_ROUNDS,
                 max_items: int = MAX_BATCH_ROWS, max_bytes: int = ROUND_MAX_BYTES) -> None:
        if rounds < 0 or max_items < 1 or max_bytes < 1:
            raise ValueError("GroupCommit: rounds >= 0, max_items >= 1 and max_bytes >= 1")
        self._put_many = put_many
        self.rounds = rounds
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._queue: deque[_Request] = deque()
        self._running = 0
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.rounds_run = 0  # rounds stored so far (tests, metrics)
        self.requests_run = 0  # requests they held

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery the rounds run in until cancelled (start it in the node's nursery)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def put_many(self, blocks: list[tuple[bytes, str]]) -> list[bytes | BlocknodeError]:
        """Store `blocks` in the next round; per item its hash or its error."""
        if self.rounds == 0 or self._nursery is None:
            return await self._put_many(blocks)
        req = _Request(blocks)
        self._queue.append(req)
        try:
            while not req.done:
                if not req.taken and self._running < self.rounds and self._nursery is not None:
                    self._running += 1
                    self._nursery.start_soon(self._run_round)
                await self._changed.wait()
        finally:
            if not req.taken:
                self._queue.remove(req)
        if req.error is not None:
            raise req.error
        return req.results

    def _take(self) -> list[_Request]:
        batch: list[_Request] = []
        items = size = 0
        while self._queue:
            nxt = self._queue[0]
            if batch and (items + len(nxt.blocks) > self.max_items
                          or size + nxt.size > self.max_bytes):
                break
            self._queue.popleft()
            nxt.taken = True
            batch.append(nxt)
            items += len(nxt.blocks)
            size += nxt.size
        return batch

    async def _run_round(self) -> None:
        """One round (`_running` was counted for it by the request that started it)."""
        batch: list[_Request] = []
        try:
            # One scheduler pass: requests that arrived in the same pass (read from
            # other connections in the same wake-up) join this round.
            await trio.sleep(0)
            batch = self._take()
            if not batch:  # a round started meanwhile took them all
                return
            flat = [b for req in batch for b in req.blocks]
            try:
                results = await self._put_many(flat)
            except trio.Cancelled:
                for req in batch:  # the node is stopping; its requests are being cancelled too
                    req.error = StoreError("the node is shutting down: the put was not stored")
                raise
            except Exception as exc:  # noqa: BLE001 - given to every request of the round
                for req in batch:
                    req.error = exc
            else:
                i = 0
                for req in batch:
                    req.results = results[i:i + len(req.blocks)]
                    i += len(req.blocks)
            self.rounds_run += 1
            self.requests_run += len(batch)
        finally:
            self._running -= 1
            for req in batch:
                req.done = True
            self._notify()
