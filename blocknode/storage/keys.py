"""The `keys` table: the client keys a node accepts, replicated to every node.

| db     | key              | value                                                            |
|--------|------------------|------------------------------------------------------------------|
| `keys` | key id (UTF-8)   | msgpack ``[version, deleted, name, permissions, verifier, created]`` |

A key's secret is never stored: only its verifier (SHA-256 of a key derived
from the secret, see `blocknode.rpc.handshake.ClientKey`), which lets a node
check a client's proof but not make one. A deleted key stays as a tombstone
(``deleted`` true, no name, permissions or verifier) so that its deletion wins
over any older copy a node may still send.

Every node holds the whole table. Records merge by last writer wins: the higher
``version`` (milliseconds, set by the node that made the change) wins; on a tie
a deletion wins; on a full tie the larger encoding (any fixed order converges).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from blocknode import fastpath
from blocknode.errors import CorruptEntry
from blocknode.storage.env import MetadataEnv, Txn

__all__ = ["KeyRecord", "KeyTable"]


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One client key as every node stores it (or its tombstone)."""

    id: str
    version: int
    deleted: bool = False
    name: str = ""
    permissions: tuple[str, ...] = ()
    verifier: bytes = b""
    created_ms: int = 0

    def encode(self) -> bytes:
        """The stored value (the id is the table's key)."""
        return msgpack.packb([self.version, self.deleted, self.name, list(self.permissions),
                              self.verifier, self.created_ms], use_bin_type=True)

    @classmethod
    def decode(cls, key_id: str, raw: bytes) -> KeyRecord:
        """A stored value back; `CorruptEntry` if it is not one."""
        try:
            version, deleted, name, perms, verifier, created = msgpack.unpackb(raw, raw=False)
            return cls(key_id, int(version), bool(deleted), str(name),
                       tuple(str(p) for p in perms), bytes(verifier), int(created))
        except Exception as exc:
            raise CorruptEntry(f"keys table: entry {key_id!r} is malformed") from exc

    def tombstone(self, version: int) -> KeyRecord:
        """This key deleted at `version`: nothing but its id is kept."""
        return KeyRecord(self.id, version, deleted=True)

    def wins_over(self, other: KeyRecord) -> bool:
        """True when this version replaces `other` (last writer wins, then deletion)."""
        return (self.version, self.deleted, self.encode()) > (other.version, other.deleted,
                                                              other.encode())


class KeyTable:
    """The client keys of the cluster as this node knows them."""

    def __init__(self, env: MetadataEnv) -> None:
        self.env = env
        self.db = env.open_db(b"keys")

    # -------------------------------------------------- transaction building blocks

    def tx_get(self, txn: Txn, key_id: str) -> KeyRecord | None:
        raw = txn.get(key_id.encode(), db=self.db)
        return None if raw is None else KeyRecord.decode(key_id, raw)

    def tx_merge(self, txn: Txn, records: list[KeyRecord]) -> list[KeyRecord]:
        """Apply each record that wins over the stored one; returns those applied."""
        changed = []
        for rec in records:
            old = self.tx_get(txn, rec.id)
            if old is None or rec.wins_over(old):
                txn.put(rec.id.encode(), rec.encode(), db=self.db)
                changed.append(rec)
        return changed

    # ------------------------------------------------------------------- writes

    async def merge(self, records: list[KeyRecord]) -> list[KeyRecord]:
        """Merge records (from a key command, a peer's broadcast or a sync), durably;
        returns the ones that changed this table."""
        return await self.env.submit(lambda txn: self.tx_merge(txn, records))

    async def add_if_absent(self, record: KeyRecord) -> bool:
        """Store `record` only when its id is unknown here (not even as a tombstone)."""
        def fn(txn: Txn) -> bool:
            if self.tx_get(txn, record.id) is not None:
                return False
            txn.put(record.id.encode(), record.encode(), db=self.db)
            return True
        return await self.env.submit(fn)

    # ------------------------------------------------------------------- reads

    def get(self, key_id: str) -> KeyRecord | None:
        """The record of `key_id` (a tombstone too), or None."""
        with self.env.read() as txn:
            return self.tx_get(txn, key_id)

    def all(self) -> list[KeyRecord]:
        """Every record, tombstones included, in id order."""
        with self.env.read() as txn:
            return [KeyRecord.decode(k.decode(), v) for k, v in txn.cursor(db=self.db)]

    def digest(self) -> bytes:
        """A digest of the whole table: equal on two nodes when they hold the same records."""
        with self.env.read() as txn:
            body = b"".join(len(k).to_bytes(2, "big") + k + len(v).to_bytes(4, "big") + v
                            for k, v in txn.cursor(db=self.db))
        return fastpath.block_hash(body)

    def count(self) -> int:
        """How many records (tombstones included)."""
        return self.env.entries(self.db)

