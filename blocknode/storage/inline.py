"""The `blocks` and `blocks_zst` tables: small ("inline") blocks, stored in LMDB.

| db           | key       | value                                               |
|--------------|-----------|-----------------------------------------------------|
| `blocks`     | hash (32) | the block's plain bytes                             |
| `blocks_zst` | hash (32) | the block's zstd frame (a compressed block)         |

Blocks of at most `inline_threshold` bytes (plaintext) live here so that they
commit in the same group commit as their reference (`LocalBlocks`). Which table
a block is in says its form: the flag is never inside the value, so the plain
values written before compression existed read exactly as before. A block is in
at most one of the two (`tx_put` removes it from the other). Values are
returned as stored: the caller verifies them (`blocknode.block.from_stored`).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from blocknode.storage.env import Db, MetadataEnv, Txn

__all__ = ["InlineTable"]


class InlineTable:
    """Small blocks by hash, plain or compressed."""

    def __init__(self, env: MetadataEnv) -> None:
        self.env = env
        self.db = env.open_db(b"blocks")
        self.zdb = env.open_db(b"blocks_zst")

    def _db(self, compressed: bool) -> Db:
        return self.zdb if compressed else self.db

    # -------------------------------------------------- transaction building blocks

    def tx_get(self, txn: Txn, hash: bytes) -> tuple[bytes, bool] | None:
        """The stored bytes of a small block and whether they are a zstd frame, or None."""
        raw = txn.get(hash, db=self.db)
        if raw is not None:
            return raw, False
        raw = txn.get(hash, db=self.zdb)
        return (raw, True) if raw is not None else None

    def tx_put(self, txn: Txn, hash: bytes, data: bytes, *, compressed: bool = False,
               overwrite: bool = False) -> bool:
        """Store a small block in its form; without `overwrite`, False when it was already
        there (in either form). Storing it in one form removes the other."""
        if not overwrite and self.tx_get(txn, hash) is not None:
            return False
        txn.delete(hash, db=self._db(not compressed))
        return bool(txn.put(hash, data, db=self._db(compressed), overwrite=True))

    def tx_delete(self, txn: Txn, hash: bytes) -> bool:
        """Remove a small block (either form); False when it was not there."""
        plain = bool(txn.delete(hash, db=self.db))
        return bool(txn.delete(hash, db=self.zdb)) or plain

    # ------------------------------------------------------------------- reads

    def get_form(self, hash: bytes) -> tuple[bytes, bool] | None:
        """A small block's stored bytes and whether they are a zstd frame, or None
        (not verified: the caller verifies)."""
        with self.env.read() as txn:
            return self.tx_get(txn, hash)

    def get(self, hash: bytes) -> bytes | None:
        """A small block's stored bytes (either form), or None."""
        form = self.get_form(hash)
        return form[0] if form is not None else None

    def exists(self, hash: bytes) -> bool:
        """True when the small block is stored here."""
        with self.env.read() as txn:
            return txn.get(hash, db=self.db) is not None or txn.get(hash, db=self.zdb) is not None

    def _iter_db(self, db: Db, start_after: bytes | None) -> Iterator[bytes]:
        with self.env.read() as txn:
            cur = txn.cursor(db=db)
            ok = cur.set_range(start_after) if start_after else cur.first()
            if not ok:
                return
            for key in cur.iternext(keys=True, values=False):
                if start_after is not None and key <= start_after:
                    continue
                yield key

    def iter_hashes(self, start_after: bytes | None = None) -> Iterator[bytes]:
        """Hashes of the small blocks, in order, after `start_after`."""
        last = None
        for h in heapq.merge(self._iter_db(self.db, start_after), self._iter_db(self.zdb, start_after)):
            if h != last:
                yield h
                last = h

    def count(self) -> int:
        """How many small blocks are stored."""
        return self.env.entries(self.db) + self.env.entries(self.zdb)

    def count_compressed(self) -> int:
        """How many of them are stored compressed."""
        return self.env.entries(self.zdb)
