"""`MetadataStore`: a node's metadata, one LMDB environment composed of its tables.

| part                          | tables             | job                                        |
|-------------------------------|--------------------|--------------------------------------------|
| `env` (`MetadataEnv`)         | —                  | the environment, group-commit writer, reads|
| `refs` (`RefTable`)           | `rc`, `refs`       | references, RC, last writer wins, recalc   |
| `queue` (`ResyncQueue`)       | `resync`, `errors` | resync queue, failure records with backoff |
| `state` (`WorkerState`)       | `state`            | worker settings and progress               |
| `inline` (`InlineTable`)      | `blocks`, `blocks_zst` | small blocks (plain, compressed)       |
| `keys` (`KeyTable`)           | `keys`             | client keys (verifiers), replicated        |
| `layout` (`LayoutTable`)      | `layout`           | the cluster layout state, replicated       |

The rest of the node holds one `MetadataStore` (`node.meta`) and calls the named
methods below; it never sees a transaction. Changes that can make a block live
(applying references, recalculating an RC) are on `LocalBlocks`, which makes
them under the block's lock. Code inside `blocknode.storage`
(`LocalBlocks`) composes the parts' ``tx_*`` building blocks into one commit
(`env.submit`) where a block and its reference must commit together.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import trio

from blocknode.context import NodeContext
from blocknode.notify import Notify
from blocknode.storage.env import MetadataEnv
from blocknode.storage.inline import InlineTable
from blocknode.storage.keys import KeyTable
from blocknode.storage.layout import LayoutTable
from blocknode.storage.refs import RcEntry, RefEntry, RefTable
from blocknode.storage.resync_queue import ErrorEntry, ResyncQueue
from blocknode.storage.worker_state import WorkerState

__all__ = ["MetadataStore"]


class MetadataStore:
    """The metadata of one node (see module docstring).

    `ctx` gives the clock of persisted times (`now_ms`) and how blocking calls
    run (`run_sync`: the commits). `gc_delay_ms` is how long a block stays
    Deletable before it may go; `incref_resync_delay_ms` is when a newly
    referenced block is checked for arrival.
    """

    def __init__(
        self,
        path: str,
        *,
        map_size: int = 1 << 30,
        max_readers: int = 126,
        sync: bool = True,
        gc_delay_ms: int = 600_000,
        incref_resync_delay_ms: int = 60_000,
        ctx: NodeContext | None = None,
    ) -> None:
        self.ctx = ctx or NodeContext()
        self.path = path
        self.env = MetadataEnv(path, map_size=map_size, max_readers=max_readers, sync=sync,
                               run_sync=self.ctx.run_sync)
        self.queue = ResyncQueue(self.env, now_ms=self.ctx.now_ms)
        self.refs = RefTable(self.env, self.queue, now_ms=self.ctx.now_ms,
                             gc_delay_ms=gc_delay_ms,
                             incref_resync_delay_ms=incref_resync_delay_ms)
        self.state = WorkerState(self.env)
        self.inline = InlineTable(self.env)
        self.keys = KeyTable(self.env)
        self.layout = LayoutTable(self.env)

    def now_ms(self) -> int:
        """The clock of persisted times (ms since the epoch)."""
        return self.ctx.now_ms()

    @property
    def resync_notify(self) -> Notify:
        """Fired after every commit that changed the resync queue."""
        return self.queue.changed

    async def run_writer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The group-commit writer task; run it in the node's nursery (`MetadataEnv.run_writer`)."""
        await self.env.run_writer(task_status=task_status)

    def close(self) -> None:
        """Close the environment (no transaction may be running)."""
        self.env.close()

    # ------------------------------------------------------------ references, RC

    def rc_get(self, hash: bytes) -> RcEntry:
        """The RC entry of a block."""
        return self.refs.rc_get(hash)

    def refs_of(self, hash: bytes) -> list[RefEntry]:
        """Every reference version (live and deleted) of one block."""
        return self.refs.refs_of(hash)

    def ref_versions(self, keys: Iterable[tuple[bytes, str]]) -> list[RefEntry | None]:
        """The stored version of each (hash, ref id), None where there is none."""
        return self.refs.versions(keys)

    def iter_refs(self, prefix: bytes = b"", *,
                  after: tuple[bytes, str] | None = None) -> Iterator[RefEntry]:
        """Every reference whose hash starts with `prefix` (after the (hash, ref_id) `after`)."""
        return self.refs.iter_refs(prefix, after=after)

    def ref_digests(self, prefixes: list[bytes]) -> list[bytes]:
        """The digest of the references under each prefix (blocking: `RefTable.digests`)."""
        return self.refs.digests(prefixes)

    def referenced_hashes(self, after: bytes | None, limit: int, *,
                          only_nonzero: bool) -> list[bytes]:
        """Hashes known to `rc` or `refs`, in order, in pages (blocking; see `RefTable`)."""
        return self.refs.referenced_hashes(after, limit, only_nonzero=only_nonzero)

    async def start_grace(self, hash: bytes) -> RcEntry:
        """A block held here with no RC record: Deletable after the GC delay (`RefTable.tx_start_grace`)."""
        return await self.env.submit(lambda txn: self.refs.tx_start_grace(txn, hash))

    def is_empty(self) -> bool:
        """No RC entry and no reference at all (a new node, or lost metadata)."""
        return self.refs.rc_count() == 0 and self.refs.refs_count() == 0

    async def clear_deleted(self, hash: bytes) -> bool:
        """Drop the RC entry if Deletable and past its time."""
        return await self.env.submit(lambda txn: self.refs.tx_clear_deleted(txn, hash))

    async def drop_refs_under(self, prefix: bytes) -> int:
        """Forget every reference under `prefix` (a partition this node no longer holds in
        any live layout version): each block referenced here becomes Deletable after the
        GC delay, so the resync worker hands it over and deletes it (`RefTable.tx_drop_under`).
        Returns how many references were dropped."""
        return await self.env.submit(lambda txn: self.refs.tx_drop_under(txn, prefix))

    # ------------------------------------------------------------ layout

    def layout_raw(self) -> bytes | None:
        """The stored layout state (encoded), or None on a node that has none yet."""
        return self.layout.get()

    async def layout_store(self, raw: bytes) -> None:
        """Store the layout state (encoded), durably."""
        await self.layout.put(raw)

    # ------------------------------------------------------------ resync queue

    async def resync_put(self, hash: bytes, delay_s: float = 0.0) -> bytes:
        """Queue a resync of `hash` after `delay_s` seconds; returns the queue key."""
        return await self.queue.put(hash, delay_s)

    async def resync_put_many(self, hashes: Iterable[bytes], delay_s: float = 0.0) -> None:
        """Queue many resyncs in one commit."""
        await self.queue.put_many(hashes, delay_s)

    def resync_due(self, now_ms: int | None = None, limit: int = 64) -> list[tuple[bytes, bytes]]:
        """Up to `limit` entries due at `now_ms`, oldest first: (key, hash)."""
        return self.queue.due(now_ms, limit)

    def resync_next_due(self) -> int | None:
        """The due time (ms) of the first queue entry, or None when the queue is empty."""
        return self.queue.next_due()

    async def resync_complete(self, key: bytes) -> None:
        """Remove a queue entry whose work is done."""
        await self.queue.complete(key)

    async def resync_requeue(self, key: bytes, delay_s: float) -> bytes:
        """Atomically replace a queue entry by one due after `delay_s`."""
        return await self.queue.requeue(key, delay_s)

    async def error_record(self, hash: bytes, message: str) -> ErrorEntry:
        """Record a resync failure (exponential backoff)."""
        return await self.queue.error_record(hash, message)

    async def error_clear(self, hash: bytes) -> bool:
        """Forget a block's failures (after a success)."""
        return await self.queue.error_clear(hash)

    def error_get(self, hash: bytes) -> ErrorEntry | None:
        """The failure record of a block, if any."""
        return self.queue.error_get(hash)

    def errors_list(self) -> list[ErrorEntry]:
        """Every failure record."""
        return self.queue.errors_list()

    async def retry_now(self, hashes: list[bytes] | None = None) -> int:
        """Clear the backoff of these blocks (None: every failed block) and queue them now."""
        if hashes is None:
            hashes = [e.hash for e in self.queue.errors_list()]
        return await self.queue.retry_now(hashes)

    # ------------------------------------------------------------ worker state

    def state_get(self, name: str, default: Any = None) -> Any:
        """A persisted worker setting or state, or `default`."""
        return self.state.get(name, default)

    async def state_set(self, name: str, value: Any) -> None:
        """Persist a worker setting or state under `name` (msgpack-able value)."""
        await self.state.set(name, value)

    # ------------------------------------------------------------ status

    def counts(self) -> dict[str, int]:
        """Entry counts of every table (for status)."""
        return {
            "rc_entries": self.refs.rc_count(),
            "refs": self.refs.refs_count(),
            "resync_queue": self.queue.count(),
            "errors": self.queue.errors_count(),
            "inline_blocks": self.inline.count(),
        }
