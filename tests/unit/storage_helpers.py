"""Test-only shortcuts into the storage package: reference and RC changes without a put.

The node itself changes references only through its handlers (a put with its
reference, `add_ref` / `del_ref`, anti-entropy merges); tests set up states
directly with these. Each runs one transaction of the real ``tx_*`` building
blocks, so the RC and the queue follow exactly as in the node.
"""

from __future__ import annotations

from blocknode.storage import MetadataStore, RcEntry, RefEntry


async def add_ref(meta: MetadataStore, h: bytes, ref_id: str, ts_ms: int | None = None) -> bool:
    """Add a live reference at `ts_ms` (default now); True if the stored version changed."""
    ref = RefEntry(h, ref_id, False, meta.now_ms() if ts_ms is None else ts_ms)
    return await meta.env.submit(lambda txn: meta.refs.tx_apply(txn, ref))


async def del_ref(meta: MetadataStore, h: bytes, ref_id: str, ts_ms: int | None = None) -> bool:
    """Delete a reference at `ts_ms` (default now); a tombstone is kept for LWW."""
    ref = RefEntry(h, ref_id, True, meta.now_ms() if ts_ms is None else ts_ms)
    return await meta.env.submit(lambda txn: meta.refs.tx_apply(txn, ref))


async def incref(meta: MetadataStore, h: bytes) -> RcEntry:
    """Increment the RC of a block directly (no reference record)."""
    return await meta.env.submit(lambda txn: meta.refs.tx_incref(txn, h))


async def decref(meta: MetadataStore, h: bytes) -> RcEntry:
    """Decrement the RC of a block directly (no reference record)."""
    return await meta.env.submit(lambda txn: meta.refs.tx_decref(txn, h))
