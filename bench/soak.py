"""Soak: a 3-node cluster of real `serve` processes under mixed load, one node restarted every minute.

    python -m bench.soak [--seconds 300] [--clients 64] [--restart-every 60]
                         [--ram-buffer 128M] [--json PATH]

Three `python -m blocknode serve` processes (replication 3, write quorum 2, the
default durable config: fsync on) and `clients` concurrent clients in this
process, each with its own connection to a node (client `i` starts on node
``i % 3``), running a mix of put (4 KiB, one in 50 a 1 MiB block), get (of a
block the client put and still references, checked byte-exact), ref (a second
reference to one of its blocks) and unref. Each client keeps at most
`OWNED_MAX` blocks referenced (it unrefs the oldest past that), so the data
stays bounded. At the end every client reads back every block it still
references (``final_get``, byte-exact).

Every `restart_every` seconds one node (round robin) is stopped — SIGTERM and
SIGKILL alternately — and started again at once. A call that fails because of
that (the connection broke, the node is unreachable, a quorum or timeout error,
``busy``; a ``not_found`` only while a restart is under way or less than
`RESTART_GRACE` seconds ago) is retried — on the next node, after a short
pause — and counted as a retry; one that still fails after `RETRY_FOR`
seconds, or fails any other way (wrong bytes, ``bad_request``, ``internal``...),
is an error. Latency is per operation, retries included.

Memory: every node's RssAnon (`/proc/PID/status`) is sampled twice a second;
the budget is `block_ram_buffer_max` + `RSS_OVERHEAD` (the interpreter, its
modules, LMDB's and Trio's bookkeeping — the same figure
`tests/cluster/test_resource_bounds.py` states). Exit status 1 if there was
any error or a node went over its budget, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from blocknode.client import open_client
from blocknode.config import NodeConfig, load_config
from blocknode.errors import NodeUnreachable, QuorumError, RpcTimeout
from blocknode.rpc.errors import RemoteCallError
from blocknode.sizes import parse_size

KIB = 1 << 10
MIB = 1 << 20
RSS_OVERHEAD = 48 * MIB
"""Fixed memory over `block_ram_buffer_max` a node may use (see the module docstring)."""
OWNED_MAX = 32
"""Blocks a client keeps referenced at once."""
LARGE_EVERY = 50
"""One put in this many is a 1 MiB block (the others 4 KiB)."""
RETRY_FOR = 60.0
"""Seconds an operation is retried before it counts as an error."""
RESTART_GRACE = 10.0
"""Seconds after a node came back during which a `not_found` still counts as its fault."""
OP_TIMEOUT = 20.0
"""Seconds per client call."""
KINDS = ("put", "get", "ref", "unref", "final_get")
PY = sys.executable
REPO = str(Path(__file__).resolve().parent.parent)


def write_cluster(root: Path, ram_buffer: int) -> list[Path]:
    """Configs of three nodes (rf 3, zones 1-3) on free loopback ports, default durability."""
    socks = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    lines = ["replication_factor = 3", "write_quorum = 2", ""]
    for i, port in enumerate(ports, 1):
        lines += ["[[nodes]]", f'id = "node{i}"', f'addr = "127.0.0.1:{port}"', f'zone = "z{i}"', ""]
    (root / "cluster.toml").write_text("\n".join(lines))
    secret = os.urandom(32).hex()
    paths = []
    for i, port in enumerate(ports, 1):
        d = root / f"node{i}"
        d.mkdir()
        cfg = d / "config.toml"
        cfg.write_text(
            f'node_id = "node{i}"\ndata_dir = "data"\nmetadata_dir = "meta"\n'
            f'rpc_bind_addr = "127.0.0.1:{port}"\ncluster_file = "../cluster.toml"\n'
            f'rpc_secret = "{secret}"\nzone = "z{i}"\nrpc_timeout = 10.0\n'
            f'connect_timeout = 2.0\nblock_ram_buffer_max = {ram_buffer}\n'
        )
        paths.append(cfg)
    return paths


def rss_anon(pid: int) -> int | None:
    """RssAnon of `pid` in bytes, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * KIB
    except OSError:
        return None
    return None


