"""Background workers of a node: installed on a `Node` by `install_workers`.

Workers (each a task of the node's nursery): ``resync`` (its own nursery of
`resync_workers` tasks), ``scrub``, ``repair`` and ``anti-entropy``. They are
reachable as `node.background` (a `Background`).

RPC kinds registered (admin calls come from `python -m blocknode ...` through
`Client.call`; every reply is a dict of plain values):

| kind                    | fields                                   | reply                         |
|-------------------------|------------------------------------------|-------------------------------|
| `ae_digests`            | prefixes: [bytes]                        | digests: [bytes]              |
| `ae_exchange`           | prefix, refs: [[hash, ref_id, del, ts]]  | refs, changed                 |
| `admin_scrub`           | action: start/pause/resume/cancel/set_tranquility/status, tranquility? | scrub status |
| `admin_repair`          | action: start/status, rc: bool           | repair status (+ started)     |
| `admin_block_info`      | hash                                     | hash, rc, rc_state, present, refs, nodes, error? |
| `admin_block_errors`    | —                                        | errors: [...]                 |
| `admin_block_retry_now` | hash? or all: true                       | queued                        |
| `admin_block_purge`     | hash                                     | deleted: [ref ids]            |
| `admin_worker_list`     | —                                        | workers: [...]                |
| `admin_worker_set`      | name: resync-workers/resync-tranquility/scrub-tranquility, value | workers |
| `admin_anti_entropy`    | —                                        | round statistics              |
| `admin_resync_run_once` | —                                        | processed                     |
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from blocknode.errors import BlocknodeError, RemoteProtocolError
from blocknode.manager import Reply
from blocknode.protocol import (
    ADMIN_ANTI_ENTROPY,
    ADMIN_BLOCK_ERRORS,
    ADMIN_BLOCK_INFO,
    ADMIN_BLOCK_PURGE,
    ADMIN_BLOCK_RETRY_NOW,
    ADMIN_REPAIR,
    ADMIN_RESYNC_RUN_ONCE,
    ADMIN_SCRUB,
    ADMIN_WORKER_LIST,
    ADMIN_WORKER_SET,
    get_hash,
)
from blocknode.storage import ErrorEntry
from blocknode.workers.anti_entropy import AntiEntropy
from blocknode.workers.repair import Repair
from blocknode.workers.resync import Resync
from blocknode.workers.scrub import Scrub

if TYPE_CHECKING:
    from blocknode.node import Node

AdminHandler = Callable[[str, dict[str, Any], bytes | None], Awaitable[Reply]]


def _bad_args_are_protocol_errors(fn: AdminHandler) -> AdminHandler:
    @functools.wraps(fn)
    async def wrapper(peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        try:
            return await fn(peer, fields, data)
        except (ValueError, TypeError) as exc:
            raise RemoteProtocolError(str(exc)) from None
    return wrapper


def error_dict(e: ErrorEntry) -> dict[str, Any]:
    """A failure record as plain data."""
    return {"hash": e.hash.hex(), "count": e.count, "next_try": e.next_try_ms,
            "last_try": e.last_try_ms, "message": e.message}


class Background:
    """Every background worker of one node and its admin handlers."""

    def __init__(self, node: Node) -> None:
        cfg = node.cfg
        self.node = node
        self.meta = node.meta
        self.manager = node.manager
        self.resync = Resync(node.manager, need_block_timeout=cfg.need_block_timeout,
                             workers=cfg.resync_workers, tranquility=cfg.resync_tranquility)
        self.scrub = Scrub(node.manager, tranquility=cfg.scrub_tranquility,
                           interval=cfg.scrub_interval)
        self.repair = Repair(node.meta, node.blocks)
        self.anti_entropy = AntiEntropy(node.manager, interval=cfg.anti_entropy_interval,
                                        rpc_timeout=cfg.rpc_timeout)

    def install(self) -> None:
        """Register the handlers and the worker tasks on the node."""
        node = self.node
        for kind, h in self.anti_entropy.handlers().items():
            node.register(kind, h)
        for kind, h in {
            ADMIN_SCRUB: self.handle_scrub,
            ADMIN_REPAIR: self.handle_repair,
            ADMIN_BLOCK_INFO: self.handle_block_info,
            ADMIN_BLOCK_ERRORS: self.handle_block_errors,
            ADMIN_BLOCK_RETRY_NOW: self.handle_retry_now,
            ADMIN_BLOCK_PURGE: self.handle_purge,
            ADMIN_WORKER_LIST: self.handle_worker_list,
            ADMIN_WORKER_SET: self.handle_worker_set,
            ADMIN_ANTI_ENTROPY: self.handle_anti_entropy,
            ADMIN_RESYNC_RUN_ONCE: self.handle_resync_run_once,
        }.items():
            node.register(kind, _bad_args_are_protocol_errors(h))
        node.add_worker("resync", self.resync.run)
        node.add_worker("scrub", self.scrub.run)
        node.add_worker("repair", self.repair.run)
        node.add_worker("anti-entropy", self.anti_entropy.run)

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

    async def handle_block_info(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """What this node knows about one block."""
        h = get_hash(fields)
        rc = self.meta.rc_get(h)
        out: dict[str, Any] = {
            "hash": h.hex(),
            "rc": rc.count,
            "rc_state": rc.describe(),
            "present": await self.node.blocks.aexists(h),
            "refs": [{"ref_id": r.ref_id, "deleted": r.deleted, "ts": r.ts_ms}
                     for r in self.meta.refs_of(h)],
            "nodes": list(self.node.layout.write_nodes(h)),
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

        The references are gathered from this node and every reachable write
        node of the block; each is deleted with a timestamp newer than any
        version seen, so the deletion wins everywhere (last writer wins).
        """
        h = get_hash(fields)
        versions: dict[str, int] = {}
        live: set[str] = set()

        def note(ref_id: str, deleted: bool, ts: int) -> None:
            versions[ref_id] = max(versions.get(ref_id, 0), ts)
            if not deleted:
                live.add(ref_id)

        for r in self.meta.refs_of(h):
            note(r.ref_id, r.deleted, r.ts_ms)
        for nid in self.node.layout.write_nodes(h):
            if nid == self.node.node_id:
                continue
            try:
                reply, _ = await self.node.net.call(nid, ADMIN_BLOCK_INFO, {"hash": h},
                                                    timeout=self.manager.rpc_timeout)
            except BlocknodeError:
                continue
            for r in reply.get("refs", []):
                note(r["ref_id"], r["deleted"], r["ts"])
        now = self.meta.now_ms()
        for ref_id in sorted(live):
            await self.manager.set_ref(h, ref_id, deleted=True,
                                       ts_ms=max(now, versions[ref_id] + 1))
        return {"hash": h.hex(), "deleted": sorted(live)}, None

    # ------------------------------------------------------------ workers

    def worker_list(self) -> list[dict[str, Any]]:
        """Every background task with its state and settings."""
        r = self.resync.info()
        s = self.scrub.status()
        rep = self.repair.status()
        ae = self.anti_entropy.info()
        return [
            {"name": "resync", "state": "busy" if r["in_progress"] else "idle",
             "tranquility": r["tranquility"], "workers": r["workers"],
             "queue_length": r["queue_length"], "errors": r["errors"],
             "processed": r["processed"], "failed": r["failed"],
             "worker_states": r["worker_states"]},
            {"name": "scrub", "state": s["state"], "tranquility": s["tranquility"],
             "blocks_checked": s["blocks_checked"], "corruptions": s["corruptions"],
             "progress": s["progress"], "next_run": s["next_run"]},
            {"name": "repair", "state": rep["state"], "tranquility": None, "phase": rep["phase"],
             "queued": rep["queued"]},
            {"name": "anti-entropy", "state": "idle", "tranquility": None,
             "interval": ae["interval"], "rounds": ae["rounds"], "last_round": ae["last_round"]},
        ]

    async def handle_worker_list(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Every background task, its state, tranquility and queue lengths."""
        return {"workers": self.worker_list()}, None

    async def handle_worker_set(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Change a worker setting at runtime (persisted)."""
        name, value = fields.get("name"), fields.get("value")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise RemoteProtocolError("value: expected a number")
        if name == "resync-workers":
            if int(value) != value:
                raise RemoteProtocolError("resync-workers: expected an integer")
            await self.resync.set_workers(int(value))
        elif name == "resync-tranquility":
            await self.resync.set_tranquility(value)
        elif name == "scrub-tranquility":
            await self.scrub.set_tranquility(value)
        else:
            raise RemoteProtocolError(
                f"unknown setting {name!r} (resync-workers, resync-tranquility, scrub-tranquility)")
        return {"workers": self.worker_list()}, None

    async def handle_anti_entropy(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Run one anti-entropy round now."""
        return await self.anti_entropy.run_round(), None

    async def handle_resync_run_once(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Process every resync entry due now (tests and probes step with this)."""
        return {"processed": await self.resync.run_once(),
                "queue_length": self.meta.counts()["resync_queue"]}, None


def install_workers(node: Node) -> None:
    """Register the node's background workers and their admin RPC handlers."""
    node.background = Background(node)  # type: ignore[attr-defined]
    node.background.install()  # type: ignore[attr-defined]


__all__ = ["Background", "install_workers", "error_dict"]
