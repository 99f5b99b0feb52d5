"""References and reference counts: the `rc` and `refs` tables.

| db     | key                        | value                                    |
|--------|----------------------------|------------------------------------------|
| `rc`   | hash (32)                  | RC entry, Garage's format (see fastpath) |
| `refs` | hash (32) + ref id (utf-8) | 1 byte deleted flag + 8 bytes BE ms      |

A reference change and the RC update it implies happen in one transaction, so
they can never disagree (Garage on sled could not promise that). References
merge by last writer wins on (timestamp, deleted): applying the same or an
older version again changes nothing, so retries and anti-entropy are
idempotent. The RC can always be recalculated from the references (Garage's
`recalculate_rc`).

RC transitions queue the resync checks that follow from them (`ResyncQueue`):
a block going from zero to one reference is checked for arrival after
`incref_resync_delay_ms`, a block becoming Deletable is checked for garbage
collection `GC_CHECK_MARGIN_MS` after its deletion time.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from blocknode import defects, fastpath
from blocknode.errors import MetadataError
from blocknode.protocol import GC_CHECK_MARGIN_MS, MAX_REF_ID_BYTES
from blocknode.storage.env import MetadataEnv, Txn
from blocknode.storage.resync_queue import ResyncQueue

__all__ = [
    "ABSENT",
    "RcEntry",
    "RefEntry",
    "RefTable",
]

_REF_VALUE = struct.Struct(">?Q")
_DIGEST_SIZE = 16


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

    def is_absent(self) -> bool:
        """No RC record at all (never referenced here, or its record was lost)."""
        return self.state == fastpath.RC_ABSENT

    def is_deletable(self, now_ms: int) -> bool:
        """Present: never; Deletable: once its time has passed; Absent: always."""
        if self.state == fastpath.RC_PRESENT:
            return False
        if self.state == fastpath.RC_DELETABLE:
            return now_ms > self.value or bool(defects.ACTIVE and defects.on("e-gc-ignores-delay"))
        return True

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


class RefTable:
    """The `rc` and `refs` tables of one node (see module docstring).

    `now_ms` is the clock for persisted times; `gc_delay_ms` is how long a block
    stays Deletable before it may go; `incref_resync_delay_ms` is when a newly
    referenced block is checked for arrival (the seed's 2 × BLOCK_RW_TIMEOUT).
    """

    def __init__(
        self,
        env: MetadataEnv,
        queue: ResyncQueue,
        *,
        now_ms: Callable[[], int],
        gc_delay_ms: int,
        incref_resync_delay_ms: int,
    ) -> None:
        self.env = env
        self.queue = queue
        self.now_ms = now_ms
        self.gc_delay_ms = gc_delay_ms
        self.incref_resync_delay_ms = incref_resync_delay_ms
        self.rc_db = env.open_db(b"rc")
        self.refs_db = env.open_db(b"refs")

    # -------------------------------------------------- transaction building blocks
    # `tx_*` run inside a write transaction (`MetadataEnv.submit`); storage-internal.

    def tx_rc_get(self, txn: Txn, hash: bytes) -> RcEntry:
        """The RC entry of a block inside `txn`."""
        return RcEntry.decode(txn.get(hash, db=self.rc_db))

    def tx_rc_set(self, txn: Txn, hash: bytes, entry: RcEntry) -> None:
        """Store an RC entry (Absent deletes the key)."""
        raw = entry.encode()
        if raw is None:
            txn.delete(hash, db=self.rc_db)
        else:
            txn.put(hash, raw, db=self.rc_db)

    def _queue_gc_check(self, txn: Txn, hash: bytes) -> None:
        if defects.ACTIVE and defects.on("e-gc-ignores-delay"):
            self.queue.tx_put(txn, hash, 0)  # re-introduced defect: check (and delete) at once
            return
        self.queue.tx_put(txn, hash, self.gc_delay_ms + GC_CHECK_MARGIN_MS)

    def tx_incref(self, txn: Txn, hash: bytes, *, check_later: bool = True) -> RcEntry:
        """Increment; a block going from zero to one is queued for an arrival check.

        `check_later=False` when the block is stored in this same transaction (or
        was before it): there is nothing to wait for.
        """
        old = self.tx_rc_get(txn, hash)
        new = old.increment()
        self.tx_rc_set(txn, hash, new)
        if old.is_zero() and check_later:
            # Someone should send us the block; check later that it arrived, and fetch it if not.
            self.queue.tx_put(txn, hash, self.incref_resync_delay_ms)
        return new

    def tx_decref(self, txn: Txn, hash: bytes) -> RcEntry:
        """Decrement; the last reference makes it Deletable and queues the GC check."""
        new = self.tx_rc_get(txn, hash).decrement(self.now_ms(), self.gc_delay_ms)
        self.tx_rc_set(txn, hash, new)
        if new.state == fastpath.RC_DELETABLE:
            self._queue_gc_check(txn, hash)
        return new

    def tx_clear_deleted(self, txn: Txn, hash: bytes) -> bool:
        """Drop a Deletable RC entry whose time has passed; True if it was dropped."""
        entry = self.tx_rc_get(txn, hash)
        if entry.state == fastpath.RC_DELETABLE and self.now_ms() > entry.value:
            txn.delete(hash, db=self.rc_db)
            return True
        return False

    def tx_apply(self, txn: Txn, ref: RefEntry, *, block_present: bool = False) -> bool:
        """Merge one reference version (last writer wins) and update the RC to match.

        Returns True when the stored version changed. `block_present`: the block is
        stored here already (a put), so no arrival check is queued.
        """
        key = _ref_key(ref.hash, ref.ref_id)
        old_raw = txn.get(key, db=self.refs_db)
        old = _decode_ref(key, old_raw) if old_raw is not None else None
        if not ref.wins_over(old):
            if block_present:
                # A put that lost to a newer version (its reference deleted here before the
                # block arrived): the block must not stay without an RC, never collected.
                self.tx_start_grace(txn, ref.hash)
            return False
        txn.put(key, _REF_VALUE.pack(ref.deleted, ref.ts_ms), db=self.refs_db)
        was_live = old is not None and not old.deleted
        if was_live and ref.deleted:
            self.tx_decref(txn, ref.hash)
        elif not was_live and not ref.deleted:
            self.tx_incref(txn, ref.hash, check_later=not block_present)
        elif block_present and ref.deleted:
            self.tx_start_grace(txn, ref.hash)  # a deleted version stored with its block
        return True

    def tx_apply_many(self, txn: Txn, refs: Iterable[RefEntry]) -> int:
        """`tx_apply` each; returns how many changed."""
        return sum(self.tx_apply(txn, r) for r in refs)

    def tx_recalculate(self, txn: Txn, hash: bytes) -> RcEntry:
        """Set the RC from the live references (Garage's `recalculate_rc`)."""
        live = sum(1 for r in self._iter_hash(txn, hash) if not r.deleted)
        old = self.tx_rc_get(txn, hash)
        if live > 0:
            new = RcEntry(fastpath.RC_PRESENT, live)
        elif old.state == fastpath.RC_PRESENT:
            new = RcEntry(fastpath.RC_DELETABLE, self.now_ms() + self.gc_delay_ms)
            self._queue_gc_check(txn, hash)
        else:
            new = old
        if new != old:
            self.tx_rc_set(txn, hash, new)
        return new

    def tx_start_grace(self, txn: Txn, hash: bytes) -> RcEntry:
        """An Absent RC becomes Deletable after the GC delay (its GC check queued).

        For a block held here with no RC record at all (its metadata was lost, or a
        layout change left it here): its references get the GC delay to come back
        (anti-entropy) before anything may delete it. Any other RC is left alone.
        """
        old = self.tx_rc_get(txn, hash)
        if not old.is_absent():
            return old
        new = RcEntry(fastpath.RC_DELETABLE, self.now_ms() + self.gc_delay_ms)
        self.tx_rc_set(txn, hash, new)
        self._queue_gc_check(txn, hash)
        return new

    def tx_drop_under(self, txn: Txn, prefix: bytes) -> int:
        """Delete every reference row under `prefix`; each block with a live RC becomes
        Deletable after the GC delay (its GC check queued). Returns the rows deleted."""
        keys = []
        cur = txn.cursor(db=self.refs_db)
        if cur.set_range(prefix):
            for k in cur.iternext(values=False):
                if not bytes(k).startswith(prefix):
                    break
                keys.append(bytes(k))
        hashes = {k[:32] for k in keys}
        for k in keys:
            txn.delete(k, db=self.refs_db)
        for h in sorted(hashes):
            if self.tx_rc_get(txn, h).state == fastpath.RC_PRESENT:
                self.tx_rc_set(txn, h, RcEntry(fastpath.RC_DELETABLE,
                                               self.now_ms() + self.gc_delay_ms))
                self._queue_gc_check(txn, h)
        return len(keys)

    # ------------------------------------------------------------------- reads

    def rc_get(self, hash: bytes) -> RcEntry:
        """The RC entry of a block."""
        with self.env.read() as txn:
            return RcEntry.decode(txn.get(hash, db=self.rc_db))

    def refs_of(self, hash: bytes) -> list[RefEntry]:
        """Every reference version (live and deleted) of one block."""
        with self.env.read() as txn:
            return list(self._iter_hash(txn, hash))

    def versions(self, keys: Iterable[tuple[bytes, str]]) -> list[RefEntry | None]:
        """The stored version of each (hash, ref id), None where there is none (one read)."""
        out: list[RefEntry | None] = []
        with self.env.read() as txn:
            for hash, ref_id in keys:
                key = _ref_key(hash, ref_id)
                raw = txn.get(key, db=self.refs_db)
                out.append(_decode_ref(key, raw) if raw is not None else None)
        return out

    def _iter_hash(self, txn: Txn, hash: bytes) -> Iterator[RefEntry]:
        cur = txn.cursor(db=self.refs_db)
        if not cur.set_range(hash):
            return
        for key, value in cur:
            if key[:32] != hash:
                break
            yield _decode_ref(key, value)

    def iter_refs(self, prefix: bytes = b"", *,
                  after: tuple[bytes, str] | None = None) -> Iterator[RefEntry]:
        """Every reference whose hash starts with `prefix` (one byte = one partition).

        In key order, (hash, ref_id as UTF-8 bytes); with `after` = (hash, ref_id),
        only those that come strictly after it (a page cursor).
        """
        start = prefix
        skip = None
        if after is not None:
            skip = _ref_key(*after)
            start = max(start, skip)
        with self.env.read() as txn:
            cur = txn.cursor(db=self.refs_db)
            if not cur.set_range(start):
                return
            for key, value in cur:
                if not key.startswith(prefix):
                    break
                if key == skip:
                    continue
                yield _decode_ref(key, value)

    def iter_rc(self) -> Iterator[tuple[bytes, RcEntry]]:
        """Every (hash, RC entry)."""
        with self.env.read() as txn:
            for key, value in txn.cursor(db=self.rc_db):
                yield key, RcEntry.decode(value)

    def digests(self, prefixes: list[bytes]) -> list[bytes]:
        """A 16-byte BLAKE2b digest of the references under each prefix (blocking).

        Over each reference in key order: hash, ref id length (1 byte), ref id,
        deleted (1 byte), timestamp (8 bytes BE) — which is exactly key + value with
        the length inserted, so two nodes agree iff they hold the same versions.
        """
        out = []
        with self.env.read() as txn:
            cur = txn.cursor(db=self.refs_db)
            for p in prefixes:
                d = hashlib.blake2b(digest_size=_DIGEST_SIZE)
                if cur.set_range(p):
                    for key, value in cur:
                        if not key.startswith(p):
                            break
                        d.update(key[:32] + bytes([len(key) - 32]) + key[32:] + value)
                out.append(d.digest())
        return out

    def referenced_hashes(self, after: bytes | None, limit: int, *,
                          only_nonzero: bool) -> list[bytes]:
        """Up to `limit` distinct hashes > `after` found in `rc` or `refs`, ascending (blocking).

        With `only_nonzero`, RC entries that are not Present are skipped (refs
        still count: a live reference with a lost RC must be seen).
        """
        out: set[bytes] = set()
        start = after + b"\xff" * 256 if after is not None else b""
        with self.env.read() as txn:
            cur = txn.cursor(db=self.rc_db)
            if cur.set_range(start):
                for key, value in cur:
                    if len(out) >= limit:
                        break
                    if only_nonzero and not RcEntry.decode(value).is_nonzero():
                        continue
                    out.add(bytes(key))
            # The largest rc hash bounds the refs scan so the merge stays ordered.
            bound = max(out) if len(out) >= limit else None
            cur = txn.cursor(db=self.refs_db)
            if cur.set_range(start):
                for key in cur.iternext(keys=True, values=False):
                    h = bytes(key[:32])
                    if bound is not None and h > bound:
                        break
                    out.add(h)
                    if bound is None and len(out) >= limit:
                        bound = max(out)
        return sorted(out)[:limit]

    def rc_count(self) -> int:
        """How many RC entries are stored."""
        return self.env.entries(self.rc_db)

    def refs_count(self) -> int:
        """How many reference versions are stored."""
        return self.env.entries(self.refs_db)


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
