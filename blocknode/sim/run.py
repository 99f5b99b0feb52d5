"""One seeded simulation run: a whole cluster of real `Node`s in one Trio run.

See `blocknode/sim/__init__.py` for the design, the fault kinds and the
invariants. `run_seed(SimConfig(seed=...))` returns a `Result`.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import random
import shutil
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio
import trio.testing

from blocknode import block, defects
from blocknode.auth import load_client_key
from blocknode.client.api import Client
from blocknode.config import NodeConfig
from blocknode.context import NodeContext
from blocknode.node import Node
from blocknode.protocol import (
    ADMIN_ANTI_ENTROPY,
    ADMIN_BLOCK_RETRY_NOW,
    ADMIN_REPAIR,
    ADMIN_SCRUB,
    ADMIN_WORKER_SET,
    max_message_size,
)
from blocknode.rpc.connect import open_client
from blocknode.sim.bounds import node_bounds
from blocknode.sim.disk import SimDisk
from blocknode.sim.layout_nemesis import LayoutNemesis
from blocknode.sim.net import SimNet

__all__ = ["Result", "Sim", "SimConfig", "invariant_of", "run_seed"]

T = TypeVar("T")
EPOCH_MS = 1_800_000_000_000  # the simulated wall clock starts here (plus each node's skew)
BLOCK_SIZE = 8192
INLINE_THRESHOLD = 1024
GC_DELAY = 60.0
AE_INTERVAL = 60.0
RPC_TIMEOUT = 5.0
OP_TIMEOUT = 30.0
MAX_SKEW_MS = 2000  # per-node skew stays within ±this (max_clock_skew is 5 s)
HEAP_BUDGET = 128 << 20
"""With `SimConfig.tracemalloc`: the Python heap peak of one seed (the whole cluster, its
client and the checker) must stay under this (a violation otherwise)."""
DISK_FAULTS = {"enospc": errno.ENOSPC, "eio": errno.EIO, "readonly": errno.EROFS}
"""The victim's disk faults (`blocknode.sim.disk.SimDisk.set_fault`), each for 5–30 s."""
SCRUB_RESTART_BATCH = 4  # the scrub batch of the heal's cancel-then-start sequence
RESYNC_LATE_MS = 2000
"""An entry due this long ago with every resync worker of its node idle: a lost wake-up."""
GC_BOUND = 2 * RPC_TIMEOUT + 30.0
"""Every block whose references are all deleted is gone within gc_delay + this, once healed
(the heal phase runs its resync and anti-entropy rounds within it)."""


@dataclass
class SimConfig:
    """One seed's schedule. The defaults are the *full* schedule; `SimConfig.short` is the
    short one CI runs a thousand of (see `SHORT` and the package docstring)."""

    seed: int
    nodes: int = 5
    ops: int = 40
    workers: int = 3
    faults: bool = True
    hot_refs: int = 0  # one burst of this many refs to the popular block (thousands: a soak)
    trace: bool = False  # print the trace as it happens
    layout_sync_interval: float = 20.0  # gossip period (the node's default, 2 s, is for live
    key_sync_interval: float = 30.0  # layout changes: a fixed layout needs little of it)
    ping_interval: float = 10.0  # each node pings its connected peers this often
    fault_every: float = 6.0  # mean seconds between two nemesis faults (exponential)
    gc_delay: float = GC_DELAY  # the nodes' gc_delay (the quiesce phase waits it out)
    heal_rounds: int = 2  # retry-now + anti-entropy + resync rounds per heal step
    settle: float = 5.0  # simulated seconds after restarts and after each heal round
    max_faults: int | None = None  # the nemesis stops after this many faults (shrinking)
    tracemalloc: bool = False  # measure the seed's Python heap peak (slow: ~2x; not in CI)
    bounds_every: float = 1.0  # sample every node's bounded structures this often (sim s)
    defects: tuple[str, ...] = ()  # re-introduced defects (`blocknode.defects`), for the seed table
    hot_down: bool = False  # with hot_refs: one replica of the popular block is down during the burst
    worker_bug: bool = False  # each node's scrub worker raises once, in its first step (supervision)
    layout_changes: bool = False  # the layout nemesis: adds, removes, capacities (`layout_*`)

    @classmethod
    def short(cls, seed: int, nodes: int = 5, **kw: Any) -> SimConfig:
        """The short schedule (`SHORT`, overridable by keyword). With `layout_changes`, the
        layout gossips at the node's own period (2 s): a migration needs it."""
        if kw.get("layout_changes"):
            kw = {"layout_sync_interval": 2.0, **kw}
        return cls(seed=seed, nodes=nodes, **{**SHORT, **kw})


SHORT: dict[str, Any] = {"ops": 16, "workers": 3, "fault_every": 1.5, "gc_delay": 30.0,
                         "heal_rounds": 1, "settle": 3.0, "layout_sync_interval": 60.0,
                         "key_sync_interval": 60.0, "ping_interval": 20.0}
"""The short schedule, a thousand seeds per CI run: 16 client operations from 3 clients
(~8-30 simulated s of chaos) under a fault every 1.5 s on average (~3-15 per seed), then
one heal round, a full scrub, one round, the GC delay (30 s) and a last round."""


@dataclass
class Result:
    seed: int
    trace: list[str] = field(default_factory=list)
    ops: Counter = field(default_factory=Counter)  # "put:ok", "put:fail", ...
    faults: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    beyond_budget: list[str] = field(default_factory=list)
    sim_s: float = 0.0
    wall_s: float = 0.0
    peaks: dict[str, int] = field(default_factory=dict)  # bounded structures' peaks, tracemalloc
    trace_digest: str = ""  # set when the trace was dropped (a passing seed from a worker)

    @property
    def digest(self) -> str:
        if self.trace_digest and not self.trace:
            return self.trace_digest
        return hashlib.sha256("\n".join(self.trace).encode()).hexdigest()[:16]

    @property
    def acked(self) -> int:
        return sum(v for k, v in self.ops.items() if k.endswith(":ok"))


