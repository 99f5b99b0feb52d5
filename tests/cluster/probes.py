"""The probe harness: a 3-node cluster of real `python -m blocknode serve` processes.

Three nodes, rf 3 (write quorum 2), on loopback, with short timeouts and GC
delay. Background work is stepped through the admin "run once" calls
(`admin_anti_entropy`, `admin_resync_run_once`, `admin_repair`) by
`converge()`; the serve processes' own workers run as well, which the checks
tolerate (they only ever look at outcomes). `probe_cluster` kills every
process on exit. Used by test_probe_faults.py and test_cluster_time.py.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from blocknode.client import open_client
from blocknode.config import NodeConfig, load_config, load_or_create_secret
from blocknode.rpc.connect import open_connection
from tests.cluster.harness import ServeProcesses, write_cluster

RPC_TIMEOUT = 2.0
CONNECT_TIMEOUT = 1.0
GC_DELAY = 1.0
EPS = 0.75
"""Slack over `RPC_TIMEOUT` allowed for a put while a node is frozen (S6)."""
SMALL, LARGE = 4096, 200_000
"""Block sizes: inline in LMDB (< inline_threshold 16 KiB) and a block file."""

Round = Callable[[], Awaitable[None]]


class Probe:
    """Three serve processes, their configs, and admin helpers on top."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.cfgs: list[NodeConfig] = [load_config(p) for p in paths]
        self.procs = ServeProcesses(paths)
        self.live: set[int] = set()

    # ------------------------------------------------------------ processes

    def start(self, i: int) -> None:
        """Start node index `i` and wait until it listens."""
        self.procs.start(i)
        self.procs.wait_ready(i)
        self.live.add(i)

    def kill9(self, i: int) -> None:
        """SIGKILL node index `i` (no clean shutdown) and reap it."""
        self.procs.kill(i)
        self.live.discard(i)

    def stop(self, i: int) -> None:
        """SIGSTOP node index `i`: its sockets stay open, it answers nothing."""
        self.procs.signal(i, signal.SIGSTOP)
        self.live.discard(i)

    def cont(self, i: int) -> None:
        """SIGCONT node index `i`."""
        self.procs.signal(i, signal.SIGCONT)
        self.live.add(i)

    def node_dir(self, i: int) -> Path:
        """The directory holding node index `i`'s config, data and meta."""
        return self.paths[i].parent

    # ------------------------------------------------------------ admin calls

    async def call(self, i: int, kind: str, fields: dict[str, Any],
                   *, timeout: float = 10.0) -> tuple[dict[str, Any], bytes | None]:
        """One raw RPC to node index `i` over a fresh client connection."""
        async with open_client(self.cfgs[i], timeout=timeout) as c:
            return await c.call(kind, fields)

    async def info(self, i: int, h: bytes) -> dict[str, Any]:
        """`admin_block_info` of `h` on node index `i` (this node's view only)."""
        reply, _ = await self.call(i, "admin_block_info", {"hash": h})
        return reply

    async def node_call(self, i: int, kind: str, fields: dict[str, Any],
                        *, timeout: float = 10.0) -> tuple[dict[str, Any], bytes | None]:
        """A node-internal RPC to node index `i`, made as a node (with the cluster secret:
        a client key may not make one)."""
        cfg = self.cfgs[i]
        conn = await open_connection(cfg.public_addr, load_or_create_secret(cfg, create=False),
                                     local_id=cfg.node_id, connect_timeout=timeout,
                                     handshake_timeout=timeout)
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.run)
            try:
                return await conn.call(kind, fields, timeout=timeout)
            finally:
                nursery.cancel_scope.cancel()

    async def local_bytes(self, i: int, h: bytes) -> bytes:
        """The block as node index `i` alone holds it (`get_block`: no fetch from peers)."""
        _, data = await self.node_call(i, "get_block", {"hash": h})
        assert data is not None
        return data

    async def holders(self, h: bytes, nodes: set[int] | None = None) -> set[int]:
        """Indices of the (live, by default) nodes that hold `h` locally."""
        out = set()
        for i in sorted(self.live if nodes is None else nodes):
            if (await self.info(i, h))["present"]:
                out.add(i)
        return out

    async def repair(self, i: int, *, timeout: float = 10.0) -> dict[str, Any]:
        """Run `repair` on node index `i` and wait until its sweeps have queued everything."""
        st, _ = await self.call(i, "admin_repair", {"action": "start", "rc": False})
        with trio.fail_after(timeout):
            while st["state"] == "running":
                await trio.sleep(0.05)
                st, _ = await self.call(i, "admin_repair", {"action": "status"})
        assert not st.get("error"), f"repair on node{i + 1} failed: {st['error']}"
        return st

    async def converge(self, *, deadline_s: float = 20.0, after_round: Round | None = None) -> int:
        """Step every live node until nothing changes and every resync queue is empty.

        A round is one anti-entropy round on each live node, then one resync
        `run_once` on each. Entries due later (the incref check, 2 × rpc_timeout;
        the GC check, gc_delay + 10 s) are waited for in real time, bounded by
        `deadline_s`. `after_round` runs after every round (invariant checks).
        Returns the number of rounds; fails naming S5 if it does not converge.
        """
        deadline = time.monotonic() + deadline_s
        rounds = 0
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            rounds += 1
            merged = 0
            for i in sorted(self.live):
                st, _ = await self.call(i, "admin_anti_entropy", {})
                assert not st["peers_failed"], f"anti-entropy on node{i + 1}: {st['peers_failed']}"
                merged += st["merged_here"] + st["merged_there"]
            processed, queued = 0, 0
            for i in sorted(self.live):
                st, _ = await self.call(i, "admin_resync_run_once", {})
                processed += st["processed"]
                queued += st["queue_length"]
                last[f"node{i + 1}"] = st
            if after_round is not None:
                await after_round()
            if merged == 0 and processed == 0 and queued == 0:
                for i in sorted(self.live):
                    reply, _ = await self.call(i, "admin_block_errors", {})
                    assert reply["errors"] == [], f"S5 convergence: node{i + 1} errors {reply['errors']}"
                return rounds
            if merged == 0 and processed == 0:
                await trio.sleep(0.2)  # only entries due later are left
        raise AssertionError(f"S5 convergence: not converged after {rounds} rounds: {last}")

    async def check_rc(self, i: int, hashes: list[bytes]) -> None:
        """S4 on node index `i`: rc == count of live refs, for every hash."""
        for h in hashes:
            info = await self.info(i, h)
            live = sum(1 for r in info["refs"] if not r["deleted"])
            assert info["rc"] == live, (
                f"S4 RC consistency: node{i + 1} {h.hex()[:16]} rc={info['rc']} live refs={live}")

    def close(self) -> None:
        """Kill every process (stopped ones included: SIGKILL ends them too)."""
        self.procs.close()
        self.live.clear()


@contextmanager
def probe_cluster(root: Path, **fields: Any) -> Iterator[Probe]:
    """A started 3-node rf-3 cluster of serve processes; all killed on exit."""
    node_fields: dict[str, Any] = {
        "rpc_timeout": RPC_TIMEOUT, "connect_timeout": CONNECT_TIMEOUT, "gc_delay": GC_DELAY,
        "need_block_timeout": 1.0, "resync_tranquility": 0, **fields,
    }
    probe = Probe(write_cluster(root, 3, rf=3, **node_fields))
    try:
        for i in range(3):
            probe.procs.start(i)
        for i in range(3):
            probe.procs.wait_ready(i)
            probe.live.add(i)
        yield probe
    finally:
        probe.close()


async def put_blocks(probe: Probe, i: int, sizes: list[int], ref: str) -> dict[bytes, bytes]:
    """Put one random block per size through node index `i`; returns hash -> data."""
    out: dict[bytes, bytes] = {}
    async with open_client(probe.cfgs[i]) as c:
        for n in sizes:
            data = os.urandom(n)
            out[bytes.fromhex(await c.put(data, ref))] = data
    return out


# ---------------------------------------------------------------- tests
