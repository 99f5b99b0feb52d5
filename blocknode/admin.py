"""Admin RPC handlers: what `python -m blocknode scrub|repair|block|worker ...` calls.

`Admin` is built by the node from the parts it works on (the metadata, the
local blocks, the layout, the network, the block manager and the
`WorkerRegistry`) and hands the node its handlers (`handlers()`). Every reply
is a dict of plain values. A refused worker setting (`InvalidSetting`) is a
``bad_request``, naming what is valid.

| kind                    | fields                                   | reply                         |
|-------------------------|------------------------------------------|-------------------------------|
| `admin_scrub`           | action: start/pause/resume/cancel/set_tranquility/status, tranquility? | scrub status |
| `admin_repair`          | action: start/status, rc: bool           | repair status (+ started_now) |
| `admin_block_info`      | hash, refs_after?                        | hash, rc, rc_state, present, refs, refs_more, nodes, error? |
| `admin_block_errors`    | —                                        | errors: [...]                 |
| `admin_block_retry_now` | hash? or all: true                       | queued                        |
| `admin_block_purge`     | hash                                     | hash, deleted: [ref ids]      |
| `admin_worker_list`     | —                                        | workers: [row per worker]     |
| `admin_worker_get`      | name?                                    | settings: [{name, value, worker, valid, help}] |
| `admin_worker_set`      | name, value (a number or its text)       | name, value, workers          |
| `admin_anti_entropy`    | —                                        | round statistics              |
| `admin_resync_run_once` | —                                        | processed, queue_length       |

`admin_block_info` pages the references (a popular block has thousands, more
than one message head holds): at most `REFS_PAGE_BYTES` of them per reply, in
ref id order; ``refs_more`` says more follow — ask again with ``refs_after`` =
the last ref id received (`protocol.block_info_all` gathers every page).
"""

from __future__ import annotations

import functools
from typing import Any

import trio

from blocknode.context import NodeContext
from blocknode.errors import BlocknodeError, RemoteProtocolError
from blocknode.layout import Layout
from blocknode.manager import BlockManager, Handler, Network, Reply
from blocknode.protocol import (
    ADMIN_ANTI_ENTROPY,
    ADMIN_BLOCK_ERRORS,
    ADMIN_BLOCK_INFO,
    ADMIN_BLOCK_PURGE,
    ADMIN_BLOCK_RETRY_NOW,
    ADMIN_REPAIR,
    ADMIN_RESYNC_RUN_ONCE,
    ADMIN_SCRUB,
    ADMIN_WORKER_GET,
    ADMIN_WORKER_LIST,
    ADMIN_WORKER_SET,
    HEAD_MAX,
    block_info_all,
    get_hash,
    get_str,
)
from blocknode.storage import ErrorEntry, LocalBlocks, MetadataStore
from blocknode.workers.anti_entropy import AntiEntropy
from blocknode.workers.base import InvalidSetting, WorkerRegistry
from blocknode.workers.repair import Repair
from blocknode.workers.resync import Resync
from blocknode.workers.scrub import Scrub

__all__ = ["Admin", "PurgeError", "error_dict"]

REFS_PAGE_BYTES = HEAD_MAX // 4
"""Encoded reference rows in one `admin_block_info` reply."""
_REF_ROW_OVERHEAD = 40
PURGE_CONCURRENCY = 16
"""References a purge deletes at once."""


class PurgeError(BlocknodeError):
    """A purge could not read the references of a write node: nothing was deleted."""