async def _inline(fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None) -> T:
    """`RunSync` of the simulation: the blocking call runs inline (no threads: the mock
    clock and the scheduler stay deterministic); each costs one checkpoint."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


class Sim(LayoutNemesis):
    def __init__(self, cfg: SimConfig, root: str, result: Result) -> None:
        self.cfg = cfg
        self.root = root
        self.res = result
        self.rng = random.Random(cfg.seed)
        self.ids = [f"n{i}" for i in range(1, cfg.nodes + 1)]
        self.addrs = {nid: f"{nid}.sim:7000" for nid in self.ids}
        self.net = SimNet(random.Random(self.rng.getrandbits(64)), self.addrs, self.event)
        self.skew = {nid: self.rng.randint(-MAX_SKEW_MS, MAX_SKEW_MS) for nid in self.ids}
        self.node_rng = {nid: random.Random(self.rng.getrandbits(64)) for nid in self.ids}
        self.nodes: dict[str, Node] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self.done: dict[str, trio.Event] = {}
        self.victim = self.rng.choice(self.ids)  # the one node whose storage may be damaged
        self.disk_losses = 0
        self.pending_loss: dict[str, str] = {}  # a crashed node's disk loss, done at its restart
        # Block files live on a simulated disk per node (`blocknode.sim.disk`): a crash drops
        # what was not synced, by this RNG (its own: the other draws stay as they were).
        self.disks = {nid: SimDisk(os.path.join(root, nid, "disk")) for nid in self.ids}
        self.disk_rng = random.Random(f"disk-{cfg.seed}")
        # the client's model
        self.data: dict[bytes, bytes] = {}
        self.pairs: dict[tuple[bytes, str], str] = {}  # (hash, ref) -> live | dead | unknown
        self.busy: set[tuple[bytes, str]] = set()
        self.hot: bytes | None = None
        self.protected: set[bytes] = set()  # acked put, and never all its refs deleted since
        self.unprotected_at: dict[bytes, float] = {}
        self.next_ref = 0
        self.ops_left = cfg.ops
        self.fault_seq = 0  # bumped by every crash, restart and bit flip (the ack-time check)
        self.faulted_at: dict[str, int] = {}
        self.stalled: set[tuple[str, bytes]] = set()
        self.died = False
        self.disk_stopped: set[str] = set()  # nodes stopped by their failing disk (restart on heal)
        self.flipped: list[bytes] = []  # blocks with a bit flipped, to be put again (C.10)  # S6 reported once per node and block  # node -> fault_seq of its last crash/restart/bit flip
        self.chaos = True
        secret = hashlib.sha256(f"secret{cfg.seed}".encode()).hexdigest()
        lines = ["replication_factor = 3"]
        for i, nid in enumerate(self.ids):
            lines += ["[[nodes]]", f'id = "{nid}"', f'addr = "{self.addrs[nid]}"', f'zone = "z{i % 3 + 1}"']
        cluster_file = os.path.join(root, "cluster.toml")
        with open(cluster_file, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.cfgs = {}
        for i, nid in enumerate(self.ids):
            d = os.path.join(root, nid)
            os.makedirs(d, mode=0o700)
            self.cfgs[nid] = NodeConfig(
                node_id=nid, data_dir=os.path.join(self.disks[nid].root, "data"),
                metadata_dir=os.path.join(d, "meta"),
                rpc_bind_addr=self.addrs[nid], rpc_secret=secret, cluster_file=cluster_file,
                zone=f"z{i % 3 + 1}", block_size=BLOCK_SIZE, inline_threshold=INLINE_THRESHOLD,
                # Durable as in production: block files fsync'd (through the SimDisk), every
                # LMDB commit fsync'd (on tmpfs: cheap) so a crash keeps exactly what was
                # committed.
                data_fsync=True, metadata_fsync=True, lmdb_map_size=1 << 26,
                gc_delay=cfg.gc_delay, rpc_timeout=RPC_TIMEOUT, need_block_timeout=2.0,
                connect_timeout=1.0, anti_entropy_interval=AE_INTERVAL, scrub_interval=1e7,
                resync_tranquility=0.0, scrub_tranquility=0.0, source=f"<sim {nid}>",
                admin_api_bind_addr=None,  # no HTTP listener in a simulation
            )
        if cfg.layout_changes:
            self.layout_init(cluster_file)

    # ------------------------------------------------------------------ trace
    def event(self, what: str) -> None:
        line = f"{trio.current_time():10.3f} {what}"
        self.res.trace.append(line)
        if self.cfg.trace:
            print(line, flush=True)

    def violation(self, what: str) -> None:
        self.event(f"VIOLATION {what}")
        self.res.violations.append(what)

    # ------------------------------------------------------------------ nodes
    def now_ms(self, nid: str) -> Callable[[], int]:
        return lambda: EPOCH_MS + int(trio.current_time() * 1000) + self.skew[nid]

    async def start(self, nursery: trio.Nursery, nid: str) -> None:
        ctx = NodeContext(now_ms=self.now_ms(nid), random=self.node_rng[nid],
                          urandom=self.node_rng[nid].randbytes, run_sync=_inline,
                          connect=self.net.connector(nid), fs=self.disks[nid])
        node = Node(self.cfgs[nid], ctx=ctx, listener=self.net.listener(nid))
        node.layouts.sync_interval = self.cfg.layout_sync_interval
        node.keys.sync_interval = self.cfg.key_sync_interval
        node.net.ping_interval = self.cfg.ping_interval
        self.watch_gc(nid, node)
        scope = trio.CancelScope()
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await node.run(task_status=task_status)
                if not scope.cancelled_caught:
                    self.violation(f"node {nid} stopped on its own")
            except Exception as exc:  # noqa: BLE001 - that is the finding
                if self.disks[nid].cut:  # the node's reaction to a dead disk, cut short
                    self.event(f"node {nid} ended after its power cut: {exc!r}"[:200])
                elif self.disks[nid].fault is not None:
                    # A node whose disk fails under its foundations (e.g. its data dir cannot
                    # be made again after a loss while the disk returns EIO) stops with a
                    # clear error, as designed; the operator restarts it once the disk works.
                    self.event(f"node {nid} stopped, its disk failing: {exc!r}"[:200])
                    self.res.faults["disk_stop"] += 1
                    self.disk_stopped.add(nid)
                    self.net.crash(nid)
                    if self.nodes.get(nid) is node:
                        del self.nodes[nid]
                else:
                    self.violation(f"node {nid} died: {exc!r}")
                    self.died = True  # a finding already: the run ends without healing
                    self.net.crash(nid)
                    if self.nodes.get(nid) is node:
                        del self.nodes[nid]
            finally:
                done.set()

        self.nodes[nid], self.scopes[nid], self.done[nid] = node, scope, done
        if self.cfg.worker_bug:
            self.inject_worker_bug(node)
        await nursery.start(run)
        self.mark_fault(nid)
        self.event(f"start {nid}")

    def watch_gc(self, nid: str, node: Node) -> None:
        """Check every deletion by GC or offload as it happens (S2, continuously): the
        resync worker deletes through `LocalBlocks.delete_if_deletable` only, so this
        wraps it on the node's instance (no simulation code in the node)."""
        inner = node.blocks.delete_if_deletable

        async def delete_if_deletable(h: bytes) -> bool:
            before = self.live_refs(h)
            deleted = await inner(h)
            if deleted:
                self.res.ops["gc_deleted"] += 1
                # acked live before the deletion began and still live (no unref since)
                live = sorted(before & self.live_refs(h))
                replica = nid in node.layout.nodes_of(h)
                if live and h in self.protected and replica:
                    self.violation(f"S3: GC on {nid} deleted {h.hex()[:16]} while live acked "
                                   f"reference(s) {live[:3]} exist (it is a replica)")
                # nor sooner than gc_delay after the acknowledgement of its last reference's
                # deletion (which a replica may have applied up to OP_TIMEOUT earlier, with
                # its clock up to twice the skew apart)
                earliest = self.cfg.gc_delay - OP_TIMEOUT - 2 * MAX_SKEW_MS / 1000
                released = self.unprotected_at.get(h)
                if (replica and released is not None and trio.current_time() - released < earliest
                        and all(st == "dead" for (hh, _), st in self.pairs.items() if hh == h)):
                    self.violation(f"S3: {nid} deleted {h.hex()[:16]} "
                                   f"{trio.current_time() - released:.1f} s after its last "
                                   f"reference was deleted (gc_delay {self.cfg.gc_delay:.0f} s)")
            return deleted

        node.blocks.delete_if_deletable = delete_if_deletable  # type: ignore[method-assign]

    def live_refs(self, h: bytes) -> set[str]:
        """The references of `h` the client holds as acknowledged live (none in flight)."""
        return {r for (hh, r), st in self.pairs.items()
                if hh == h and st == "live" and (hh, r) not in self.busy}

    async def sample_bounds(self) -> None:
        """Memory budget, continuously: every `bounds_every` simulated seconds, each running
        node's bounded structures (`blocknode.sim.bounds`) are within their bounds."""
        while True:
            await trio.sleep(self.cfg.bounds_every)
            for nid, node in list(self.nodes.items()):
                for name, value, bound in node_bounds(node, len(self.ids)):
                    peak = f"peak:{name}"
                    self.res.peaks[peak] = max(self.res.peaks.get(peak, 0), value)
                    if value > bound:
                        self.violation(f"memory budget: {nid} {name} = {value} > {bound}")

    def mark_fault(self, nid: str) -> None:
        """`nid` crashed, restarted or had a bit flipped: what it held may have changed."""
        self.fault_seq += 1
        self.faulted_at[nid] = self.fault_seq

    def inject_worker_bug(self, node: Node) -> None:
        """A bug in a worker step: the scrub worker's first step raises (supervision must
        log it, back off and go on; the node must not stop)."""
        scrub = node.scrub

        async def buggy(*args: Any) -> None:
            del scrub._run_step  # once
            self.res.faults["worker_bug"] += 1
            raise RuntimeError("injected bug in a worker step")

        scrub._run_step = buggy  # type: ignore[method-assign]

    def check_acked_put(self, h: bytes, since: int) -> None:
        """S1 at the moment of the acknowledgement: a put is acknowledged only once the write
        quorum of its replicas holds an intact copy (replicas that crashed, restarted or had
        a bit flipped since the put started are given the benefit of the doubt)."""
        layout = next(iter(self.nodes.values())).layout
        replicas = list(layout.nodes_of(h))
        holders = [n for n in replicas if n in self.nodes and self._holds_intact(n, h)]
        doubt = [n for n in replicas if n not in holders and self.faulted_at.get(n, 0) > since]
        if len(holders) + len(doubt) < layout.write_quorum:
            self.violation(f"S1 at ack: put of {h.hex()[:16]} acknowledged while only {holders} "
                           f"of its replicas {replicas} hold an intact copy "
                           f"(< write quorum {layout.write_quorum})")

    def check_resync_awake(self) -> None:
        """S6, resync liveness (checked without a checkpoint, so the schedule is unchanged):
        no node's resync workers are all idle while an entry has been due for a while
        (a lost wake-up leaves a due entry until some unrelated notify)."""
        for nid, node in self.nodes.items():
            rs = node.resync
            states = [rs.worker_states.get(i) for i in rs._running]
            if not states or any(s != "idle" for s in states):
                continue
            late = node.meta.resync_due(node.meta.now_ms() - RESYNC_LATE_MS, limit=1)
            if late and late[0][1] not in rs._in_progress and (nid, late[0][1]) not in self.stalled:
                self.stalled.add((nid, late[0][1]))
                self.violation(f"S6: {nid}'s resync workers all sleep while "
                               f"{late[0][1].hex()[:16]} has been due for over "
                               f"{RESYNC_LATE_MS / 1000:.0f} s")

    def _holds_intact(self, nid: str, h: bytes) -> bool:
        # Side-effect free (nothing quarantined, no checkpoint): the schedule is unchanged.
        node = self.nodes[nid]
        try:
            found = node.meta.inline.get_form(h)
            if found is not None:
                block.from_inline_bytes(found[0], h, compressed=found[1], cap=node.blocks.files.cap)
                return True
            node.blocks.files.read(h, thorough=True)  # BLAKE2b; no checksum attribute written
            return True
        except Exception:  # noqa: BLE001 - absent or corrupt
            return False

    async def crash(self, nid: str) -> None:
        self.net.crash(nid)
        self.scopes[nid].cancel()
        await self.done[nid].wait()
        self.nodes.pop(nid, None)  # (an operator restart may crash it at the same time)
        self.mark_fault(nid)
        lost = self.disks[nid].crash(self.disk_rng).lost  # a machine crash: un-synced state may go
        self.res.faults["lost_unsynced"] += lost
        self.event(f"crash {nid}" + (f" (lost {lost} un-synced)" if lost else ""))

    # ------------------------------------------------------------------ client
    def client(self, nid: str) -> Any:
        cfg = self.cfgs[nid]
        key = load_client_key(cfg, environ={})
        return open_client(cfg.public_addr, key, timeout=2.0, connect=self.net.connector("client"),
                           max_message_size=max_message_size(BLOCK_SIZE))

    async def with_client(self, fn: Callable[[Client], Any], nid: str | None = None) -> Any:
        nid = nid or self.rng.choice(self.ids)
        async with self.client(nid) as conn:
            return await fn(Client(conn, block_size=BLOCK_SIZE, timeout=RPC_TIMEOUT * 2))

    def new_ref(self) -> str:
        self.next_ref += 1
        return f"r{self.next_ref}"

    async def one_op(self) -> None:
        self.check_resync_awake()
        rng = self.rng
        x = rng.random()
        live = [p for p, s in self.pairs.items() if s == "live" and p not in self.busy]
        dead = [p for p, s in self.pairs.items() if s == "dead" and p not in self.busy]
        if x < 0.25 or not self.data:
            if self.data and (rng.random() < 0.2 or self.flipped):
                again = rng.choice(list(self.data))
                if self.flipped:  # re-put a block whose copy had a bit flipped (C.10's scenario)
                    again = self.flipped.pop()
                data = self.data[again]
            else:
                data = rng.randbytes(rng.choice((rng.randint(1, INLINE_THRESHOLD),
                                                 rng.randint(INLINE_THRESHOLD + 1, BLOCK_SIZE))))
            h = block.hashed(data).hash
            self.data[h] = data
            await self.ref_op("put", [h], lambda c, r: c.put_block(data, r), live_after=True)
        elif x < 0.30:
            data = rng.randbytes(rng.randint(BLOCK_SIZE + 1, 3 * BLOCK_SIZE))
            chunks = [data[i:i + BLOCK_SIZE] for i in range(0, len(data), BLOCK_SIZE)]
            hs = []
            for ch in chunks:
                hs.append(block.hashed(ch).hash)
                self.data[hs[-1]] = ch
            await self.ref_op("put_multi", hs, lambda c, r: c.put(data, r, fresh_ref=True),
                              live_after=True, manifest=True)
        elif x < 0.50 and self.data:
            if dead and rng.random() < 0.3:
                h, ref = rng.choice(dead)  # re-reference (often within the GC delay)
                now = trio.current_time()
                released = [p for p in dead if p[0] not in self.protected
                            and now - self.unprotected_at.get(p[0], -GC_DELAY) < GC_DELAY / 2]
                if released:  # preferably a block whose last reference was deleted just now
                    h, ref = released[0]
                await self.ref_op("reref", [h], lambda c, r: c.set_ref(h, r, deleted=False),
                                  live_after=True, ref=ref)
                return
            if self.hot is None:
                self.hot = rng.choice(list(self.data))
            h = self.hot if rng.random() < 0.5 else rng.choice(list(self.data))
            if h == self.hot and rng.random() < 0.3:
                await self.many_refs(h, rng.randint(5, 25))
                return
            await self.ref_op("ref", [h], lambda c, r: c.set_ref(h, r, deleted=False), live_after=True)
        elif x < 0.72 and live:
            h, ref = rng.choice(live)
            await self.ref_op("unref", [h], lambda c, r: c.set_ref(h, r, deleted=True),
                              live_after=False, ref=ref)
        elif x < 0.90 and live:
            h, _ = rng.choice(live)
            await self.get_op(h)
        else:
            await self.admin_op()

    async def ref_op(self, kind: str, hashes: list[bytes], fn: Callable[[Client, str], Any], *,
                     live_after: bool, ref: str | None = None, manifest: bool = False,
                     via: str | None = None) -> None:
        ref = ref or self.new_ref()
        keys = [(h, ref) for h in hashes]
        self.busy.update(keys)
        self.event(f"op {kind} {ref} {' '.join(h.hex()[:8] for h in hashes)}")
        ok = False
        since = self.fault_seq
        try:
            with trio.move_on_after(OP_TIMEOUT):
                out = await self.with_client(lambda c: fn(c, ref), via)
                if manifest:
                    keys.append((bytes.fromhex(out), ref))
                ok = True
                if kind == "put":
                    self.check_acked_put(hashes[0], since)
        except Exception as exc:  # noqa: BLE001 - an op may fail under faults
            self.event(f"  {kind} {ref} failed: {type(exc).__name__}")
        finally:
            self.busy.difference_update(keys)
        for k in keys:
            self.pairs[k] = ("live" if live_after else "dead") if ok else "unknown"
        self.update_protection([k[0] for k in keys], put=ok and kind.startswith("put"),
                               reref=ok and kind == "reref")
        self.res.ops[f"{kind}:{'ok' if ok else 'fail'}"] += 1
        self.event(f"  {kind} {ref} {'ok' if ok else 'FAILED'}")

    async def many_refs(self, h: bytes, n: int, via: str | None = None) -> None:
        refs = [self.new_ref() for _ in range(n)]
        self.event(f"op many_refs {h.hex()[:8]} x{n}")
        results: dict[str, bool] = {}

        async def one(c: Client, r: str) -> None:
            try:
                await c.set_ref(h, r, deleted=False)
                results[r] = True
            except Exception:  # noqa: BLE001
                results[r] = False

        limit = trio.Semaphore(32)

        async def limited(c: Client, r: str) -> None:
            async with limit:
                await one(c, r)

        async def all_(c: Client) -> None:
            async with trio.open_nursery() as nursery:
                for r in refs:
                    nursery.start_soon(limited, c, r)

        try:
            with trio.move_on_after(OP_TIMEOUT + n / 10):
                await self.with_client(all_, via)
        except Exception as exc:  # noqa: BLE001
            self.event(f"  many_refs failed: {type(exc).__name__}")
        for r in refs:
            ok = results.get(r, False)
            self.pairs[(h, r)] = "live" if ok else "unknown"
            self.res.ops[f"ref:{'ok' if ok else 'fail'}"] += 1
        self.update_protection([h])
        self.event(f"  many_refs ok={sum(results.values())}")

    async def reput(self, h: bytes) -> None:
        """Put a block again (with a new reference) right after a bit flip in the victim's
        copy, with another of its replicas down if the fault budget allows (C.10's scenario:
        the corrupt copy must not count toward the write quorum)."""
        data = self.data[h]
        layout = next(iter(self.nodes.values())).layout
        others = [n for n in layout.nodes_of(h) if n != self.victim and n in self.nodes]
        down = None
        if len(others) == 2 and len(self.nodes) > len(self.ids) - 2:
            down = others.pop()
            await self.crash(down)
            self.res.faults["crash"] += 1
        await self.ref_op("put", [h], lambda c, r: c.put_block(data, r), live_after=True,
                          via=others[0] if others else None)
        if down is not None and down not in self.nodes:
            assert self._nursery is not None
            await self.start(self._nursery, down)

    async def many_refs_with_a_replica_down(self, h: bytes, n: int) -> None:
        """The popular-block burst while one replica of the block is down (C.8's scenario:
        its references must reach that replica by anti-entropy once it is back)."""
        layout = next(iter(self.nodes.values())).layout
        down = next((r for r in layout.nodes_of(h) if r in self.nodes), None)
        if down is None:
            await self.many_refs(h, n)
            return
        await self.crash(down)
        self.res.faults["crash"] += 1
        await self.many_refs(h, n, via=next(r for r in self.ids if r in self.nodes))
        assert self._nursery is not None
        if down not in self.nodes:
            await self.start(self._nursery, down)

    def update_protection(self, hashes: list[bytes], *, put: bool = False, reref: bool = False) -> None:
        """Which blocks must survive (S1): a block an acked put stored, as long as one of its
        references may be live; a block re-referenced within half the GC delay of its
        last reference's deletion counts again (re-reference during the GC delay)."""
        now = trio.current_time()
        for h in dict.fromkeys(hashes):
            if put:
                self.protected.add(h)
                continue
            if reref and h in self.unprotected_at and now - self.unprotected_at[h] < self.cfg.gc_delay / 2:
                self.protected.add(h)
                continue
            if h in self.protected and not any(
                    s != "dead" for (hh, _), s in self.pairs.items() if hh == h):
                self.protected.discard(h)
                self.unprotected_at[h] = now

    async def get_op(self, h: bytes) -> None:
        self.event(f"op get {h.hex()[:8]}")
        ok = False
        try:
            with trio.move_on_after(OP_TIMEOUT):
                got = await self.with_client(lambda c: c.get_block(h))
                ok = True
                if h in self.data and got != self.data[h]:
                    self.violation(f"get {h.hex()} returned other bytes")
        except Exception as exc:  # noqa: BLE001
            if "bad data" in str(exc):
                self.violation(f"get {h.hex()}: node returned bytes not matching the hash")
            self.event(f"  get failed: {type(exc).__name__}")
        self.res.ops[f"get:{'ok' if ok else 'fail'}"] += 1

    async def admin_op(self) -> None:
        rng = self.rng
        kind, fields = rng.choice([
            (ADMIN_SCRUB, {"action": "start"}),
            (ADMIN_REPAIR, {"action": "start"}),
            (ADMIN_BLOCK_RETRY_NOW, {"all": True}),
            (ADMIN_ANTI_ENTROPY, {}),
            (ADMIN_WORKER_SET, {"name": "resync-tranquility", "value": rng.choice([0, 1, 2])}),
            (ADMIN_WORKER_SET, {"name": "resync-workers", "value": rng.randint(1, 4)}),
        ])
        self.event(f"op admin {kind} {fields}")
        ok = False
        try:
            with trio.move_on_after(OP_TIMEOUT):
                await self.with_client(lambda c: c.call(kind, fields))
                ok = True
        except Exception as exc:  # noqa: BLE001
            self.event(f"  admin failed: {type(exc).__name__}: {exc}"[:200])
        self.res.ops[f"admin:{'ok' if ok else 'fail'}"] += 1

    async def worker(self, first: bool = False) -> None:
        if first and self.cfg.hot_refs:
            await trio.sleep(1)
            while self.cfg.hot_down and not self.data and self.ops_left > 0:  # a first put
                await trio.sleep(1)
            if self.hot is None and self.data:
                self.hot = next(iter(self.data))
            if self.hot is not None and self.cfg.hot_down:
                await self.many_refs_with_a_replica_down(self.hot, self.cfg.hot_refs)
            elif self.hot is not None:
                await self.many_refs(self.hot, self.cfg.hot_refs)
        while self.ops_left > 0:
            self.ops_left -= 1
            await trio.sleep(self.rng.expovariate(1.0))
            await self.one_op()

    # ------------------------------------------------------------------ nemesis
    async def nemesis(self, nursery: trio.Nursery) -> None:
        rng = self.rng
        while self.chaos:
            await trio.sleep(rng.expovariate(1 / self.cfg.fault_every))
            if not self.chaos or (self.cfg.max_faults is not None
                                  and sum(self.res.faults.values()) >= self.cfg.max_faults):
                return
            x = rng.random()
            up = [n for n in self.ids if n in self.nodes]
            if x < 0.3:
                if len(up) <= len(self.ids) - 2:
                    continue
                nid = self.victim if self.victim in up and rng.random() < 0.3 else rng.choice(up)
                if rng.random() < 0.4:
                    await self.power_cut(nursery, nid, rng)
                    continue
                await self.crash(nid)
                self.res.faults["crash"] += 1
                loss = None
                if nid == self.victim and self.disk_losses == 0 and rng.random() < 0.5:
                    loss = rng.choice(["data", "meta"])
                if loss is not None:
                    self.pending_loss[nid] = loss
                nursery.start_soon(self.restart_later, nursery, nid, rng.uniform(2, 40), loss)
            elif x < 0.45:
                if x < 0.38:
                    self.bitflip()
                    if self.flipped:  # put it again at once (C.10's scenario: before a read or scrub)
                        nursery.start_soon(self.reput, self.flipped.pop())
                else:
                    self.disk_fault(nursery, rng)
            elif x < 0.65:
                await self.partition(rng)
            elif x < 0.75:
                a, b = rng.sample(self.ids, 2)
                d = rng.uniform(0.2, 3.0)
                self.net.clogged[(a, b)] = d
                self.res.faults["clog"] += 1
                self.event(f"clog {a}->{b} +{d:.2f}s")
                nursery.start_soon(self.unclog_later, (a, b), rng.uniform(5, 30))
            elif x < 0.87:
                nid = rng.choice(self.ids)
                self.skew[nid] = rng.randint(-MAX_SKEW_MS, MAX_SKEW_MS)
                self.res.faults["skew"] += 1
                self.event(f"skew {nid} {self.skew[nid]}ms")
            else:
                a, b = rng.sample(self.ids, 2)
                n = self.net.reset(a, b)
                self.res.faults["reset"] += 1
                self.event(f"reset {a}<->{b} ({n} streams)")

    async def power_cut(self, nursery: trio.Nursery, nid: str, rng: random.Random) -> None:
        """A machine crash in the middle of the node's disk work: after 1–12 more changes
        to its disk, the disk stops and the node is cancelled right there (a plain crash
        if it makes no change within 10 s); restarted after 2–40 s."""
        cut = trio.Event()

        def on_cut() -> None:  # inside the node's disk call: nothing more reaches the disk
            self.net.crash(nid)
            self.scopes[nid].cancel()
            cut.set()

        self.disks[nid].arm_power_cut(rng.randint(1, 12), on_cut)
        with trio.move_on_after(10):
            await cut.wait()
        self.disks[nid].disarm()
        if nid not in self.nodes or not (cut.is_set() or self.chaos):
            return  # crashed meanwhile, or the faults stopped before the cut
        self.event(f"power cut {nid}" if cut.is_set() else f"power cut {nid}: no disk change")
        await self.crash(nid)
        self.res.faults["power_cut" if cut.is_set() else "crash"] += 1
        nursery.start_soon(self.restart_later, nursery, nid, rng.uniform(2, 40), None)

    def disk_fault(self, nursery: trio.Nursery, rng: random.Random) -> None:
        """The victim's disk fails writes (full, I/O errors, read-only) for 5–30 s."""
        disk = self.disks[self.victim]
        if disk.fault is not None:
            return
        kind = rng.choice(sorted(DISK_FAULTS))
        disk.set_fault(DISK_FAULTS[kind])
        self.res.faults[kind] += 1
        self.event(f"{kind} {self.victim}")
        nursery.start_soon(self.disk_heal_later, nursery, self.victim, rng.uniform(5, 30))

    async def disk_heal_later(self, nursery: trio.Nursery, nid: str, after: float) -> None:
        await trio.sleep(after)
        await self.disk_heal(nursery, nid)

    async def disk_heal(self, nursery: trio.Nursery, nid: str) -> None:
        """The disk works again. A directory taken out of service (EIO: the node's answer
        to a failing disk) stays out until a restart: the operator's step, taken here."""
        if self.disks[nid].fault is None:
            return
        self.disks[nid].set_fault(None)
        self.event(f"disk healed {nid}")
        if nid in self.disk_stopped:
            self.disk_stopped.discard(nid)
            if nid not in self.nodes:
                await self.restart(nursery, nid)
                self.event(f"operator restart {nid} (it stopped on its failing disk)")
            return
        node = self.nodes.get(nid)
        if node is not None and any(not d.in_service for d in node.files.dirs):
            await self.crash(nid)
            await self.start(nursery, nid)
            self.event(f"operator restart {nid} (its data dir was out of service)")

    async def unclog_later(self, link: tuple[str, str], after: float) -> None:
        await trio.sleep(after)
        self.net.clogged.pop(link, None)

    async def restart_later(self, nursery: trio.Nursery, nid: str, after: float,
                            loss: str | None) -> None:
        await trio.sleep(after)
        if nid in self.nodes:
            return
        await self.restart(nursery, nid)

    async def restart(self, nursery: trio.Nursery, nid: str) -> None:
        """Start a crashed node again, first losing the disk its crash decided it would lose
        (also when the heal phase restarts it: in a short schedule most restarts happen there)."""
        self.lose(nid, self.pending_loss.pop(nid, None))
        await self.start(nursery, nid)

    def lose(self, nid: str, loss: str | None) -> None:
        if loss is None:
            return
        cfg = self.cfgs[nid]
        if loss == "meta":
            shutil.rmtree(cfg.metadata_dir, ignore_errors=True)
        else:
            self.disks[nid].remove_tree(str(cfg.data_dir))
        self.disk_losses += 1
        self.res.faults[f"{loss}_loss"] += 1
        self.event(f"{loss}_loss {nid}")

    def bitflip(self) -> None:
        disk = self.disks[self.victim]
        files = [p for p in disk.files(str(self.cfgs[self.victim].data_dir))
                 if not p.endswith(".tmp") and len(os.path.basename(p)) >= 32]
        if not files:
            return
        path = self.rng.choice(files)
        size = disk.getsize(path)
        if size == 0:
            return
        pos = self.rng.randrange(size)
        disk.flip_bit(path, pos, self.rng.randrange(8))
        self.res.faults["bitflip"] += 1
        self.mark_fault(self.victim)
        try:
            flipped = bytes.fromhex(os.path.basename(path).split(".")[0])
        except ValueError:
            flipped = b""
        if flipped in self.data:
            self.flipped.append(flipped)
        self.event(f"bitflip {self.victim} {os.path.basename(path)[:12]}@{pos}")

    async def partition(self, rng: random.Random) -> None:
        if self.net.blocked_links:
            return
        ids = self.ids
        if rng.random() < 0.5:
            side = set(rng.sample(ids, rng.randint(1, len(ids) // 2)))
            links = {(a, b) for a in ids for b in ids if (a in side) != (b in side)}
            kind = "partition"
            what = f"{sorted(side)} | rest"
        else:
            links = {tuple(rng.sample(ids, 2)) for _ in range(rng.randint(1, 3))}
            kind = "oneway"
            what = " ".join(f"{a}-/>{b}" for a, b in sorted(links))
        self.net.set_blocked(links)  # type: ignore[arg-type]
        self.res.faults[kind] += 1
        self.event(f"{kind} {what}")
        dur = rng.uniform(5, 40)

        async def heal() -> None:
            await trio.sleep(dur)
            if self.net.blocked_links == links:
                self.net.set_blocked(set())
                self.event(f"heal {kind}")

        assert self._nursery is not None
        self._nursery.start_soon(heal)

    # ------------------------------------------------------------------ phases
    async def main(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for nid in self.ids:
                await self.start(nursery, nid)
            await trio.sleep(1)
            nursery.start_soon(self.sample_bounds)
            if self.cfg.faults:
                nursery.start_soon(self.nemesis, nursery)
            if self.cfg.layout_changes:
                nursery.start_soon(self.layout_nemesis, nursery)
            async with trio.open_nursery() as load:
                for i in range(self.cfg.workers):
                    load.start_soon(self.worker, i == 0)
            self.chaos = False
            if self.died:
                self.event("a node died: no healing, no checks")
                self.res.sim_s = trio.current_time()
                nursery.cancel_scope.cancel()
                return
            self.event("heal: faults stop")
            await self.heal(nursery)
            await self.check()
            if self.cfg.layout_changes:
                await self.check_layout()
            self.res.sim_s = trio.current_time()
            nursery.cancel_scope.cancel()

    async def each(self, what: str, fn: Callable[[Node], Any]) -> None:
        for nid in self.ids:
            try:
                with trio.move_on_after(120):
                    await fn(self.nodes[nid])
            except Exception as exc:  # noqa: BLE001
                self.event(f"  heal {what} on {nid}: {type(exc).__name__}: {exc}"[:200])

    async def heal(self, nursery: trio.Nursery) -> None:
        self.net.set_blocked(set())
        self.net.clogged.clear()
        for nid in self.ids:
            self.disks[nid].disarm()  # a power cut not yet happened does not happen
            await self.disk_heal(nursery, nid)
        await trio.sleep(1)
        for nid in self.ids:
            if nid not in self.nodes:
                await self.restart(nursery, nid)
        for nid in self.ids:
            await self.nodes[nid].net.check_peers()
        await trio.sleep(self.cfg.settle)

        async def rounds(n: int) -> None:
            for _ in range(n):
                await self.each("retry", lambda node: node.resync.retry_now())
                await self.each("anti-entropy", lambda node: node.anti_entropy.run_round())
                await self.each("resync", lambda node: node.resync.run_once())
                await trio.sleep(self.cfg.settle)

        await rounds(self.cfg.heal_rounds)
        if self.cfg.layout_changes:
            await self.settle_layout()
        async def full_scrub(node: Node) -> None:
            await node.scrub.cancel()  # a scrub running since the chaos: start one from the top
            await node.scrub.start()
            await node.scrub.run_to_completion()

        await self.each("scrub restart", self.scrub_restart)
        await self.each("scrub", full_scrub)
        await rounds(self.cfg.heal_rounds)
        t_gc = trio.current_time()
        await trio.sleep(self.cfg.gc_delay + 2 * MAX_SKEW_MS / 1000)
        await rounds(self.cfg.heal_rounds)
        self.event(f"heal done after {trio.current_time() - t_gc:.1f}s past the last unref "
                   f"(bound gc_delay+{GC_BOUND:.0f}s)")

    async def scrub_restart(self, node: Node) -> None:
        """`scrub start`; while the first run's worker step is in the middle of a slow block
        read (in its second batch: small batches here), `scrub cancel` and `scrub start`
        (C.13's scenario). The second run must check every block held throughout it."""
        scrub = node.scrub
        if sum(1 for _ in itertools.islice(node.blocks.walk(), SCRUB_RESTART_BATCH + 2)) \
                < SCRUB_RESTART_BATCH + 2:
            return  # too few blocks here for a second batch
        parked, resume = trio.Event(), trio.Event()
        checked: set[bytes] = set()
        recording = False
        calls = 0
        check = scrub._check

        async def instrumented(h: bytes) -> None:
            nonlocal calls
            calls += 1
            if calls == SCRUB_RESTART_BATCH + 2 and not parked.is_set():
                parked.set()
                await resume.wait()  # a slow read of the first run
            if recording:
                checked.add(h)
            await check(h)

        saved_batch, scrub.batch = scrub.batch, SCRUB_RESTART_BATCH
        scrub._check = instrumented  # type: ignore[method-assign]
        try:
            await scrub.cancel()
            await scrub.start()
            with trio.move_on_after(30):
                while not parked.is_set() and scrub.st["state"] == "running":
                    await trio.sleep(0.05)
            if not parked.is_set():
                return  # the first run ended before its second batch (blocks deleted meanwhile)
            await scrub.cancel()
            before = set(node.blocks.walk())
            await scrub.start()
            recording = True
            resume.set()
            await scrub.run_to_completion()
            skipped = (before & set(node.blocks.walk())) - checked
            if skipped:
                self.violation(f"scrub: a run started during a cancelled run's step completed "
                               f"on {node.node_id} without checking {len(skipped)} of its "
                               f"{len(before)} blocks")
        finally:
            resume.set()
            del scrub._check
            scrub.batch = saved_batch

    # ------------------------------------------------------------------ invariants
    async def check(self) -> None:
        layout = next(iter(self.nodes.values())).layout
        wq = layout.write_quorum
        over_budget = self.disk_losses > layout.replication_factor - wq
        by_hash: dict[bytes, Counter] = {}
        for (h, _ref), state in self.pairs.items():
            by_hash.setdefault(h, Counter())[state] += 1
        for h, states in by_hash.items():
            holders = [nid for nid in self.ids if await self.has_valid(nid, h)]
            if states["live"] and h in self.protected:
                if len(holders) < wq:
                    msg = f"LOST {h.hex()}: live refs {states['live']}, on {holders} (< wq {wq})"
                    (self.res.beyond_budget.append if over_budget else self.violation)(msg)
                elif len(holders) < layout.replication_factor:
                    missing = [n for n in layout.nodes_of(h) if n not in holders]
                    detail = "; ".join(
                        f"{n}: rc={self.nodes[n].meta.rc_get(h).describe()} "
                        f"err={self.nodes[n].meta.error_get(h)} queued="
                        f"{[k.hex() for k, qh in self.nodes[n].meta.resync_due(2**62, 10**6) if qh == h]}"
                        for n in missing)
                    self.event(f"under-replicated {h.hex()[:8]} on {holders} "
                               f"(replicas {list(layout.nodes_of(h))}; {detail})")
                    self.res.ops["under_replicated"] += 1
                for (hh, ref), state in self.pairs.items():
                    if hh != h or state != "live":
                        continue
                    for nid in layout.nodes_of(h):
                        v = self.nodes[nid].meta.ref_versions([(h, ref)])[0]
                        if v is None or v.deleted:
                            self.violation(f"unconverged: live ref {ref} of {h.hex()[:16]} is "
                                           f"{'missing' if v is None else 'deleted'} on {nid}")
            elif states["dead"] and not states["unknown"] and not states["live"]:
                anywhere = [nid for nid in self.ids if self.nodes[nid].blocks.exists(h)]
                if anywhere:
                    detail = "; ".join(
                        f"{nid}: rc={self.nodes[nid].meta.rc_get(h).describe()} refs="
                        f"{[(r.ref_id, r.deleted, r.ts_ms - EPOCH_MS) for r in self.nodes[nid].meta.refs_of(h)]}"
                        for nid in anywhere)
                    self.violation(f"not collected: {h.hex()} (all refs deleted) still on {anywhere} "
                                   f"(replicas {list(layout.nodes_of(h))}; {detail}; "
                                   f"now {self.nodes[anywhere[0]].meta.now_ms() - EPOCH_MS})")
        for nid in self.ids:
            meta = self.nodes[nid].meta
            live: Counter = Counter()
            for r in meta.iter_refs():
                if not r.deleted:
                    live[r.hash] += 1
            seen = set()
            for h, rc in meta.refs.iter_rc():
                seen.add(h)
                if rc.count != live[h]:
                    self.violation(f"rc mismatch on {nid}: {h.hex()[:16]} rc={rc.describe()} "
                                   f"live refs={live[h]}")
            for h, n in live.items():
                if h not in seen and n:
                    self.violation(f"rc mismatch on {nid}: {h.hex()[:16]} no rc, live refs={n}")

    async def has_valid(self, nid: str, h: bytes) -> bool:
        """`nid` holds a copy of `h` that verifies."""
        node = self.nodes[nid]
        if not node.blocks.exists(h):
            return False
        try:
            blk = await node.blocks.read(h)
        except Exception as exc:  # noqa: BLE001
            self.event(f"  {nid} cannot read {h.hex()[:8]}: {type(exc).__name__}")
            return False
        want = self.data.get(h)  # None: a manifest (its bytes verified against the hash only)
        return want is None or bytes(blk) == want


def _tmp_root() -> str | None:
    """Where the nodes' directories go: /dev/shm (a tmpfs: no disk I/O, cheap rmtree and
    fsync) when it is there and writable, else the default temp dir. Crash semantics do not
    depend on it: block files are on a `SimDisk` (un-synced state dropped by its crash
    rules), and LMDB commits are fsync'd, so a crash keeps exactly the last commit."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


_INVARIANTS = (
    ("S1 at ack", "S1 at ack"), ("LOST", "S1 lost"), ("S3:", "S3 deleted"),
    ("unconverged", "unconverged"), ("not collected", "not collected"), ("rc mismatch", "rc"),
    ("get ", "get bytes"), ("S6:", "S6 resync asleep"), ("scrub:", "scrub coverage"),
    ("node ", "node died/stopped"),
)


def invariant_of(violation: str) -> str:
    """The short name of the invariant a violation message reports (for the tables)."""
    for prefix, name in _INVARIANTS:
        if violation.startswith(prefix):
            return name
    return violation.split(":")[0]


def run_seed(cfg: SimConfig, sim_class: type[Sim] | None = None) -> Result:
    """Run one seed (deterministic: same seed, same trace) and check the invariants."""
    from trio._core import _run as trio_run  # the scheduler's RNG: seeded for determinism

    result = Result(cfg.seed)
    # On tmpfs when there is one: every LMDB commit is fsync'd (metadata_fsync), cheaply there.
    root = tempfile.mkdtemp(prefix=f"blocknode-sim-{cfg.seed}-", dir=_tmp_root())
    saved = trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    trio_run._r.seed(cfg.seed)
    logging.disable(logging.CRITICAL)
    t0 = time.perf_counter()
    if cfg.tracemalloc:
        tracemalloc.start()
    try:
        sim = (sim_class or Sim)(cfg, root, result)
        with defects.active(cfg.defects):
            trio.run(sim.main, clock=trio.testing.MockClock(autojump_threshold=0))
        if cfg.tracemalloc:
            peak = tracemalloc.get_traced_memory()[1]
            result.peaks["tracemalloc_peak"] = peak
            if peak > HEAP_BUDGET:
                result.violations.append(f"memory budget: heap peak {peak >> 20} MiB > "
                                         f"{HEAP_BUDGET >> 20} MiB")
    finally:
        if cfg.tracemalloc:
            tracemalloc.stop()
        result.wall_s = time.perf_counter() - t0
        trio_run._ALLOW_DETERMINISTIC_SCHEDULING = saved  # type: ignore[misc]
        logging.disable(logging.NOTSET)
        shutil.rmtree(root, ignore_errors=True)
    return result