class Nodes:
    """The serve processes (own process groups); `close()` kills whatever still runs."""

    def __init__(self, configs: list[Path]) -> None:
        self.configs = configs
        self.cfgs: list[NodeConfig] = [load_config(p) for p in configs]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.peak_anon = [0] * len(configs)

    def start(self, i: int) -> None:
        log = open(self.configs[i].parent / "serve.log", "ab")  # noqa: SIM115 - the child owns it
        self.procs[i] = subprocess.Popen(
            [PY, "-m", "blocknode", "serve", "--config", str(self.configs[i])],
            stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, "PYTHONPATH": REPO})
        log.close()

    async def wait_ready(self, i: int, timeout: float = 30.0) -> None:
        host, _, port = self.cfgs[i].rpc_bind_addr.rpartition(":")
        with trio.fail_after(timeout):
            while True:
                if self.procs[i].poll() is not None:
                    raise RuntimeError(f"node{i + 1} exited: {self.log_tail(i)}")
                try:
                    s = await trio.open_tcp_stream(host, int(port))
                    await s.aclose()
                    return
                except OSError:
                    await trio.sleep(0.05)

    async def stop(self, i: int, sig: int) -> None:
        """Send `sig` to node `i` and wait for it to exit (SIGKILL after 30 s)."""
        p = self.procs[i]
        os.killpg(p.pid, sig)
        with trio.move_on_after(30):
            while p.poll() is None:
                await trio.sleep(0.02)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            await trio.to_thread.run_sync(p.wait)

    def sample(self) -> None:
        for i, p in self.procs.items():
            v = rss_anon(p.pid)
            if v is not None:
                self.peak_anon[i] = max(self.peak_anon[i], v)

    def log_tail(self, i: int) -> str:
        try:
            return (self.configs[i].parent / "serve.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()


@dataclass
class Stats:
    """What the clients and the restarter saw."""

    seconds: float = 0.0
    load_seconds: float = 0.0
    lat: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    retries: int = 0
    retries_outside: int = 0
    retry_causes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    restarts: list[dict[str, Any]] = field(default_factory=list)
    down: set[int] = field(default_factory=set)
    last_back: float = -1e9
    peak_anon: list[int] = field(default_factory=list)
    budget: int = 0

    def in_restart(self) -> bool:
        """A node is down, or came back less than `RESTART_GRACE` s ago."""
        return bool(self.down) or time.monotonic() - self.last_back < RESTART_GRACE

    @property
    def ok(self) -> bool:
        return not self.errors and all(p <= self.budget for p in self.peak_anon)


def _retryable(exc: BaseException, stats: Stats) -> bool:
    if isinstance(exc, NodeUnreachable | RpcTimeout | QuorumError | trio.TooSlowError):
        return True
    if isinstance(exc, RemoteCallError):
        if exc.code in ("error", "busy"):
            return True
        return exc.code == "not_found" and stats.in_restart()
    return False


@dataclass
class Owned:
    """A block a client put: its bytes and the references it holds on it."""

    hash: str
    data: bytes
    refs: list[str]


class SoakClient:
    """One client: its own connection, its own blocks, one operation at a time."""

    def __init__(self, idx: int, nodes: Nodes, stats: Stats, deadline: float) -> None:
        self.idx = idx
        self.nodes = nodes
        self.stats = stats
        self.deadline = deadline
        self.node = idx % len(nodes.cfgs)
        self.rng = random.Random(idx)
        self.owned: list[Owned] = []
        self.seq = 0
        self.final: list[Owned] | None = None

    def _ref(self) -> str:
        self.seq += 1
        return f"soak-{self.idx}-{self.seq}"

    def next_op(self) -> tuple[str, Any]:
        if self.final is not None:
            return ("final_get", self.final.pop()) if self.final else ("done", None)
        if time.monotonic() >= self.deadline:
            self.final = list(self.owned)
            return self.next_op()
        if len(self.owned) >= OWNED_MAX:
            return "unref", self.owned[0]
        r = self.rng.random()
        if r < 0.4 or not self.owned:
            self.seq += 1
            size = MIB if self.seq % LARGE_EVERY == 0 else 4 * KIB
            return "put", (self.rng.randbytes(size), self._ref())
        o = self.rng.choice(self.owned)
        if r < 0.8:
            return "get", o
        if r < 0.9:
            return "ref", (o, self._ref())
        return "unref", o

    async def execute(self, c: Any, kind: str, arg: Any) -> None:
        if kind == "put":
            data, ref = arg
            h = await c.put(data, ref=ref)
            if not any(o.hash == h for o in self.owned):
                self.owned.append(Owned(h, data, [ref]))
            elif ref not in (o := next(o for o in self.owned if o.hash == h)).refs:
                o.refs.append(ref)
        elif kind in ("get", "final_get"):
            got = await c.get(arg.hash)
            if got != arg.data:
                raise AssertionError(f"get {arg.hash[:16]}: {len(got)} bytes differ from the "
                                     f"{len(arg.data)} put")
        elif kind == "ref":
            o, ref = arg
            await c.ref(o.hash, ref)
            if ref not in o.refs:
                o.refs.append(ref)
        elif kind == "unref":
            o = arg
            while o.refs:
                await c.unref(o.hash, o.refs[-1])
                o.refs.pop()
            if o in self.owned:
                self.owned.remove(o)

    async def run(self) -> None:
        pending: tuple[str, Any, float] | None = None
        while True:
            try:
                async with open_client(self.nodes.cfgs[self.node], timeout=OP_TIMEOUT) as c:
                    while True:
                        if pending is None:
                            kind, arg = self.next_op()
                            if kind == "done":
                                return
                            pending = (kind, arg, time.monotonic())
                        kind, arg, t0 = pending
                        await self.execute(c, kind, arg)
                        self.stats.lat[kind].append(time.monotonic() - t0)
                        pending = None
            except Exception as exc:  # noqa: BLE001 - every failure is classified here
                if pending is not None and _retryable(exc, self.stats) \
                        and time.monotonic() - pending[2] < RETRY_FOR:
                    self.stats.retries += 1
                    self.stats.retry_causes[type(exc).__name__] += 1
                    if not self.stats.in_restart():
                        self.stats.retries_outside += 1
                elif pending is None and _retryable(exc, self.stats):
                    pass  # the connect itself failed: try the next node
                else:
                    what = pending[0] if pending else "connect"
                    self.stats.errors.append(f"client {self.idx} {what}: {exc!r}"[:300])
                    if pending is not None and pending[0] == "unref" and pending[1] in self.owned:
                        self.owned.remove(pending[1])  # its state is unknown now: stop using it
                    elif pending is not None and pending[0] in ("get", "ref") \
                            and pending[1] in self.owned:
                        self.owned.remove(pending[1])
                    pending = None
                self.node = (self.node + 1) % len(self.nodes.cfgs)
                await trio.sleep(0.1 + self.rng.random() * 0.2)


async def restarter(nodes: Nodes, stats: Stats, every: float, deadline: float) -> None:
    """Stop one node every `every` s (SIGTERM, SIGKILL alternately) and start it again."""
    i = 0
    while time.monotonic() + every < deadline:
        await trio.sleep(every)
        node = i % len(nodes.cfgs)
        sig = signal.SIGTERM if i % 2 == 0 else signal.SIGKILL
        t0 = time.monotonic()
        stats.down.add(node)
        await nodes.stop(node, sig)
        stopped = time.monotonic()
        nodes.start(node)
        await nodes.wait_ready(node)
        stats.down.discard(node)
        stats.last_back = time.monotonic()
        stats.restarts.append({"node": f"node{node + 1}", "signal": sig.name,
                               "stop_s": round(stopped - t0, 2),
                               "down_s": round(stats.last_back - t0, 2)})
        i += 1


async def sampler(nodes: Nodes) -> None:
    while True:
        nodes.sample()
        await trio.sleep(0.5)


async def _run(nodes: Nodes, stats: Stats, seconds: float, clients: int, restart_every: float) -> None:
    for i in range(len(nodes.configs)):
        nodes.start(i)
    for i in range(len(nodes.configs)):
        await nodes.wait_ready(i)
    await trio.sleep(1.0)  # the nodes connect to each other
    t0 = time.monotonic()
    deadline = t0 + seconds
    stats.load_seconds = seconds
    async with trio.open_nursery() as outer:
        outer.start_soon(sampler, nodes)
        if restart_every > 0:
            outer.start_soon(restarter, nodes, stats, restart_every, deadline)
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(SoakClient(i, nodes, stats, deadline).run)
        stats.seconds = time.monotonic() - t0
        outer.cancel_scope.cancel()
    nodes.sample()


def run_soak(seconds: float = 300, clients: int = 64, restart_every: float = 60,
             ram_buffer: int = 128 * MIB, base_dir: str | None = None) -> Stats:
    """Run one soak; the cluster's files are deleted afterwards."""
    root = Path(tempfile.mkdtemp(prefix="soak-", dir=base_dir))
    stats = Stats(budget=ram_buffer + RSS_OVERHEAD)
    nodes = Nodes(write_cluster(root, ram_buffer))
    try:
        trio.run(_run, nodes, stats, seconds, clients, restart_every)
    finally:
        nodes.close()
        stats.peak_anon = list(nodes.peak_anon)
        shutil.rmtree(root, ignore_errors=True)
    return stats


def _pct(vals: list[float], q: float) -> float:
    s = sorted(vals)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000 if s else float("nan")


def _span(stats: Stats, kind: str) -> float:
    """Seconds over which `kind` ran: the load phase, or the final read-back after it."""
    return stats.seconds - stats.load_seconds if kind == "final_get" else stats.load_seconds


def summary(stats: Stats) -> dict[str, Any]:
    """The figures of a run as a JSON-ready dict."""
    return {
        "seconds": round(stats.seconds, 1),
        "load_seconds": round(stats.load_seconds, 1),
        "kinds": {k: {"ops": len(stats.lat[k]),
                      "ops_per_s": round(len(stats.lat[k]) / max(_span(stats, k), 1e-3), 1),
                      "p50_ms": round(_pct(stats.lat[k], 0.5), 1),
                      "p99_ms": round(_pct(stats.lat[k], 0.99), 1)}
                  for k in KINDS if stats.lat.get(k)},
        "errors": len(stats.errors), "error_samples": stats.errors[:10],
        "retries": stats.retries, "retries_outside_restarts": stats.retries_outside,
        "retry_causes": dict(stats.retry_causes),
        "restarts": stats.restarts,
        "peak_rss_anon_mib": [round(p / MIB, 1) for p in stats.peak_anon],
        "rss_budget_mib": round(stats.budget / MIB, 1),
        "ok": stats.ok,
    }


def table(stats: Stats) -> str:
    """The report as a Markdown table plus a few lines."""
    s = summary(stats)
    rows = ["| op | ops | ops/s | p50 ms | p99 ms |", "| --- | ---: | ---: | ---: | ---: |"]
    all_lat = [v for k in KINDS if k != "final_get" for v in stats.lat.get(k, [])]
    for k, v in s["kinds"].items():
        rows.append(f"| {k} | {v['ops']} | {v['ops_per_s']} | {v['p50_ms']} | {v['p99_ms']} |")
    mixed = len(all_lat) / max(stats.load_seconds, 1e-3)
    rows.append(f"| all but final_get | {len(all_lat)} | {mixed:.1f} | {_pct(all_lat, 0.5):.1f} | "
                f"{_pct(all_lat, 0.99):.1f} |")
    restarts = ", ".join(f"{r['node']} {r['signal']} (down {r['down_s']} s)" for r in s["restarts"])
    rss = ", ".join(f"node{i + 1} {m} MiB" for i, m in enumerate(s["peak_rss_anon_mib"]))
    rows += [
        "",
        f"seconds {s['load_seconds']} of load + {s['seconds'] - s['load_seconds']:.1f} of final "
        f"read-back; errors {s['errors']}; retries {s['retries']} "
        f"({s['retries_outside_restarts']} outside a restart window; causes {s['retry_causes']})",
        f"restarts: {restarts or 'none'}",
        f"peak RssAnon: {rss} (budget {s['rss_budget_mib']} MiB = block_ram_buffer_max + "
        f"{RSS_OVERHEAD // MIB} MiB)",
        f"result: {'OK' if s['ok'] else 'FAILED'}",
    ]
    rows += [f"error: {e}" for e in s["error_samples"]]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--restart-every", type=float, default=60,
                    help="seconds between node restarts (0: none)")
    ap.add_argument("--ram-buffer", default="128M", help="block_ram_buffer_max of the nodes")
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args(argv)
    if a.seconds <= 0 or a.clients < 1 or a.restart_every < 0:
        ap.error("--seconds must be > 0, --clients >= 1, --restart-every >= 0")
    ram_buffer = parse_size(a.ram_buffer)
    if ram_buffer is None or ram_buffer <= 0:
        ap.error(f"--ram-buffer: expected a size such as 128M, got {a.ram_buffer!r}")
    load = os.getloadavg()
    stats = run_soak(a.seconds, a.clients, a.restart_every, ram_buffer)
    print(f"soak: 3 nodes (rf 3, quorum 2), {a.clients} clients, {a.seconds:.0f} s, restart "
          f"every {a.restart_every:.0f} s; load average before {load[0]:.2f}, after "
          f"{os.getloadavg()[0]:.2f}")
    print(table(stats))
    if a.json:
        Path(a.json).write_text(json.dumps(summary(stats), indent=2))
    return 0 if stats.ok else 1


if __name__ == "__main__":
    sys.exit(main())
