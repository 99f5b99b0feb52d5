"""The `blocks` table: small ("inline") blocks, stored in LMDB.

| db       | key       | value                                          |
|----------|-----------|------------------------------------------------|
| `blocks` | hash (32) | the block's inline form (`blocknode.block`)    |

Blocks of at most `inline_threshold` bytes live here so that they commit in the
same group commit as their reference (`LocalBlocks`). Values are returned as
stored: the caller verifies them.
"""

from __future__ import annotations

from collections.abc import Iterator

from blocknode.storage.env import MetadataEnv, Txn

__all__ = ["InlineTable"]


class InlineTable:
    """Small blocks by hash."""

    def __init__(self, env: MetadataEnv) -> None:
        self.env = env
        self.db = env.open_db(b"blocks")

    # -------------------------------------------------- transaction building blocks

    def tx_get(self, txn: Txn, hash: bytes) -> bytes | None:
        """The stored bytes of a small block, or None."""
        return txn.get(hash, db=self.db)

    def tx_put(self, txn: Txn, hash: bytes, data: bytes, *, overwrite: bool = False) -> bool:
        """Store a small block; without `overwrite`, False when it was already there."""
        return bool(txn.put(hash, data, db=self.db, overwrite=overwrite))

    def tx_delete(self, txn: Txn, hash: bytes) -> bool:
        """Remove a small block; False when it was not there."""
        return bool(txn.delete(hash, db=self.db))

    # ------------------------------------------------------------------- reads

    def get(self, hash: bytes) -> bytes | None:
        """A small block's stored bytes, or None (not verified: the caller verifies)."""
        with self.env.read() as txn:
            return txn.get(hash, db=self.db)

    def exists(self, hash: bytes) -> bool:
        """True when the small block is stored here."""
        with self.env.read() as txn:
            return txn.get(hash, db=self.db) is not None

    def iter_hashes(self, start_after: bytes | None = None) -> Iterator[bytes]:
        """Hashes of the small blocks, in order, after `start_after`."""
        with self.env.read() as txn:
            cur = txn.cursor(db=self.db)
            ok = cur.set_range(start_after) if start_after else cur.first()
            if not ok:
                return
            for key in cur.iternext(keys=True, values=False):
                if start_after is not None and key <= start_after:
                    continue
                yield key

    def count(self) -> int:
        """How many small blocks are stored."""
        return self.env.entries(self.db)
