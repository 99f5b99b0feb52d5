"""Node metadata in one LMDB environment, with group-committed writes.

Named databases (keys and values are bytes):

| db        | key                              | value                                   |
|-----------|----------------------------------|-----------------------------------------|
| `rc`      | hash (32)                        | RC entry, Garage's format (see fastpath)|
| `refs`    | hash (32) + ref id (utf-8)       | 1 byte deleted flag + 8 bytes BE ms     |
| `resync`  | 8 bytes BE due ms + hash (40)    | empty                                   |
| `errors`  | hash (32)                        | msgpack [count, next_try_ms, last_ms, message] |
| `state`   | utf-8 name                       | msgpack value (worker settings, scrub state) |
| `blocks`  | hash (32)                        | the bytes of a small ("inline") block   |

A reference change and the RC update it implies happen in one transaction, so
they can never disagree (Garage on sled could not promise that).

Writes: every mutation is a function ``fn(txn) -> result`` submitted to one
writer task, which drains whatever is queued into a single transaction and
commits it in one worker-thread call (an LMDB write transaction must begin and
commit on the same thread). One durable commit costs ~260 µs here; batching is
what turns ~3.8k commits/s into tens of thousands of durable operations/s. A
caller awaits its own operation's commit. If one function raises, the batch is
aborted and re-run one function per transaction, so only that caller sees the
error.

Reads are small mmap reads (1–3 µs) and run inline on the caller's thread.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import lmdb
import msgpack
import trio

from blocknode import fastpath
from blocknode.clock import wall_ms
from blocknode.errors import BlocknodeError, MetadataError, MetadataFull
from blocknode.notify import Notify
from blocknode.protocol import GC_CHECK_MARGIN_MS, MAX_REF_ID_BYTES

T = TypeVar("T")
Txn = lmdb.Transaction

RETRY_BASE_S = 60.0
RETRY_MAX_S = 3600.0
_REF_VALUE = struct.Struct(">?Q")
_BATCH_MAX = 512


@dataclass(frozen=True)
class RcEntry:
    """A decoded RC entry: `Present(count)`, `Deletable(at_ms)` or `Absent`."""

    state: int
    value: int = 0

    @classmethod
    def decode(cls, raw: bytes | None) -> RcEntry:
        """Decode stored RC bytes (`CorruptEntry` on a bad length)."""
        state, value = fastpath.rc_decode(raw)
        return cls(state, value)

    def encode(self) -> bytes | None:
        """The stored bytes, or None for Absent (key deleted)."""
        return fastpath.rc_encode(self.state, self.value)

    @property
    def count(self) -> int:
        """Number of live references (0 unless Present)."""
        return self.value if self.state == fastpath.RC_PRESENT else 0

    def is_zero(self) -> bool:
        """Deletable or Absent."""
        return self.state != fastpath.RC_PRESENT

    def is_nonzero(self) -> bool:
        """Present."""
        return self.state == fastpath.RC_PRESENT

    def is_deletable(self, now_ms: int) -> bool:
        """Present: never; Deletable: once its time has passed; Absent: always."""
        if self.state == fastpath.RC_PRESENT:
            return False
        if self.state == fastpath.RC_DELETABLE:
            return now_ms > self.value
        return True

    def is_needed(self, now_ms: int) -> bool:
        """The opposite of `is_deletable`."""
        return not self.is_deletable(now_ms)

    def increment(self) -> RcEntry:
        """One more reference (from any state)."""
        return RcEntry(fastpath.RC_PRESENT, self.count + 1)

    def decrement(self, now_ms: int, gc_delay_ms: int) -> RcEntry:
        """One reference less; the last one makes the block Deletable after the GC delay."""
        if self.state == fastpath.RC_PRESENT:
            if self.value > 1:
                return RcEntry(fastpath.RC_PRESENT, self.value - 1)
            return RcEntry(fastpath.RC_DELETABLE, now_ms + gc_delay_ms)
        return self

    def describe(self) -> str:
        """Human-readable form for the CLI."""
        if self.state == fastpath.RC_PRESENT:
            return f"present({self.value})"
        if self.state == fastpath.RC_DELETABLE:
            return f"deletable(at {self.value} ms)"
        return "absent"


ABSENT = RcEntry(fastpath.RC_ABSENT, 0)


@dataclass(frozen=True)
class RefEntry:
    """One reference to a block: last-writer-wins on (timestamp, deleted)."""

    hash: bytes
    ref_id: str
    deleted: bool
    ts_ms: int

    def wins_over(self, other: RefEntry | None) -> bool:
        """True when this version replaces `other` (ties go to the deletion)."""
        return other is None or (self.ts_ms, self.deleted) > (other.ts_ms, other.deleted)


@dataclass(frozen=True)
class ErrorEntry:
    """A block whose resync failed: how often, when to retry, and why."""

    hash: bytes
    count: int
    next_try_ms: int
    last_try_ms: int
    message: str




class _Op:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[Txn], Any]) -> None:
        self.fn = fn
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class MetaStore:
    """The LMDB environment of one node and every transaction on it.

    `now_ms` is the clock for persisted times (injectable for tests);
    `gc_delay_ms` is how long a block stays Deletable before it may go;
    `incref_resync_delay_ms` is when a newly referenced block is checked
    (the seed's 2 × BLOCK_RW_TIMEOUT).
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
        now_ms: Callable[[], int] = wall_ms,
    ) -> None:
        os.makedirs(path, exist_ok=True)
        try:
            self.env = lmdb.open(
                path,
                map_size=map_size,
                max_readers=max_readers,
                max_dbs=16,
                sync=sync,
                metasync=sync,
                writemap=False,
            )
        except lmdb.Error as exc:
            raise MetadataError(f"cannot open metadata store {path}: {exc}") from exc
        self.path = path
        self.now_ms = now_ms
        self.gc_delay_ms = gc_delay_ms
        self.incref_resync_delay_ms = incref_resync_delay_ms
        self.rc = self.env.open_db(b"rc")
        self.refs = self.env.open_db(b"refs")
        self.resync = self.env.open_db(b"resync")
        self.errors = self.env.open_db(b"errors")
        self.state = self.env.open_db(b"state")
        self.blocks = self.env.open_db(b"blocks")
        self.resync_notify = Notify()
        self._resync_touched = False
        self._send, self._recv = trio.open_memory_channel[_Op](math.inf)
        self._writer_running = False

    def close(self) -> None:
        """Close the environment (no transaction may be running)."""
        self.env.close()

    # ------------------------------------------------------------------ writes

    async def run_writer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The group-commit writer task; run it in the node's nursery.

        It exits when cancelled; operations still queued then fail with
        `MetadataError` rather than hang.
        """
        self._writer_running = True
        task_status.started()
        try:
            while True:
                first = await self._recv.receive()
                batch = [first]
                while len(batch) < _BATCH_MAX:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except trio.WouldBlock:
                        break
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._commit_batch, batch)
                    for op in batch:
                        op.done.set()
                    self._after_commit()
        finally:
            self._writer_running = False
            while True:
                try:
                    op = self._recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                op.error = MetadataError("metadata writer stopped")
                op.done.set()

    def _commit_batch(self, batch: list[_Op]) -> None:
        try:
            with self.env.begin(write=True) as txn:
                for op in batch:
                    op.result = op.fn(txn)
            return
        except lmdb.MapFullError:
            err: BaseException = MetadataFull(
                f"the metadata store {self.path} is full: raise lmdb_map_size in the node config"
            )
            for op in batch:
                op.error = err
            return
        except BaseException:  # noqa: BLE001 - one bad op: re-run each alone below
            pass
        for op in batch:
            op.result = None
            op.error = None
            try:
                with self.env.begin(write=True) as txn:
                    op.result = op.fn(txn)
            except lmdb.MapFullError:
                op.error = MetadataFull(
                    f"the metadata store {self.path} is full: raise lmdb_map_size in the node config"
                )
            except BlocknodeError as exc:
                op.error = exc
            except lmdb.Error as exc:
                op.error = MetadataError(f"metadata write failed: {exc}")
            except Exception as exc:  # noqa: BLE001 - delivered to the caller, not lost
                op.error = exc

    def _after_commit(self) -> None:
        if self._resync_touched:
            self._resync_touched = False
            self.resync_notify.notify()

    async def submit(self, fn: Callable[[Txn], T]) -> T:
        """Run `fn(txn)` in the next group commit; returns once it is durable."""
        if not self._writer_running:
            result = await trio.to_thread.run_sync(self._write_txn, fn)
            self._after_commit()  # on the Trio thread: waking waiters is only valid here
            return result
        op = _Op(fn)
        self._send.send_nowait(op)
        await op.done.wait()
        if op.error is not None:
            raise op.error
        return op.result

    def write_now(self, fn: Callable[[Txn], T]) -> T:
        """Run `fn(txn)` in its own transaction on this thread (blocking; tools and tests).

        Called from the Trio thread it also wakes the resync waiters; from any
        other thread it cannot, so async code uses `submit`.
        """
        result = self._write_txn(fn)
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return result  # not on the Trio thread: nobody here to wake
        self._after_commit()
        return result

    def _write_txn(self, fn: Callable[[Txn], T]) -> T:
        try:
            with self.env.begin(write=True) as txn:
                result = fn(txn)
        except lmdb.MapFullError:
            raise MetadataFull(
                f"the metadata store {self.path} is full: raise lmdb_map_size in the node config"
            ) from None
        except lmdb.Error as exc:
            raise MetadataError(f"metadata write failed: {exc}") from exc
        return result

    # -------------------------------------------------- transaction building blocks
    # `tx_*` functions run inside a write transaction; compose them in `submit`.

    def tx_rc_get(self, txn: Txn, hash: bytes) -> RcEntry:
        """The RC entry of a block inside `txn`."""
        return RcEntry.decode(txn.get(hash, db=self.rc))

    def tx_rc_set(self, txn: Txn, hash: bytes, entry: RcEntry) -> None:
        """Store an RC entry (Absent deletes the key)."""
        raw = entry.encode()
        if raw is None:
            txn.delete(hash, db=self.rc)
        else:
            txn.put(hash, raw, db=self.rc)

    def tx_incref(self, txn: Txn, hash: bytes, *, check_later: bool = True) -> RcEntry:
        """Increment; a block going from zero to one is queued for a resync check.

        `check_later=False` when the block is stored in this same transaction (or
        was before it): there is nothing to wait for.
        """
        old = self.tx_rc_get(txn, hash)
        new = old.increment()
        self.tx_rc_set(txn, hash, new)
        if old.is_zero() and check_later:
            # Someone should send us the block; check later that it arrived, and fetch it if not.
            self.tx_resync_put(txn, hash, self.incref_resync_delay_ms)
        return new

    def tx_decref(self, txn: Txn, hash: bytes) -> RcEntry:
        """Decrement; the last reference makes it Deletable and queues the GC check."""
        new = self.tx_rc_get(txn, hash).decrement(self.now_ms(), self.gc_delay_ms)
        self.tx_rc_set(txn, hash, new)
        if new.state == fastpath.RC_DELETABLE:
            self.tx_resync_put(txn, hash, self.gc_delay_ms + GC_CHECK_MARGIN_MS)
        return new

    def tx_clear_deleted(self, txn: Txn, hash: bytes) -> bool:
        """Drop a Deletable RC entry whose time has passed; True if it was dropped."""
        entry = self.tx_rc_get(txn, hash)
        if entry.state == fastpath.RC_DELETABLE and self.now_ms() > entry.value:
            txn.delete(hash, db=self.rc)
            return True
        return False

    def tx_apply_ref(self, txn: Txn, ref: RefEntry, *, block_present: bool = False) -> bool:
        """Merge one reference version (last writer wins) and update the RC to match.

        Idempotent: applying the same or an older version again changes nothing.
        Returns True when the stored version changed. `block_present`: the block is
        stored here already (a put), so no arrival check is queued.
        """
        key = _ref_key(ref.hash, ref.ref_id)
        old_raw = txn.get(key, db=self.refs)
        old = _decode_ref(key, old_raw) if old_raw is not None else None
        if not ref.wins_over(old):
            return False
        txn.put(key, _REF_VALUE.pack(ref.deleted, ref.ts_ms), db=self.refs)
        was_live = old is not None and not old.deleted
        if was_live and ref.deleted:
            self.tx_decref(txn, ref.hash)
        elif not was_live and not ref.deleted:
            self.tx_incref(txn, ref.hash, check_later=not block_present)
        return True

    def tx_recalculate_rc(self, txn: Txn, hash: bytes) -> RcEntry:
        """Set the RC from the live references (Garage's `recalculate_rc`)."""
        live = sum(1 for r in self._iter_refs(txn, hash) if not r.deleted)
        old = self.tx_rc_get(txn, hash)
        if live > 0:
            new = RcEntry(fastpath.RC_PRESENT, live)
        elif old.state == fastpath.RC_PRESENT:
            new = RcEntry(fastpath.RC_DELETABLE, self.now_ms() + self.gc_delay_ms)
            self.tx_resync_put(txn, hash, self.gc_delay_ms + GC_CHECK_MARGIN_MS)
        else:
            new = old
        if new != old:
            self.tx_rc_set(txn, hash, new)
        return new

    def tx_resync_put(self, txn: Txn, hash: bytes, delay_ms: int) -> bytes:
        """Queue a resync of `hash` at now + `delay_ms`; returns the queue key."""
        key = fastpath.queue_key_encode(self.now_ms() + max(0, int(delay_ms)), hash)
        txn.put(key, b"", db=self.resync)
        self._resync_touched = True
        return key

    def tx_put_inline(self, txn: Txn, hash: bytes, data: bytes) -> bool:
        """Store a small block in the `blocks` db; False when already there."""
        return txn.put(hash, data, db=self.blocks, overwrite=False)

    def tx_error_record(self, txn: Txn, hash: bytes, message: str) -> ErrorEntry:
        """Count one more failure; the retry time backs off 1 min, 2, 4… capped at 1 h."""
        raw = txn.get(hash, db=self.errors)
        count = (_decode_error(hash, raw).count if raw is not None else 0) + 1
        now = self.now_ms()
        delay_ms = int(min(RETRY_BASE_S * 2 ** (count - 1), RETRY_MAX_S) * 1000)
        entry = ErrorEntry(hash, count, now + delay_ms, now, message[:500])
        txn.put(hash, msgpack.packb([count, entry.next_try_ms, now, entry.message]), db=self.errors)
        return entry

    # --------------------------------------------------------- async operations

    async def apply_ref(self, ref: RefEntry) -> bool:
        """Merge a reference version durably (see `tx_apply_ref`)."""
        return await self.submit(lambda txn: self.tx_apply_ref(txn, ref))

    async def apply_refs(self, refs: list[RefEntry]) -> int:
        """Merge many reference versions in one commit; returns how many changed."""
        return await self.submit(lambda txn: sum(self.tx_apply_ref(txn, r) for r in refs))

    async def add_ref(self, hash: bytes, ref_id: str, ts_ms: int | None = None) -> bool:
        """Add a live reference at `ts_ms` (default now)."""
        ts = self.now_ms() if ts_ms is None else ts_ms
        return await self.apply_ref(RefEntry(hash, ref_id, False, ts))

    async def del_ref(self, hash: bytes, ref_id: str, ts_ms: int | None = None) -> bool:
        """Delete a reference at `ts_ms` (default now); a tombstone is kept for LWW."""
        ts = self.now_ms() if ts_ms is None else ts_ms
        return await self.apply_ref(RefEntry(hash, ref_id, True, ts))

    async def incref(self, hash: bytes) -> RcEntry:
        """Increment the RC of a block directly (no reference record)."""
        return await self.submit(lambda txn: self.tx_incref(txn, hash))

    async def decref(self, hash: bytes) -> RcEntry:
        """Decrement the RC of a block directly (no reference record)."""
        return await self.submit(lambda txn: self.tx_decref(txn, hash))

    async def clear_deleted(self, hash: bytes) -> bool:
        """Drop the RC entry if Deletable and past its time."""
        return await self.submit(lambda txn: self.tx_clear_deleted(txn, hash))

    async def recalculate_rc(self, hash: bytes) -> RcEntry:
        """Recompute the RC of one block from its references."""
        return await self.submit(lambda txn: self.tx_recalculate_rc(txn, hash))

    async def put_inline(self, hash: bytes, data: bytes) -> bool:
        """Store a small block durably in LMDB."""
        return await self.submit(lambda txn: self.tx_put_inline(txn, hash, data))

    async def delete_inline(self, hash: bytes) -> bool:
        """Remove a small block."""
        return await self.submit(lambda txn: txn.delete(hash, db=self.blocks))

    async def resync_put(self, hash: bytes, delay_s: float = 0.0) -> bytes:
        """Queue a resync of `hash` after `delay_s` seconds; returns the queue key."""
        return await self.submit(lambda txn: self.tx_resync_put(txn, hash, int(delay_s * 1000)))

    async def resync_put_many(self, hashes: list[bytes], delay_s: float = 0.0) -> None:
        """Queue many resyncs in one commit."""
        def fn(txn: Txn) -> None:
            for h in hashes:
                self.tx_resync_put(txn, h, int(delay_s * 1000))
        await self.submit(fn)

    async def resync_complete(self, key: bytes) -> None:
        """Remove a queue entry whose work is done."""
        await self.submit(lambda txn: txn.delete(key, db=self.resync))

    async def resync_requeue(self, key: bytes, delay_s: float) -> bytes:
        """Atomically replace a queue entry by one due after `delay_s` (never lost in between)."""
        _, hash = fastpath.queue_key_decode(key)

        def fn(txn: Txn) -> bytes:
            txn.delete(key, db=self.resync)
            return self.tx_resync_put(txn, hash, int(delay_s * 1000))
        return await self.submit(fn)

    async def error_record(self, hash: bytes, message: str) -> ErrorEntry:
        """Record a resync failure with exponential backoff (see `tx_error_record`)."""
        return await self.submit(lambda txn: self.tx_error_record(txn, hash, message))

    async def error_clear(self, hash: bytes) -> bool:
        """Forget a block's failures (after a success)."""
        return await self.submit(lambda txn: txn.delete(hash, db=self.errors))

    async def state_set(self, name: str, value: Any) -> None:
        """Persist a worker setting or state under `name` (msgpack-able value)."""
        raw = msgpack.packb(value)
        await self.submit(lambda txn: txn.put(name.encode(), raw, db=self.state))

    # ------------------------------------------------------------------- reads

    def _read(self) -> lmdb.Transaction:
        return self.env.begin(write=False, buffers=False)

    def rc_get(self, hash: bytes) -> RcEntry:
        """The RC entry of a block."""
        with self._read() as txn:
            return RcEntry.decode(txn.get(hash, db=self.rc))

    def refs_of(self, hash: bytes) -> list[RefEntry]:
        """Every reference version (live and deleted) of one block."""
        with self._read() as txn:
            return list(self._iter_refs(txn, hash))

    def _iter_refs(self, txn: Txn, hash: bytes) -> Iterator[RefEntry]:
        cur = txn.cursor(db=self.refs)
        if not cur.set_range(hash):
            return
        for key, value in cur:
            if key[:32] != hash:
                break
            yield _decode_ref(key, value)

    def iter_refs(self, prefix: bytes = b"") -> Iterator[RefEntry]:
        """Every reference whose hash starts with `prefix` (one byte = one partition)."""
        with self._read() as txn:
            cur = txn.cursor(db=self.refs)
            if not cur.set_range(prefix):
                return
            for key, value in cur:
                if not key.startswith(prefix):
                    break
                yield _decode_ref(key, value)

    def iter_rc(self) -> Iterator[tuple[bytes, RcEntry]]:
        """Every (hash, RC entry)."""
        with self._read() as txn:
            for key, value in txn.cursor(db=self.rc):
                yield key, RcEntry.decode(value)

    def inline_get(self, hash: bytes) -> bytes | None:
        """A small block's bytes, or None (not verified: the caller verifies)."""
        with self._read() as txn:
            return txn.get(hash, db=self.blocks)

    def inline_exists(self, hash: bytes) -> bool:
        """True when the small block is stored here."""
        with self._read() as txn:
            return txn.get(hash, db=self.blocks) is not None

    def iter_inline(self, start_after: bytes | None = None) -> Iterator[bytes]:
        """Hashes of the small blocks, in order, after `start_after`."""
        with self._read() as txn:
            cur = txn.cursor(db=self.blocks)
            ok = cur.set_range(start_after) if start_after else cur.first()
            if not ok:
                return
            for key in cur.iternext(keys=True, values=False):
                if start_after is not None and key <= start_after:
                    continue
                yield key

    def resync_due(self, now_ms: int | None = None, limit: int = 64) -> list[tuple[bytes, bytes]]:
        """Up to `limit` queue entries due at `now_ms`, oldest first: (key, hash).

        Entries stay in the queue until `resync_complete` or `resync_requeue`.
        """
        now = self.now_ms() if now_ms is None else now_ms
        out = []
        with self._read() as txn:
            for key in txn.cursor(db=self.resync).iternext(keys=True, values=False):
                due, hash = fastpath.queue_key_decode(key)
                if due > now or len(out) >= limit:
                    break
                out.append((key, hash))
        return out

    def resync_next_due(self) -> int | None:
        """The due time (ms) of the first queue entry, or None when the queue is empty."""
        with self._read() as txn:
            cur = txn.cursor(db=self.resync)
            if not cur.first():
                return None
            return fastpath.queue_key_decode(cur.key())[0]

    def error_get(self, hash: bytes) -> ErrorEntry | None:
        """The failure record of a block, if any."""
        with self._read() as txn:
            raw = txn.get(hash, db=self.errors)
        return _decode_error(hash, raw) if raw is not None else None

    def errors_list(self) -> list[ErrorEntry]:
        """Every failure record."""
        with self._read() as txn:
            return [_decode_error(k, v) for k, v in txn.cursor(db=self.errors)]

    def state_get(self, name: str, default: Any = None) -> Any:
        """A persisted worker setting or state, or `default`."""
        with self._read() as txn:
            raw = txn.get(name.encode(), db=self.state)
        return default if raw is None else msgpack.unpackb(raw)

    def counts(self) -> dict[str, int]:
        """Entry counts of every table (for status)."""
        with self._read() as txn:
            return {
                "rc_entries": txn.stat(self.rc)["entries"],
                "refs": txn.stat(self.refs)["entries"],
                "resync_queue": txn.stat(self.resync)["entries"],
                "errors": txn.stat(self.errors)["entries"],
                "inline_blocks": txn.stat(self.blocks)["entries"],
            }


def _ref_key(hash: bytes, ref_id: str) -> bytes:
    if len(hash) != fastpath.HASH_LEN:
        raise MetadataError(f"a block hash is 32 bytes, got {len(hash)}")
    rid = ref_id.encode("utf-8")
    if not rid or len(rid) > MAX_REF_ID_BYTES:
        raise MetadataError(f"a reference id is 1 to {MAX_REF_ID_BYTES} bytes of UTF-8")
    return hash + rid


def _decode_ref(key: bytes, value: bytes) -> RefEntry:
    deleted, ts = _REF_VALUE.unpack(value)
    return RefEntry(bytes(key[:32]), bytes(key[32:]).decode("utf-8"), deleted, ts)


def _decode_error(hash: bytes, raw: bytes) -> ErrorEntry:
    count, next_try, last, message = msgpack.unpackb(raw)
    return ErrorEntry(bytes(hash), count, next_try, last, message)
