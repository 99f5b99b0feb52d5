"""The node's RPC protocol: message kinds, request field parsers and named limits.

The RPC layer (`blocknode.rpc`) moves messages ``(kind, fields, data)``; this
module says which kinds a node serves, what their fields must look like and how
large things may be. It imports nothing but the error vocabulary and the fast
path (for the hash length), so the node, the workers, the admin handlers, the
client and the storage layer can all use it.

Every parser raises `RemoteProtocolError` (the request is malformed: the caller
gets a ``bad_request`` reply) — never a raw `KeyError`, `TypeError` or
`ValueError`.

Message kinds (fields → reply; ``data`` is the raw payload next to the fields):

| kind               | fields                                    | reply                      |
|--------------------|-------------------------------------------|----------------------------|
| `put_block`        | hash, ref_id?, ts?, z? + data             | stored                     |
| `put_blocks`       | items: [[hash, ref_id, ts, length]], z? + data | stored                |
| `get_block`        | hash, z?                                  | z? + data                  |
| `need_block`       | hash                                      | needed, referenced         |
| `add_ref`/`del_ref`| hash, ref_id, ts                          | changed, had, newer?       |
| `client_put`       | ref_id + data                             | hash                       |
| `client_put_many`  | items: [[ref_id, length]] + data          | hashes, errors             |
| `client_get`       | hash                                      | + data                     |
| `client_ref`       | hash, ref_id, deleted                     | existed                    |
| `status`           | —                                         | the node's status          |
| `ae_digests`, `ae_exchange` | see `blocknode.workers.anti_entropy` (paged exchange) |  |
| `admin_*`          | see `blocknode.admin`                     |                            |
| `admin_rebalance`  | action: start/status, tranquility?        | rebalance status           |

Compression (``z``): a block travels in its stored form. On `put_block`,
``z: true`` says the data is the block's zstd frame (the hash is the
plaintext's; the receiver decompresses within `block_size` and verifies). On
`put_blocks`, ``z`` is a list of booleans, one per row (the row's length is the
frame's). On `get_block`, ``z: true`` in the request says the caller takes a
frame, and ``z: true`` in the reply says the data is one; a request without it
gets the plain bytes. A message without ``z`` is plain, as before.
| `key_put`          | keys: [key rows]                          | changed                    |
| `key_sync`         | digest, keys?: [key rows]                 | digest, keys?              |
| `admin_key_*`      | see `blocknode.keys`                      |                            |
| `layout_sync`      | state (layout state map), digest          | changed, version, digest, state? |
| `admin_layout_*`   | see `blocknode.layout_service`            |                            |

Who may send what (`blocknode.auth`): nodes every kind; a client key only the
client and admin kinds its permissions allow — never a `REPLICA_KINDS` kind.

Reference times (`ts`, ms) are set by the coordinator's hybrid logical clock
(`blocknode.hlc`); a client request carrying one is refused (`refuse_client_ts`).
A replica refuses a version further ahead of its clock than `max_clock_skew`.
Replies about a version: `newer` = ``[deleted, ts]`` when the replica holds a
different version of that reference that wins over the one sent (`put_block`:
one; `put_blocks`: ``[[index, deleted, ts], ...]``); `had` = the reference was
live there before (`add_ref`/`del_ref`); `existed` = it was live on a write node
that answered (`client_ref`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final, NamedTuple

from blocknode import fastpath
from blocknode.errors import RemoteProtocolError

__all__ = [
    "ADD_REF",
    "ADMIN_ANTI_ENTROPY",
    "ADMIN_BLOCK_ERRORS",
    "ADMIN_BLOCK_INFO",
    "ADMIN_BLOCK_PURGE",
    "ADMIN_BLOCK_RETRY_NOW",
    "ADMIN_KEY_CREATE",
    "ADMIN_KEY_DELETE",
    "ADMIN_KEY_LIST",
    "ADMIN_KINDS",
    "ADMIN_LAYOUT_APPLY",
    "ADMIN_LAYOUT_ASSIGN",
    "ADMIN_LAYOUT_HISTORY",
    "ADMIN_LAYOUT_REMOVE",
    "ADMIN_LAYOUT_REVERT",
    "ADMIN_LAYOUT_SHOW",
    "ADMIN_REBALANCE",
    "ADMIN_REPAIR",
    "ADMIN_RESYNC_RUN_ONCE",
    "ADMIN_SCRUB",
    "ADMIN_WORKER_GET",
    "ADMIN_WORKER_LIST",
    "ADMIN_WORKER_SET",
    "AE_DIGESTS",
    "AE_EXCHANGE",
    "ALL_KINDS",
    "CLIENT_GET",
    "CLIENT_GET_DIRECT",
    "CLIENT_KINDS",
    "CLIENT_LAYOUT",
    "CLIENT_PUT_DIRECT",
    "CLIENT_PUT",
    "CLIENT_PUT_MANY",
    "CLIENT_REF",
    "DEFAULT_BLOCK_SIZE",
    "DEL_REF",
    "GC_CHECK_MARGIN_MS",
    "GET_BLOCK",
    "HEAD_MAX",
    "KEY_PUT",
    "KEY_SYNC",
    "LAYOUT_SYNC",
    "MAX_BATCH_ROWS",
    "MAX_REF_ID_BYTES",
    "MAX_TS",
    "NEED_BLOCK",
    "PUT_BLOCK",
    "PUT_BLOCKS",
    "REPLICA_KINDS",
    "STATUS",
    "THREAD_HASH_MIN",
    "BatchItem",
    "block_info_all",
    "get_data",
    "get_flag",
    "get_flags",
    "get_hash",
    "get_int",
    "get_opt_int",
    "get_ref",
    "get_str",
    "max_message_size",
    "parse_batch_items",
    "refuse_client_ts",
]

# ---------------------------------------------------------------- message kinds

# Replica side (node to node), served by the block manager.
PUT_BLOCK: Final = "put_block"
PUT_BLOCKS: Final = "put_blocks"
GET_BLOCK: Final = "get_block"
NEED_BLOCK: Final = "need_block"
ADD_REF: Final = "add_ref"
DEL_REF: Final = "del_ref"
# Reference anti-entropy (node to node).
AE_DIGESTS: Final = "ae_digests"
AE_EXCHANGE: Final = "ae_exchange"
# Client keys (node to node): a key change broadcast, and the keys table's anti-entropy.
KEY_PUT: Final = "key_put"
KEY_SYNC: Final = "key_sync"
# The cluster layout (node to node): gossip of the layout state.
LAYOUT_SYNC: Final = "layout_sync"
# Client-facing: the node coordinates the cluster operation.
CLIENT_PUT: Final = "client_put"
CLIENT_PUT_MANY: Final = "client_put_many"
CLIENT_GET: Final = "client_get"
CLIENT_REF: Final = "client_ref"
CLIENT_LAYOUT: Final = "client_layout"
CLIENT_PUT_DIRECT: Final = "client_put_direct"
CLIENT_GET_DIRECT: Final = "client_get_direct"
STATUS: Final = "status"
# Admin calls (the `python -m blocknode` worker/block/scrub/repair commands).
ADMIN_SCRUB: Final = "admin_scrub"
ADMIN_REPAIR: Final = "admin_repair"
ADMIN_BLOCK_INFO: Final = "admin_block_info"
ADMIN_BLOCK_ERRORS: Final = "admin_block_errors"
ADMIN_BLOCK_RETRY_NOW: Final = "admin_block_retry_now"
ADMIN_BLOCK_PURGE: Final = "admin_block_purge"
ADMIN_WORKER_LIST: Final = "admin_worker_list"
ADMIN_WORKER_GET: Final = "admin_worker_get"
ADMIN_WORKER_SET: Final = "admin_worker_set"
ADMIN_ANTI_ENTROPY: Final = "admin_anti_entropy"
ADMIN_RESYNC_RUN_ONCE: Final = "admin_resync_run_once"
ADMIN_REBALANCE: Final = "admin_rebalance"
ADMIN_KEY_CREATE: Final = "admin_key_create"
ADMIN_KEY_LIST: Final = "admin_key_list"
ADMIN_KEY_DELETE: Final = "admin_key_delete"
ADMIN_LAYOUT_SHOW: Final = "admin_layout_show"
ADMIN_LAYOUT_ASSIGN: Final = "admin_layout_assign"
ADMIN_LAYOUT_REMOVE: Final = "admin_layout_remove"
ADMIN_LAYOUT_APPLY: Final = "admin_layout_apply"
ADMIN_LAYOUT_REVERT: Final = "admin_layout_revert"
ADMIN_LAYOUT_HISTORY: Final = "admin_layout_history"

REPLICA_KINDS: Final = frozenset(
    {PUT_BLOCK, PUT_BLOCKS, GET_BLOCK, NEED_BLOCK, ADD_REF, DEL_REF, AE_DIGESTS, AE_EXCHANGE,
     KEY_PUT, KEY_SYNC, LAYOUT_SYNC}
)
"""Kinds one node sends another (node-internal: refused from any client key)."""
CLIENT_KINDS: Final = frozenset({CLIENT_PUT, CLIENT_PUT_MANY, CLIENT_GET, CLIENT_REF, STATUS,
                                  CLIENT_LAYOUT, CLIENT_PUT_DIRECT, CLIENT_GET_DIRECT})
"""Kinds a client sends the node it talks to (the `*_direct` ones: to a block's replica
itself, see `blocknode.direct`)."""
ADMIN_KINDS: Final = frozenset({
    ADMIN_SCRUB, ADMIN_REPAIR, ADMIN_BLOCK_INFO, ADMIN_BLOCK_ERRORS, ADMIN_BLOCK_RETRY_NOW,
    ADMIN_BLOCK_PURGE, ADMIN_WORKER_LIST, ADMIN_WORKER_GET, ADMIN_WORKER_SET, ADMIN_ANTI_ENTROPY,
    ADMIN_RESYNC_RUN_ONCE, ADMIN_REBALANCE, ADMIN_KEY_CREATE, ADMIN_KEY_LIST, ADMIN_KEY_DELETE,
    ADMIN_LAYOUT_SHOW, ADMIN_LAYOUT_ASSIGN, ADMIN_LAYOUT_REMOVE, ADMIN_LAYOUT_APPLY,
    ADMIN_LAYOUT_REVERT, ADMIN_LAYOUT_HISTORY,
})
"""Kinds of the admin commands (and of `admin_block_info`, which nodes send each other too)."""
ALL_KINDS: Final = REPLICA_KINDS | CLIENT_KINDS | ADMIN_KINDS
"""Every kind a node serves (the RPC layer's own ping is not among them)."""

# ---------------------------------------------------------------------- limits

DEFAULT_BLOCK_SIZE: Final = 1024 * 1024
"""`block_size` when the config sets none: the largest block, and a large put's split size."""

HEAD_MAX: Final = 64 * 1024
"""Largest msgpack head (kind + fields) of one message; the rest of a message is its data."""

MAX_REF_ID_BYTES: Final = 255
"""Longest reference id, in UTF-8 bytes (stored after the hash in the refs table key)."""

MAX_TS: Final = 2**63 - 1
"""Largest timestamp (ms) or other integer field: a signed 64-bit integer, as stored."""

MAX_BATCH_ROWS: Final = 256
"""Most rows in one batch message (`client_put_many`, `put_blocks`).

Chosen so that every reply fits in `HEAD_MAX`: a reply row is a hash (34 bytes)
or an error string, and error strings are cut to share what is left (see
`blocknode.rpc.wire.fit_texts`). A larger batch is refused before any of it is done.
"""

THREAD_HASH_MIN: Final = 64 * 1024
"""Data larger than this (one block, or a batch in total) is hashed or verified in a
worker thread; smaller data is hashed inline (a thread hop would cost more)."""

GC_CHECK_MARGIN_MS: Final = 10_000
"""When a block's last reference goes, its resync check is queued this long after the
GC delay, so the check runs once the block is really deletable."""


def max_message_size(block_size: int) -> int:
    """The hard cap on one message where blocks are at most `block_size` bytes.

    The one place this limit is derived: a node (`RpcNetwork`) and a client
    connection both take it from their config's `block_size`. A message is a
    4-byte head length, a head of at most `HEAD_MAX`, and a payload of at most
    one block (a batch of small blocks is kept within `block_size` too).
    """
    return 4 + HEAD_MAX + block_size


# --------------------------------------------------------------------- parsers


def get_hash(fields: dict[str, Any], name: str = "hash") -> bytes:
    """A 32-byte block hash field."""
    h = fields.get(name)
    if not isinstance(h, bytes) or len(h) != fastpath.HASH_LEN:
        raise RemoteProtocolError(f"field {name!r}: expected a 32-byte block hash")
    return h


def get_str(fields: dict[str, Any], name: str, *, max_bytes: int = MAX_REF_ID_BYTES) -> str:
    """A non-empty string field of at most `max_bytes` UTF-8 bytes."""
    v = fields.get(name)
    if not isinstance(v, str) or not v or len(v.encode()) > max_bytes:
        raise RemoteProtocolError(f"field {name!r}: expected a string of 1 to {max_bytes} bytes")
    return v


def get_int(fields: dict[str, Any], name: str) -> int:
    """A non-negative integer field, at most `MAX_TS` (a bool is not an integer here)."""
    v = fields.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_TS:
        raise RemoteProtocolError(f"field {name!r}: expected a non-negative integer")
    return v


def get_opt_int(fields: dict[str, Any], name: str) -> int | None:
    """An optional integer field: None when absent or null, else as `get_int`."""
    if fields.get(name) is None:
        return None
    return get_int(fields, name)


def get_flag(fields: dict[str, Any], name: str) -> bool:
    """An optional boolean field (absent or null: False)."""
    v = fields.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RemoteProtocolError(f"field {name!r}: expected true or false")
    return v


def get_flags(fields: dict[str, Any], name: str, n: int) -> list[bool]:
    """An optional list of `n` booleans (absent or null: all False)."""
    v = fields.get(name)
    if v is None:
        return [False] * n
    if not isinstance(v, list) or len(v) != n or not all(isinstance(x, bool) for x in v):
        raise RemoteProtocolError(f"field {name!r}: expected a list of {n} booleans")
    return v


def get_ref(fields: dict[str, Any]) -> tuple[str, int]:
    """The reference version a request carries: ``(ref_id, ts)``."""
    return get_str(fields, "ref_id"), get_int(fields, "ts")


def refuse_client_ts(fields: dict[str, Any], kind: str) -> None:
    """A client may not choose a reference time: `ts` in a client request is refused."""
    if "ts" in fields:
        raise RemoteProtocolError(
            f"{kind}: field 'ts' is refused: reference times are set by the cluster, not by clients")


def get_data(data: bytes | None, kind: str, *, block_size: int) -> bytes:
    """The block a request carries as its data: present, at most `block_size` bytes."""
    if data is None:
        raise RemoteProtocolError(f"{kind} carries no data")
    if len(data) > block_size:
        raise RemoteProtocolError(f"block of {len(data)} bytes exceeds block_size {block_size}")
    return data


class BatchItem(NamedTuple):
    """One block of a batch message; `hash` is ``b""`` and `ts` 0 in a client batch
    (not hashed yet; the coordinator sets the time)."""

    hash: bytes
    ref_id: str
    ts: int
    data: bytes


def parse_batch_items(fields: dict[str, Any], data: bytes | None, *, with_hash: bool,
                      block_size: int | None = None) -> list[BatchItem]:
    """Split a batch message: its `items` rows and the blocks' bytes back to back.

    Rows are ``[hash, ref_id, ts, length]`` (`with_hash`: `put_blocks`) or
    ``[ref_id, length]`` (`client_put_many`: a client row carrying a ts is
    refused); the lengths must cover the data exactly. With `block_size`, a
    longer block is refused too.
    """
    rows = fields.get("items")
    if not isinstance(rows, list) or not rows or len(rows) > MAX_BATCH_ROWS:
        raise RemoteProtocolError(f"field 'items': expected a list of 1 to {MAX_BATCH_ROWS} rows")
    payload = data or b""
    view = memoryview(payload)
    out = []
    offset = 0
    for row in rows:
        if not with_hash and isinstance(row, list) and len(row) == 3:
            raise RemoteProtocolError(
                "field 'items': rows are [ref_id, length]; a ts is refused: reference times "
                "are set by the cluster, not by clients")
        if not isinstance(row, list) or len(row) != (4 if with_hash else 2):
            raise RemoteProtocolError("field 'items': malformed row")
        if with_hash:
            h = get_hash({"hash": row[0]})
            ref_id, ts, length = row[1:]
            ts = get_int({"ts": ts}, "ts")
        else:
            h, ts = b"", 0
            ref_id, length = row
        ref_id = get_str({"ref_id": ref_id}, "ref_id")
        length = get_int({"length": length}, "length")
        if block_size is not None and length > block_size:
            raise RemoteProtocolError(f"block of {length} bytes exceeds block_size {block_size}")
        if offset + length > len(payload):
            raise RemoteProtocolError("field 'items': lengths exceed the payload")
        out.append(BatchItem(h, ref_id, ts, bytes(view[offset:offset + length])))
        offset += length
    if offset != len(payload):
        raise RemoteProtocolError("field 'items': lengths do not cover the payload")
    return out


async def block_info_all(call: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]],
                         h: bytes) -> dict[str, Any]:
    """`admin_block_info` of `h` with every page of its references gathered.

    `call(kind, fields)` makes the call (to whichever node) and returns the
    reply's fields. The result is the first reply with ``refs`` complete and
    without the paging key ``refs_more`` (see `blocknode.admin`).
    """
    info = await call(ADMIN_BLOCK_INFO, {"hash": h})
    refs = list(info.get("refs") or [])
    more = info.pop("refs_more", False)
    while more:
        if not refs:
            raise RemoteProtocolError("admin_block_info: more references announced, none sent")
        page = await call(ADMIN_BLOCK_INFO, {"hash": h, "refs_after": refs[-1]["ref_id"]})
        got = page.get("refs") or []
        if not got:
            raise RemoteProtocolError("admin_block_info: more references announced, none sent")
        refs += got
        more = page.get("refs_more", False)
    info["refs"] = refs
    return info
