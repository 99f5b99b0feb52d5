"""Resync: the workers that make each block's presence here match its reference count.

The queue is the LMDB `resync` table, ordered by due time (`ResyncQueue`); an
entry leaves it only once its work is done (`resync_complete`) or it has been
requeued atomically (`resync_requeue`), so a crash never loses one. For each
due block (`resync_block`, the seed's logic):

- held here with no RC record at all (the metadata was lost, or a layout
  change left it here), even after recalculating it from the references: it
  gets a grace period, Deletable after the GC delay, for its references to
  come back (anti-entropy) before anything may delete it.
- held here and deletable (rc zero and past the GC delay): recalculate the RC
  from the references first; if still deletable, ask every *other* write node
  of the block whether it needs it and whether it references it
  (`need_block`, timeout `need_block_timeout`), send it to those that need it,
  then delete it locally if it is still deletable under the block's lock, and
  drop the Deletable RC entry. During a layout migration the write nodes are
  those of every live version (`LiveLayout.write_nodes`): every live version
  must agree the block is unneeded. Any failed query fails the resync: we never
  delete without having reached every other write node (hence never with
  fewer than the write quorum reachable). A write node deletes only what
  another write node confirmed it does not reference, or — as the only write
  node of the block — what its own references say was released here (a
  tombstone); a block it has no record of is kept (a lost metadata store must
  never cost the only copy).
- needed here (rc > 0) and absent: fetch it from the other nodes of the block
  and store it.

A failure is recorded in the `errors` table (1 min, 2, 4… capped at 1 h) and
the entry requeued at the next try; success clears the record. An entry whose
block is still backing off is pushed to its next try without work (`block
retry-now` clears the backoff).

Any exception from one block's resync — a peer down, or a bug tripped by that
block — moves its entry aside the same way (errors table, backoff), so a bad
entry is never retried in a tight loop and never stops the node. Each worker
step (claim an entry, handle it, rest) runs under the worker's `Supervisor`,
which also catches what escapes a step (e.g. the metadata store failing) and
backs off.

`n` worker tasks (setting ``resync-workers``, persisted in the `state` table)
sleep until the next due entry or until `meta.resync_notify` fires
(sequence-numbered: a commit between a worker's look at the queue and its wait
still wakes it); they claim a block through an in-memory in-progress set, so
two workers never handle the same block at once. A `Tranquilizer` rests
between steps (setting ``resync-tranquility``). `run_once` processes everything
due now (tests, `admin_resync_run_once`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import trio

from blocknode import block, defects
from blocknode.context import NodeContext
from blocknode.errors import BlocknodeError, RpcError
from blocknode.manager import BlockManager
from blocknode.notify import Notify
from blocknode.rpc.wire import PRIO_BACKGROUND
from blocknode.storage.resync_queue import RETRY_MAX_MS
from blocknode.tranquilizer import Tranquilizer
from blocknode.workers.anti_entropy import exchange_range
from blocknode.workers.base import Setting, Worker

log = logging.getLogger(__name__)

_DUE_LOOKAHEAD = 16
"""Due entries read beyond those in progress, to find one no worker is handling."""

STATE_WORKERS = "resync_workers"
STATE_TRANQUILITY = "resync_tranquility"
MAX_WORKERS = 64
MIN_STEP_S = 0.005
"""Resync steps shorter than this are merged into one tranquilizer step (see Tranquilizer)."""


class ResyncError(BlocknodeError):
    """A resync step could not complete (the block is retried after a backoff)."""



class Resync(Worker):
    """The resync queue processor of one node (see module docstring)."""

    name = "resync"

    def __init__(
        self,
        manager: BlockManager,
        ctx: NodeContext,
        *,
        need_block_timeout: float = 5.0,
        workers: int = 1,
        tranquility: float = 2.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(ctx)
        self.manager = manager
        self.meta = manager.meta
        self.blocks = manager.blocks
        self.layout = manager.layout
        self.node_id = manager.node_id
        self.need_block_timeout = need_block_timeout
        self.workers = int(self.meta.state_get(STATE_WORKERS, workers))
        self.tranquility = float(self.meta.state_get(STATE_TRANQUILITY, tranquility))
        self._clock = clock
        self._in_progress: set[bytes] = set()
        self._wake = Notify()
        self.progress = Notify()
        """Notified after every processed entry (tests wait on it instead of sleeping)."""
        self._nursery: trio.Nursery | None = None
        self._running: set[int] = set()
        self.worker_states: dict[int, str] = {}
        self.done = 0
        self.failed = 0
        self.retries = self.deleted = self.offloaded = 0  # for metrics
        self.bytes_moved = {"fetched": 0, "offloaded": 0}
        self._workers_setting = Setting(
            "resync-workers", int, 1, MAX_WORKERS, lambda: self.workers, self._apply_workers,
            help="resync worker tasks (takes effect at once)")
        self._tranquility_setting = Setting(
            "resync-tranquility", float, 0, math.inf, lambda: self.tranquility,
            self._apply_tranquility, help="rest this many times the step time after each block")

    # ------------------------------------------------------------ settings

    def settings(self) -> tuple[Setting, ...]:
        """``resync-workers`` and ``resync-tranquility``."""
        return self._workers_setting, self._tranquility_setting

    async def set_workers(self, n: object) -> None:
        """Change the number of workers (validated, persisted); takes effect at once."""
        await self._workers_setting.set(n)

    async def set_tranquility(self, t: object) -> None:
        """Change the tranquility (validated, persisted)."""
        await self._tranquility_setting.set(t)

    async def _apply_workers(self, n: int) -> None:
        await self.meta.state_set(STATE_WORKERS, n)
        self.workers = n
        self._spawn_missing()
        self._wake.notify()

    async def _apply_tranquility(self, t: float) -> None:
        await self.meta.state_set(STATE_TRANQUILITY, t)
        self.tranquility = t

    # ------------------------------------------------------------ workers

    async def run(self) -> None:
        """Run the worker tasks for the node's whole life."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._spawn_missing()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def _spawn_missing(self) -> None:
        if self._nursery is None:
            return
        for i in range(self.workers):
            if i not in self._running:
                self._running.add(i)
                self._nursery.start_soon(self._worker, i)

    async def _worker(self, i: int) -> None:
        tranquilizer = Tranquilizer(30, clock=self._clock, min_step=MIN_STEP_S)
        try:
            while i < self.workers:
                await self.supervisor.step(self._step, i, tranquilizer,
                                           about=lambda: f"worker {i}, {self.worker_states.get(i)}")
        finally:
            self._running.discard(i)
            self.worker_states.pop(i, None)

    async def _step(self, i: int, tranquilizer: Tranquilizer) -> None:
        """One step of worker `i`: handle one due entry and rest, or wait for work."""
        seen = self._snapshot()  # before looking at the queue: no wake-up is lost
        entry = self._claim()
        if entry is None:
            self.worker_states[i] = "idle"
            tranquilizer.reset()
            await self._wait_for_work(seen)
            return
        key, h = entry
        self.worker_states[i] = f"busy {h.hex()[:16]}"
        tranquilizer.begin()
        try:
            await self._process_claimed(key, h)
        finally:
            self._in_progress.discard(h)
            self._wake.notify()
            self.progress.notify()
        self.worker_states[i] = "resting"
        await tranquilizer.tranquilize(self.tranquility)

    def _claim(self) -> tuple[bytes, bytes] | None:
        """The first due entry whose block no worker is handling; marks it in progress."""
        for key, h in self.meta.resync_due(limit=len(self._in_progress) + _DUE_LOOKAHEAD):
            if h not in self._in_progress:
                self._in_progress.add(h)
                return key, h
        return None

    def _snapshot(self) -> tuple[int, int]:
        return self.meta.resync_notify.snapshot(), self._wake.snapshot()

    async def _wait_for_work(self, seen: tuple[int, int]) -> None:
        """Sleep until the next due entry, or a queue or settings change since `seen`."""
        next_due = self.meta.resync_next_due()
        if next_due is None:
            timeout = math.inf
        else:
            delta_ms = next_due - self.meta.now_ms()
            # A due entry another worker holds: wait for a wake-up, not for its time.
            timeout = delta_ms / 1000 + 0.001 if delta_ms >= 0 else math.inf
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                async def waiter(notify: Notify, since: int) -> None:
                    await notify.wait(None if defects.on("c12-plain-notify") else since)
                    nursery.cancel_scope.cancel()
                nursery.start_soon(waiter, self.meta.resync_notify, seen[0])
                nursery.start_soon(waiter, self._wake, seen[1])

    # ------------------------------------------------------------ steps

    async def run_once(self, *, limit: int | None = None) -> int:
        """Process every entry due now, one at a time; returns how many it processed.

        Entries a worker task is handling are waited for, so when this returns
        nothing due now is left. Entries requeued during the run (failures) are
        due later, so this ends.
        """
        n = 0
        while limit is None or n < limit:
            seen = self.progress.snapshot()
            entry = self._claim()
            if entry is None:
                if self._due_in_progress():
                    # A worker holds a due entry: wait for it, so "done" means done.
                    await self.progress.wait(seen)
                    continue
                break
            key, h = entry
            try:
                await self._process_claimed(key, h)
            finally:
                self._in_progress.discard(h)
                self._wake.notify()
                self.progress.notify()
            n += 1
        return n

    def _due_in_progress(self) -> bool:
        if not self._in_progress:
            return False
        due = self.meta.resync_due(limit=len(self._in_progress) + _DUE_LOOKAHEAD)
        return any(h in self._in_progress for _, h in due)

    async def _process_claimed(self, key: bytes, h: bytes) -> None:
        err = self.meta.error_get(h)
        now = self.meta.now_ms()
        if err is not None and err.next_try_ms > now:
            # Still backing off: push the entry to the next try, do no work.
            await self.meta.resync_requeue(key, (err.next_try_ms - now) / 1000)
            return
        self.retries += err is not None
        try:
            await self.resync_block(h)
        except Exception as exc:  # one block's failure, whatever it is, moves it aside
            self.failed += 1
            await self._record_failure(key, h, exc)
            return
        self.done += 1
        if err is not None:
            log.info("resync of %s succeeded after %d failed attempt(s)", h.hex(), err.count)
            await self.meta.error_clear(h)
        await self.meta.resync_complete(key)

    async def _record_failure(self, key: bytes, h: bytes, exc: BaseException) -> None:
        """Record a failed resync and push its entry to the next try (moved aside).

        The failure is counted by the supervisor (logged with the block; with
        its traceback if it is not an expected error). Recording cannot fail on
        the record itself (`ResyncQueue.tx_error_record`); should the metadata
        store fail, the entry still moves to the longest backoff, so one block
        is never retried in a tight loop. Should even that fail, the exception
        escapes to the step's supervisor, which backs off.
        """
        self.supervisor.record(exc, f"block {h.hex()}")
        delay = RETRY_MAX_MS / 1000
        try:
            rec = await self.meta.error_record(h, f"{type(exc).__name__}: {exc}")
            delay = max(0, rec.next_try_ms - self.meta.now_ms()) / 1000
            log.info("resync of %s: %d failure(s), next try in %.0f s", h.hex(), rec.count, delay)
        except Exception as rec_exc:  # noqa: BLE001 - the longest backoff instead
            log.error("resync of %s failed (%s); recording the failure failed too: %s",
                      h.hex(), exc, rec_exc)
        await self.meta.resync_requeue(key, delay)

    async def resync_block(self, h: bytes) -> None:
        """Make this node's copy of `h` match its RC (see module docstring); raises on failure."""
        exists = await self.blocks.aexists(h)
        rc = self.meta.rc_get(h)
        if exists and rc.is_deletable(self.meta.now_ms()):
            rc = await self.blocks.recalculate_rc(h)
            if rc.is_absent() and not defects.on("c9-absent-rc-deletable"):
                rc = await self.meta.start_grace(h)
                log.info("block %s is held here with no reference record: kept until %d "
                         "(its references may still come back)", h.hex(), rc.value)
                return
            if rc.is_deletable(self.meta.now_ms()):
                await self._offload_and_delete(h)
                return
        if rc.is_nonzero() and not exists:
            await self._fetch(h)
        elif not exists and rc.is_deletable(self.meta.now_ms()):
            # Nothing held and nothing referenced (e.g. a partition this node left):
            # the leftover RC entry goes.
            await self.meta.clear_deleted(h)

    async def _offload_and_delete(self, h: bytes) -> None:
        write_nodes = list(self.layout.write_nodes(h))
        if len(write_nodes) < self.layout.write_quorum:
            raise ResyncError("not offloading: fewer write nodes than the write quorum")
        others = [n for n in write_nodes if n != self.node_id]
        answers: dict[str, bool | BaseException] = {}
        referenced: list[str] = []

        async def ask(node: str) -> None:
            try:
                reply, _ = await self.manager.net.call(
                    node, "need_block", {"hash": h},
                    timeout=self.need_block_timeout, priority=PRIO_BACKGROUND,
                )
                if not isinstance(reply.get("referenced"), bool):
                    raise ResyncError(f"{node} did not say whether it references the block")
                answers[node] = bool(reply.get("needed", False))
                if reply["referenced"]:
                    referenced.append(node)
            except (BlocknodeError, OSError) as exc:
                answers[node] = exc

        async with trio.open_nursery() as nursery:
            for node in others:
                nursery.start_soon(ask, node)
        failed = {n: a for n, a in answers.items() if isinstance(a, BaseException)}
        if failed:
            detail = "; ".join(f"{n}: {type(e).__name__}: {e}" for n, e in sorted(failed.items()))
            raise ResyncError(f"not deleting: need_block query failed ({detail})")
        if referenced and self.node_id in write_nodes and not defects.on("c9-absent-rc-deletable"):
            # Our RC says deletable, but a replica still holds a live reference: our
            # references are behind (e.g. a lost LMDB). Deleting would drop a copy this
            # node is meant to keep, so merge this block's references from that
            # replica first (last writer wins, as anti-entropy does).
            await self._pull_refs(h, sorted(referenced)[0])
            if not self.meta.rc_get(h).is_deletable(self.meta.now_ms()):
                return
            raise ResyncError(
                f"not deleting: {', '.join(sorted(referenced))} still reference it"
            )
        if not others and not self.meta.refs_of(h) and not defects.on("c9-absent-rc-deletable"):
            # The only write node, and nothing here says the block was ever referenced
            # and released: its references may have been lost with the metadata, and no
            # other node can confirm it is garbage. Keep it (the entry is done).
            log.warning("keeping block %s: no record that it was ever referenced here, and "
                        "no other write node to confirm it is unreferenced", h.hex())
            return
        need = [n for n in others if answers.get(n) is True]
        if need:
            data, z = block.wire_form(await self.manager.read_local(h))
            await self.manager.net.call_many(
                need, "put_block", {"hash": h, "z": True} if z else {"hash": h}, data,
                quorum=len(need), timeout=self.manager.rpc_timeout,
                interrupt_after_quorum=False, priority=PRIO_BACKGROUND,
            )
            self.offloaded += 1
            self.bytes_moved["offloaded"] += len(data) * len(need)
        log.info("deleting unneeded block %s (offloaded to %d of %d)", h.hex(), len(need), len(others))
        self.deleted += await self.blocks.delete_if_deletable(h)
        await self.meta.clear_deleted(h)

    async def _pull_refs(self, h: bytes, peer: str) -> None:
        """Merge the references of one block with `peer` (an anti-entropy exchange of one hash)."""
        await exchange_range(self.manager, self.ctx, peer, h, timeout=self.manager.rpc_timeout)

    async def _fetch(self, h: bytes) -> None:
        nodes = [n for n in self.manager.read_order(h) if n != self.node_id]
        if not nodes:
            raise ResyncError("block needed but no other node holds its partition")
        try:
            data = await self.manager.get(h, priority=PRIO_BACKGROUND, nodes=nodes)
        except RpcError as exc:
            raise ResyncError(f"fetch failed: {exc}") from None
        await self.blocks.write(data)
        self.bytes_moved["fetched"] += len(data)
        log.info("block %s was missing or corrupt here: restored from another node", h.hex())

    # ------------------------------------------------------------ admin

    async def retry_now(self, h: bytes | None = None) -> int:
        """Clear the backoff of one block (or of every failed block) and queue it now.

        The failure count is kept (the next failure backs off from there).
        Returns how many blocks were queued.
        """
        return await self.meta.retry_now([h] if h is not None else None)

    def status(self) -> dict[str, Any]:
        """State, settings, queue length and worker states (a `worker list` row).

        ``errors`` is the number of blocks in the errors table.
        """
        counts = self.meta.counts()
        return {
            "state": "busy" if self._in_progress else "idle",
            "tranquility": self.tranquility,
            "workers": self.workers,
            "queue_length": counts["resync_queue"],
            "errors": counts["errors"],
            "in_progress": len(self._in_progress),
            "processed": self.done,
            "failed": self.failed,
            "worker_states": {str(i): s for i, s in sorted(self.worker_states.items())},
        }


__all__ = ["Resync", "ResyncError"]
