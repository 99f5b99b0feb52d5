"""One seeded simulation run: a whole cluster of real `Node`s in one Trio run.

See `blocknode/sim/__init__.py` for the design, the fault kinds and the
invariants. `run_seed(SimConfig(seed=...))` returns a `Result`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio
import trio.testing

from blocknode import block
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
from blocknode.sim.layout_nemesis import LayoutNemesis
from blocknode.sim.net import SimNet

__all__ = ["Result", "Sim", "SimConfig", "run_seed"]

T = TypeVar("T")
EPOCH_MS = 1_800_000_000_000  # the simulated wall clock starts here (plus each node's skew)
BLOCK_SIZE = 8192
INLINE_THRESHOLD = 1024
GC_DELAY = 60.0
AE_INTERVAL = 60.0
RPC_TIMEOUT = 5.0
OP_TIMEOUT = 30.0
MAX_SKEW_MS = 2000  # per-node skew stays within ±this (max_clock_skew is 5 s)
GC_BOUND = 2 * RPC_TIMEOUT + 30.0
"""Every block whose references are all deleted is gone within gc_delay + this, once healed
(the heal phase runs its resync and anti-entropy rounds within it)."""


@dataclass
class SimConfig:
    seed: int
    nodes: int = 5
    ops: int = 40
    workers: int = 3
    faults: bool = True
    hot_refs: int = 0  # one burst of this many refs to the popular block (thousands: a soak)
    trace: bool = False  # print the trace as it happens
    layout_changes: bool = False  # the layout nemesis: adds, removes, capacities (`layout_*`)


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

    @property
    def digest(self) -> str:
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
        # the client's model
        self.data: dict[bytes, bytes] = {}
        self.pairs: dict[tuple[bytes, str], str] = {}  # (hash, ref) -> live | dead | unknown
        self.busy: set[tuple[bytes, str]] = set()
        self.hot: bytes | None = None
        self.protected: set[bytes] = set()  # acked put, and never all its refs deleted since
        self.unprotected_at: dict[bytes, float] = {}
        self.next_ref = 0
        self.ops_left = cfg.ops
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
                node_id=nid, data_dir=os.path.join(d, "data"), metadata_dir=os.path.join(d, "meta"),
                rpc_bind_addr=self.addrs[nid], rpc_secret=secret, cluster_file=cluster_file,
                zone=f"z{i % 3 + 1}", block_size=BLOCK_SIZE, inline_threshold=INLINE_THRESHOLD,
                data_fsync=False, metadata_fsync=False, lmdb_map_size=1 << 26,
                gc_delay=GC_DELAY, rpc_timeout=RPC_TIMEOUT, need_block_timeout=2.0,
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
                          connect=self.net.connector(nid))
        node = Node(self.cfgs[nid], ctx=ctx, listener=self.net.listener(nid))
        scope = trio.CancelScope()
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await node.run(task_status=task_status)
                if not scope.cancelled_caught:
                    self.violation(f"node {nid} stopped on its own")
            except Exception as exc:  # noqa: BLE001 - that is the finding
                self.violation(f"node {nid} died: {exc!r}")
            finally:
                done.set()

        self.nodes[nid], self.scopes[nid], self.done[nid] = node, scope, done
        await nursery.start(run)
        self.event(f"start {nid}")

    async def crash(self, nid: str) -> None:
        self.net.crash(nid)
        self.scopes[nid].cancel()
        await self.done[nid].wait()
        del self.nodes[nid]
        self.event(f"crash {nid}")

    # ------------------------------------------------------------------ client
    def client(self, nid: str) -> Any:
        cfg = self.cfgs[nid]
        key = load_client_key(cfg, environ={})
        return open_client(cfg.public_addr, key, timeout=2.0, connect=self.net.connector("client"),
                           max_message_size=max_message_size(BLOCK_SIZE))

    async def with_client(self, fn: Callable[[Client], Any]) -> Any:
        nid = self.rng.choice(self.ids)
        async with self.client(nid) as conn:
            return await fn(Client(conn, block_size=BLOCK_SIZE, timeout=RPC_TIMEOUT * 2))

    def new_ref(self) -> str:
        self.next_ref += 1
        return f"r{self.next_ref}"

    async def one_op(self) -> None:
        rng = self.rng
        x = rng.random()
        live = [p for p, s in self.pairs.items() if s == "live" and p not in self.busy]
        dead = [p for p, s in self.pairs.items() if s == "dead" and p not in self.busy]
        if x < 0.25 or not self.data:
            if self.data and rng.random() < 0.2:
                data = self.data[rng.choice(list(self.data))]
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
                     live_after: bool, ref: str | None = None, manifest: bool = False) -> None:
        ref = ref or self.new_ref()
        keys = [(h, ref) for h in hashes]
        self.busy.update(keys)
        self.event(f"op {kind} {ref} {' '.join(h.hex()[:8] for h in hashes)}")
        ok = False
        try:
            with trio.move_on_after(OP_TIMEOUT):
                out = await self.with_client(lambda c: fn(c, ref))
                if manifest:
                    keys.append((bytes.fromhex(out), ref))
                ok = True
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

    async def many_refs(self, h: bytes, n: int) -> None:
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
                await self.with_client(all_)
        except Exception as exc:  # noqa: BLE001
            self.event(f"  many_refs failed: {type(exc).__name__}")
        for r in refs:
            ok = results.get(r, False)
            self.pairs[(h, r)] = "live" if ok else "unknown"
            self.res.ops[f"ref:{'ok' if ok else 'fail'}"] += 1
        self.update_protection([h])
        self.event(f"  many_refs ok={sum(results.values())}")

    def update_protection(self, hashes: list[bytes], *, put: bool = False, reref: bool = False) -> None:
        """Which blocks must survive (S1): a block an acked put stored, as long as one of its
        references may be live; a block re-referenced within half the GC delay of its
        last reference's deletion counts again (re-reference during the GC delay)."""
        now = trio.current_time()
        for h in dict.fromkeys(hashes):
            if put:
                self.protected.add(h)
                continue
            if reref and h in self.unprotected_at and now - self.unprotected_at[h] < GC_DELAY / 2:
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
            if self.hot is None and self.data:
                self.hot = next(iter(self.data))
            if self.hot is not None:
                await self.many_refs(self.hot, self.cfg.hot_refs)
        while self.ops_left > 0:
            self.ops_left -= 1
            await trio.sleep(self.rng.expovariate(1.0))
            await self.one_op()

    # ------------------------------------------------------------------ nemesis
    async def nemesis(self, nursery: trio.Nursery) -> None:
        rng = self.rng
        while self.chaos:
            await trio.sleep(rng.expovariate(1 / 6))
            if not self.chaos:
                return
            x = rng.random()
            up = [n for n in self.ids if n in self.nodes]
            if x < 0.3:
                if len(up) <= len(self.ids) - 2:
                    continue
                nid = self.victim if self.victim in up and rng.random() < 0.3 else rng.choice(up)
                await self.crash(nid)
                self.res.faults["crash"] += 1
                loss = None
                if nid == self.victim and self.disk_losses == 0 and rng.random() < 0.5:
                    loss = rng.choice(["data", "meta"])
                nursery.start_soon(self.restart_later, nursery, nid, rng.uniform(2, 40), loss)
            elif x < 0.45:
                self.bitflip()
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

    async def unclog_later(self, link: tuple[str, str], after: float) -> None:
        await trio.sleep(after)
        self.net.clogged.pop(link, None)

    async def restart_later(self, nursery: trio.Nursery, nid: str, after: float,
                            loss: str | None) -> None:
        await trio.sleep(after)
        if nid in self.nodes:
            return
        self.lose(nid, loss)
        await self.start(nursery, nid)

    def lose(self, nid: str, loss: str | None) -> None:
        if loss is None:
            return
        cfg = self.cfgs[nid]
        shutil.rmtree(cfg.metadata_dir if loss == "meta" else str(cfg.data_dir), ignore_errors=True)
        self.disk_losses += 1
        self.res.faults[f"{loss}_loss"] += 1
        self.event(f"{loss}_loss {nid}")

    def bitflip(self) -> None:
        d = str(self.cfgs[self.victim].data_dir)
        files = []
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames.sort()
            files += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if not f.endswith(".tmp") and len(f) >= 32]
        if not files:
            return
        path = self.rng.choice(files)
        with open(path, "r+b") as f:
            size = f.seek(0, 2)
            if size == 0:
                return
            pos = self.rng.randrange(size)
            f.seek(pos)
            b = f.read(1)[0] ^ (1 << self.rng.randrange(8))
            f.seek(pos)
            f.write(bytes([b]))
        self.res.faults["bitflip"] += 1
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
            if self.cfg.faults:
                nursery.start_soon(self.nemesis, nursery)
            if self.cfg.layout_changes:
                nursery.start_soon(self.layout_nemesis, nursery)
            async with trio.open_nursery() as load:
                for i in range(self.cfg.workers):
                    load.start_soon(self.worker, i == 0)
            self.chaos = False
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
        await trio.sleep(1)
        for nid in self.ids:
            if nid not in self.nodes:
                await self.start(nursery, nid)
        for nid in self.ids:
            await self.nodes[nid].net.check_peers()
        await trio.sleep(5)

        async def rounds(n: int) -> None:
            for _ in range(n):
                await self.each("retry", lambda node: node.resync.retry_now())
                await self.each("anti-entropy", lambda node: node.anti_entropy.run_round())
                await self.each("resync", lambda node: node.resync.run_once())
                await trio.sleep(5)

        await rounds(2)
        if self.cfg.layout_changes:
            await self.settle_layout()
        async def full_scrub(node: Node) -> None:
            await node.scrub.cancel()  # a scrub running since the chaos: start one from the top
            await node.scrub.start()
            await node.scrub.run_to_completion()

        await self.each("scrub", full_scrub)
        await rounds(2)
        t_gc = trio.current_time()
        await trio.sleep(GC_DELAY + 2 * MAX_SKEW_MS / 1000)
        await rounds(2)
        self.event(f"heal done after {trio.current_time() - t_gc:.1f}s past the last unref "
                   f"(bound gc_delay+{GC_BOUND:.0f}s)")

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


def run_seed(cfg: SimConfig, sim_class: type[Sim] | None = None) -> Result:
    """Run one seed (deterministic: same seed, same trace) and check the invariants."""
    from trio._core import _run as trio_run  # the scheduler's RNG: seeded for determinism

    result = Result(cfg.seed)
    root = tempfile.mkdtemp(prefix=f"blocknode-sim-{cfg.seed}-")
    saved = trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    trio_run._r.seed(cfg.seed)
    logging.disable(logging.CRITICAL)
    t0 = time.perf_counter()
    try:
        sim = (sim_class or Sim)(cfg, root, result)
        trio.run(sim.main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        result.wall_s = time.perf_counter() - t0
        trio_run._ALLOW_DETERMINISTIC_SCHEDULING = saved  # type: ignore[misc]
        logging.disable(logging.NOTSET)
        shutil.rmtree(root, ignore_errors=True)
    return result
