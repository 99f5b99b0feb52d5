"""The resync queue and the error records of blocks whose resync failed.

| db       | key                           | value                                          |
|----------|-------------------------------|------------------------------------------------|
| `resync` | 8 bytes BE due ms + hash (40) | empty                                          |
| `errors` | hash (32)                     | msgpack [count, next_try_ms, last_ms, message] |

An entry leaves the queue only once its work is done (`complete`) or it has
been replaced atomically by a later one (`requeue`), so a crash never loses
one. Failures back off exponentially (`retry_delay_ms`: 1 min, 2, 4 … capped
at 1 h); the exponent is clamped, the stored count capped and an unreadable
record read as no failures, so nothing — however many failures — can make
recording one more fail. This module is the only codec of `errors` records.

Every change to the queue fires `changed` (a `Notify`) once committed, so
waiting workers see new work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgpack

from blocknode import fastpath
from blocknode.notify import Notify
from blocknode.storage.env import MetadataEnv, Txn

__all__ = [
    "ERROR_COUNT_MAX",
    "RETRY_BASE_MS",
    "RETRY_MAX_MS",
    "ErrorEntry",
    "ResyncQueue",
    "retry_delay_ms",
]

RETRY_BASE_MS = 60_000
"""The delay after a block's first failure."""
RETRY_MAX_MS = 3_600_000
"""The longest delay between two tries of a failing block."""
_MAX_EXPONENT = (RETRY_MAX_MS // RETRY_BASE_MS).bit_length()
"""Doublings past which the delay is capped anyway (2**6 minutes > 1 h)."""
ERROR_COUNT_MAX = 1_000_000
"""The stored failure count stops growing here (it only informs the operator)."""
MESSAGE_MAX = 500
"""Characters of the last failure message kept."""


def retry_delay_ms(count: int) -> int:
    """The backoff after the `count`-th failure in a row: 1 min, 2, 4 … capped at 1 h.

    Defined for any count: the exponent is clamped before it is used (an
    unclamped ``2 ** (count - 1)`` overflowed a float at the 1025th failure).
    """
    exponent = min(max(count, 1) - 1, _MAX_EXPONENT)
    return min(RETRY_BASE_MS << exponent, RETRY_MAX_MS)


@dataclass(frozen=True)
class ErrorEntry:
    """A block whose resync failed: how often, when to retry, and why."""

    hash: bytes
    count: int
    next_try_ms: int
    last_try_ms: int
    message: str


def encode_error(e: ErrorEntry) -> bytes:
    """The stored form of an error record."""
    return msgpack.packb([e.count, e.next_try_ms, e.last_try_ms, e.message])


def decode_error(hash: bytes, raw: bytes) -> ErrorEntry:
    """Decode a stored error record."""
    count, next_try, last, message = msgpack.unpackb(raw)
    return ErrorEntry(bytes(hash), count, next_try, last, message)


def _lenient_count(hash: bytes, raw: bytes) -> int:
    # The failure path must not fail: an unreadable record counts as no failures.
    try:
        count = decode_error(hash, raw).count
    except (ValueError, TypeError, msgpack.UnpackException):
        return 0
    return min(count, ERROR_COUNT_MAX) if isinstance(count, int) and count > 0 else 0


class ResyncQueue:
    """The `resync` and `errors` tables of one node (see module docstring)."""

    def __init__(self, env: MetadataEnv, *, now_ms: Callable[[], int]) -> None:
        self.env = env
        self.now_ms = now_ms
        self.queue_db = env.open_db(b"resync")
        self.errors_db = env.open_db(b"errors")
        self.changed = Notify()
        """Fired after every commit that changed the queue."""

    # -------------------------------------------------- transaction building blocks

    def tx_put(self, txn: Txn, hash: bytes, delay_ms: int) -> bytes:
        """Queue a resync of `hash` at now + `delay_ms`; returns the queue key."""
        key = fastpath.queue_key_encode(self.now_ms() + max(0, int(delay_ms)), hash)
        txn.put(key, b"", db=self.queue_db)
        self.env.wake_after_commit(self.changed)
        return key

    def tx_error_record(self, txn: Txn, hash: bytes, message: str) -> ErrorEntry:
        """Count one more failure and set the next try (`retry_delay_ms`)."""
        raw = txn.get(hash, db=self.errors_db)
        previous = _lenient_count(hash, raw) if raw is not None else 0
        count = min(previous + 1, ERROR_COUNT_MAX)
        now = self.now_ms()
        entry = ErrorEntry(hash, count, now + retry_delay_ms(count), now, message[:MESSAGE_MAX])
        txn.put(hash, encode_error(entry), db=self.errors_db)
        return entry

    # --------------------------------------------------------- async operations

    async def put(self, hash: bytes, delay_s: float = 0.0) -> bytes:
        """Queue a resync of `hash` after `delay_s` seconds; returns the queue key."""
        return await self.env.submit(lambda txn: self.tx_put(txn, hash, int(delay_s * 1000)))

    async def put_many(self, hashes: Iterable[bytes], delay_s: float = 0.0) -> None:
        """Queue many resyncs in one commit."""
        hs = list(hashes)

        def fn(txn: Txn) -> None:
            for h in hs:
                self.tx_put(txn, h, int(delay_s * 1000))
        await self.env.submit(fn)

    async def complete(self, key: bytes) -> None:
        """Remove a queue entry whose work is done."""
        await self.env.submit(lambda txn: txn.delete(key, db=self.queue_db))

    async def requeue(self, key: bytes, delay_s: float) -> bytes:
        """Atomically replace a queue entry by one due after `delay_s` (never lost in between)."""
        _, hash = fastpath.queue_key_decode(key)

        def fn(txn: Txn) -> bytes:
            txn.delete(key, db=self.queue_db)
            return self.tx_put(txn, hash, int(delay_s * 1000))
        return await self.env.submit(fn)

    async def error_record(self, hash: bytes, message: str) -> ErrorEntry:
        """Record a resync failure with exponential backoff (see `tx_error_record`)."""
        return await self.env.submit(lambda txn: self.tx_error_record(txn, hash, message))

    async def error_clear(self, hash: bytes) -> bool:
        """Forget a block's failures (after a success)."""
        return await self.env.submit(lambda txn: txn.delete(hash, db=self.errors_db))

    async def retry_now(self, hashes: list[bytes]) -> int:
        """Clear the backoff of these blocks and queue each now; returns how many.

        The failure count is kept (the next failure backs off from there).
        """
        now = self.now_ms()

        def fn(txn: Txn) -> None:
            for h in hashes:
                raw = txn.get(h, db=self.errors_db)
                if raw is not None:
                    e = decode_error(h, raw)
                    txn.put(h, encode_error(ErrorEntry(h, e.count, now, e.last_try_ms, e.message)),
                            db=self.errors_db)
                self.tx_put(txn, h, 0)

        if hashes:
            await self.env.submit(fn)
        return len(hashes)

    # ------------------------------------------------------------------- reads

    def due(self, now_ms: int | None = None, limit: int = 64) -> list[tuple[bytes, bytes]]:
        """Up to `limit` queue entries due at `now_ms`, oldest first: (key, hash).

        Entries stay in the queue until `complete` or `requeue`.
        """
        now = self.now_ms() if now_ms is None else now_ms
        out = []
        with self.env.read() as txn:
            for key in txn.cursor(db=self.queue_db).iternext(keys=True, values=False):
                due, hash = fastpath.queue_key_decode(key)
                if due > now or len(out) >= limit:
                    break
                out.append((key, hash))
        return out

    def next_due(self) -> int | None:
        """The due time (ms) of the first queue entry, or None when the queue is empty."""
        with self.env.read() as txn:
            cur = txn.cursor(db=self.queue_db)
            if not cur.first():
                return None
            return fastpath.queue_key_decode(cur.key())[0]

    def error_get(self, hash: bytes) -> ErrorEntry | None:
        """The failure record of a block, if any."""
        with self.env.read() as txn:
            raw = txn.get(hash, db=self.errors_db)
        return decode_error(hash, raw) if raw is not None else None

    def errors_list(self) -> list[ErrorEntry]:
        """Every failure record."""
        with self.env.read() as txn:
            return [decode_error(k, v) for k, v in txn.cursor(db=self.errors_db)]

    def count(self) -> int:
        """Entries in the queue."""
        return self.env.entries(self.queue_db)

    def errors_count(self) -> int:
        """Failure records."""
        return self.env.entries(self.errors_db)