def _settings_are_bad_requests(fn: Handler) -> Handler:
    @functools.wraps(fn)
    async def wrapper(peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        try:
            return await fn(peer, fields, data)
        except InvalidSetting as exc:
            raise RemoteProtocolError(str(exc)) from None
    return wrapper


def error_dict(e: ErrorEntry) -> dict[str, Any]:
    """A failure record as plain data."""
    return {"hash": e.hash.hex(), "count": e.count, "next_try": e.next_try_ms,
            "last_try": e.last_try_ms, "message": e.message}


class Admin:
    """The admin handlers of one node (see module docstring)."""

    def __init__(
        self,
        *,
        node_id: str,
        layout: Layout,
        net: Network,
        meta: MetadataStore,
        blocks: LocalBlocks,
        manager: BlockManager,
        ctx: NodeContext,
        workers: WorkerRegistry,
        resync: Resync,
        scrub: Scrub,
        repair: Repair,
        anti_entropy: AntiEntropy,
    ) -> None:
        self.node_id = node_id
        self.layout = layout
        self.net = net
        self.meta = meta
        self.blocks = blocks
        self.manager = manager
        self.ctx = ctx
        self.workers = workers
        self.resync = resync
        self.scrub = scrub
        self.repair = repair
        self.anti_entropy = anti_entropy

    def handlers(self) -> dict[str, Handler]:
        """The admin RPC handlers, by message kind."""
        return {kind: _settings_are_bad_requests(h) for kind, h in {
            ADMIN_SCRUB: self.handle_scrub,
            ADMIN_REPAIR: self.handle_repair,
            ADMIN_BLOCK_INFO: self.handle_block_info,
            ADMIN_BLOCK_ERRORS: self.handle_block_errors,
            ADMIN_BLOCK_RETRY_NOW: self.handle_retry_now,
            ADMIN_BLOCK_PURGE: self.handle_purge,
            ADMIN_WORKER_LIST: self.handle_worker_list,
            ADMIN_WORKER_GET: self.handle_worker_get,
            ADMIN_WORKER_SET: self.handle_worker_set,
            ADMIN_ANTI_ENTROPY: self.handle_anti_entropy,
            ADMIN_RESYNC_RUN_ONCE: self.handle_resync_run_once,
        }.items()}

    # ------------------------------------------------------------ scrub / repair

    async def handle_scrub(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Scrub commands; every one answers with the scrub status."""
        action = fields.get("action", "status")
        t = fields.get("tranquility")
        if action == "start":
            return await self.scrub.start(t), None
        if action == "pause":
            return await self.scrub.pause(), None
        if action == "resume":
            return await self.scrub.resume(), None
        if action == "cancel":
            return await self.scrub.cancel(), None
        if action == "set_tranquility":
            if t is None:
                raise RemoteProtocolError("set_tranquility needs a tranquility")
            return await self.scrub.set_tranquility(t), None
        if action == "status":
            return self.scrub.status(), None
        raise RemoteProtocolError(f"unknown scrub action {action!r}")

    async def handle_repair(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Start a repair (`action` start, `rc`) or read its progress (`action` status)."""
        action = fields.get("action", "status")
        if action == "start":
            started = await self.repair.request(rc=bool(fields.get("rc", False)))
            return {**self.repair.status(), "started_now": started}, None
        if action == "status":
            return self.repair.status(), None
        raise RemoteProtocolError(f"unknown repair action {action!r}")

    # ------------------------------------------------------------ blocks

    def _refs_page(self, h: bytes, after: str | None) -> tuple[list[dict[str, Any]], bool]:
        """One page of the references of `h` after ref id `after` (blocking)."""
        rows: list[dict[str, Any]] = []
        size = 0
        for r in self.meta.iter_refs(h, after=(h, after) if after is not None else None):
            row_size = _REF_ROW_OVERHEAD + len(r.ref_id.encode())
            if rows and size + row_size > REFS_PAGE_BYTES:
                return rows, True
            rows.append({"ref_id": r.ref_id, "deleted": r.deleted, "ts": r.ts_ms})
            size += row_size
        return rows, False

    async def handle_block_info(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """What this node knows about one block (its references a page at a time)."""
        h = get_hash(fields)
        after = get_str(fields, "refs_after") if fields.get("refs_after") is not None else None
        rc = self.meta.rc_get(h)
        refs, more = await self.ctx.run_sync(self._refs_page, h, after)
        out: dict[str, Any] = {
            "hash": h.hex(),
            "rc": rc.count,
            "rc_state": rc.describe(),
            "present": await self.blocks.aexists(h),
            "refs": refs,
            "refs_more": more,
            "nodes": list(self.layout.write_nodes(h)),
        }
        err = self.meta.error_get(h)
        if err is not None:
            out["error"] = error_dict(err)
        return out, None

    async def handle_block_errors(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Every block whose resync failed, with its backoff."""
        return {"errors": [error_dict(e) for e in self.meta.errors_list()]}, None

    async def handle_retry_now(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Clear the backoff of one block (`hash`) or of all (`all`) and queue them now."""
        if fields.get("all"):
            return {"queued": await self.resync.retry_now(None)}, None
        return {"queued": await self.resync.retry_now(get_hash(fields))}, None

    async def handle_purge(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Delete every live reference of a block on a write quorum of its nodes.

        The references are gathered from this node and every write node of the
        block (page by page); each is deleted with a timestamp newer than any
        version seen, so the deletion wins everywhere (last writer wins). A
        write node whose references cannot be read fails the purge before
        anything is deleted (`PurgeError`): a live reference it alone holds
        would otherwise survive, and come back everywhere by anti-entropy.
        """
        h = get_hash(fields)
        versions: dict[str, int] = {}
        live: set[str] = set()

        def note(ref_id: str, deleted: bool, ts: int) -> None:
            versions[ref_id] = max(versions.get(ref_id, 0), ts)
            if not deleted:
                live.add(ref_id)

        for r in await self.ctx.run_sync(self.meta.refs_of, h):
            note(r.ref_id, r.deleted, r.ts_ms)
        for nid in self.layout.write_nodes(h):
            if nid == self.node_id:
                continue

            async def call(kind: str, f: dict[str, Any], nid: str = nid) -> dict[str, Any]:
                reply, _ = await self.net.call(nid, kind, f, timeout=self.manager.rpc_timeout)
                return reply

            try:
                info = await block_info_all(call, h)
                for r in info.get("refs", []):
                    note(r["ref_id"], r["deleted"], r["ts"])
            except (BlocknodeError, KeyError, TypeError) as exc:
                raise PurgeError(
                    f"cannot read the references of block {h.hex()} on {nid} (a write node of "
                    f"the block): {exc}; nothing was deleted, try again when it is reachable"
                ) from None
        now = self.meta.now_ms()
        limiter = trio.CapacityLimiter(PURGE_CONCURRENCY)

        async def delete(ref_id: str) -> None:
            async with limiter:
                await self.manager.set_ref(h, ref_id, deleted=True,
                                           ts_ms=max(now, versions[ref_id] + 1))

        async with trio.open_nursery() as nursery:
            for ref_id in sorted(live):
                nursery.start_soon(delete, ref_id)
        return {"hash": h.hex(), "deleted": sorted(live)}, None

    # ------------------------------------------------------------ workers

    async def handle_worker_list(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Every worker: its state, tranquility, settings, errors and own keys."""
        return {"workers": self.workers.rows()}, None

    async def handle_worker_get(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Every worker setting, or the one called `name`."""
        name = fields.get("name")
        settings = self.workers.settings()
        if name is not None:
            # InvalidSetting (bad request) naming the valid ones; Garage's names find theirs
            name = self.workers.setting(name).name
            settings = [s for s in settings if s["name"] == name]
        return {"settings": settings}, None

    async def handle_worker_set(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Change a worker setting at runtime (validated by the setting; persisted)."""
        name = fields.get("name")
        value = await self.workers.set(name, fields.get("value"))
        name = self.workers.setting(name).name  # the setting's own name for Garage's
        return {"name": name, "value": value, "workers": self.workers.rows()}, None

    async def handle_anti_entropy(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Run one anti-entropy round now."""
        return await self.anti_entropy.run_round(), None

    async def handle_resync_run_once(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Process every resync entry due now (tests and probes step with this)."""
        return {"processed": await self.resync.run_once(),
                "queue_length": self.meta.counts()["resync_queue"]}, None
