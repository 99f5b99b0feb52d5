"""Test harness: clusters of nodes in one process (real loopback TCP) and of real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from blocknode.client import Client, open_client
from blocknode.clock import wall_ms
from blocknode.config import NodeConfig, load_config
from blocknode.node import Node
from tests.fakes import FakeClock


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports that were free a moment ago on 127.0.0.1."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def write_cluster(root: Path, n: int, *, rf: int = 3, write_quorum: int | None = None,
                  zones: int | None = None, **node_fields: Any) -> list[Path]:
    """Configs for `n` nodes under `root` with free ports; extra node fields apply to all."""
    ports = free_ports(n)
    secret = os.urandom(32).hex()
    lines = [f"replication_factor = {rf}"]
    if write_quorum is not None:
        lines.append(f"write_quorum = {write_quorum}")
    for i, port in enumerate(ports, 1):
        zone = f"z{(i - 1) % (zones or n) + 1}"
        lines += ["[[nodes]]", f'id = "node{i}"', f'addr = "127.0.0.1:{port}"', f'zone = "{zone}"']
    (root / "cluster.toml").write_text("\n".join(lines) + "\n")
    paths = []
    defaults = {"rpc_timeout": 5.0, "connect_timeout": 1.0, "data_fsync": False,
                "metadata_fsync": False, "lmdb_map_size": 1 << 28}
    defaults.update(node_fields)
    for i, port in enumerate(ports, 1):
        d = root / f"node{i}"
        d.mkdir(parents=True, exist_ok=True)
        body = [f'node_id = "node{i}"', 'data_dir = "data"', 'metadata_dir = "meta"',
                f'rpc_bind_addr = "127.0.0.1:{port}"', 'cluster_file = "../cluster.toml"',
                f'rpc_secret = "{secret}"', f'zone = "z{(i - 1) % (zones or n) + 1}"']
        for k, v in defaults.items():
            body.append(f"{k} = {_toml(v)}")
        (d / "config.toml").write_text("\n".join(body) + "\n")
        paths.append(d / "config.toml")
    return paths


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


@dataclass
class InProcessCluster:
    """Nodes running in this Trio run; each can be stopped and restarted."""

    configs: list[NodeConfig]
    nursery: trio.Nursery
    clock: Callable[[], int] | None = None  # the nodes' persisted-time clock (default: wall)
    nodes: dict[str, Node] = field(default_factory=dict)
    scopes: dict[str, trio.CancelScope] = field(default_factory=dict)
    stopped: dict[str, trio.Event] = field(default_factory=dict)

    def cfg(self, node_id: str) -> NodeConfig:
        return next(c for c in self.configs if c.node_id == node_id)

    async def start(self, node_id: str) -> Node:
        node = Node(self.cfg(node_id), **({"now_ms": self.clock} if self.clock else {}))
        scope = trio.CancelScope()
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await node.run(task_status=task_status)
            finally:
                done.set()

        await self.nursery.start(run)
        self.nodes[node_id], self.scopes[node_id], self.stopped[node_id] = node, scope, done
        await node.net.check_peers()  # connecting to the others tells them we are up
        return node

    async def stop(self, node_id: str) -> None:
        self.scopes[node_id].cancel()
        await self.stopped[node_id].wait()
        del self.nodes[node_id]

    @asynccontextmanager
    async def client(self, node_id: str) -> AsyncIterator[Client]:
        async with open_client(self.cfg(node_id), timeout=10) as c:
            yield c

    async def resync_all(self) -> dict[str, int]:
        """One resync `run_once` on every running node."""
        return {nid: await n.resync.run_once() for nid, n in self.nodes.items()}


@asynccontextmanager
async def in_process_cluster(root: Path, n: int, *, clock: Callable[[], int] | None = None,
                             **kw: Any) -> AsyncIterator[InProcessCluster]:
    """Start `n` nodes (see `write_cluster`) in this process; all stopped on exit."""
    configs = [load_config(p) for p in write_cluster(root, n, **kw)]
    async with trio.open_nursery() as nursery:
        cluster = InProcessCluster(configs, nursery, clock)
        for c in configs:
            await cluster.start(c.node_id)
        for node in cluster.nodes.values():
            await node.net.check_peers()
        try:
            yield cluster
        finally:
            nursery.cancel_scope.cancel()


class ServeProcesses:
    """Real `python -m blocknode serve` processes; always killed by `close()`."""

    def __init__(self, configs: list[Path], env: dict[str, str] | None = None) -> None:
        self.configs = configs
        self.env = {**os.environ, **(env or {})}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, i: int, *, nofile: int | None = None) -> None:
        """Start node index `i` (with `nofile`: that soft and hard descriptor limit)."""
        log = open(self.configs[i].parent / "serve.log", "ab")  # noqa: SIM115 - owned by the process

        def limit() -> None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "blocknode", "serve", "--config", str(self.configs[i])],
            stdout=log, stderr=log, env=self.env, start_new_session=True,
            preexec_fn=limit if nofile is not None else None,
        )

    def start_all(self) -> None:
        for i in range(len(self.configs)):
            self.start(i)
        for i in range(len(self.configs)):
            self.wait_ready(i)

    def wait_ready(self, i: int, timeout: float = 20.0) -> None:
        cfg = load_config(self.configs[i])
        host, _, port = cfg.rpc_bind_addr.rpartition(":")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[i].poll() is not None:
                log = (self.configs[i].parent / "serve.log").read_text()
                raise RuntimeError(f"serve {i} exited: {log[-2000:]}")
            try:
                socket.create_connection((host, int(port)), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"node {i} did not listen within {timeout}s")

    def signal(self, i: int, sig: int) -> None:
        os.killpg(self.procs[i].pid, sig)

    def kill(self, i: int) -> None:
        p = self.procs.pop(i)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()

    def close(self) -> None:
        for i in list(self.procs):
            self.kill(i)


def cli(*args: str, config: Path | None = None, input: bytes | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m blocknode ARGS` and capture its output."""
    cmd = [sys.executable, "-m", "blocknode", *args]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(cmd, input=input, capture_output=True, timeout=timeout)


GC_DELAY = 600.0
"""The GC delay of `cluster3` (a fake clock makes it pass at once)."""


async def settled(cl: InProcessCluster, hashes: list[bytes], *, referenced: bool = True) -> None:
    """Wait until every running node holds each block with (or without) a live reference.

    A put or unref returns once the write quorum acknowledged; the third call
    is still in flight. Nothing signals its arrival on the other node, so poll.
    """
    while not all(n.blocks.exists(h) and n.meta.rc_get(h).is_nonzero() == referenced
                  for n in cl.nodes.values() for h in hashes):
        await trio.sleep(0.01)


@asynccontextmanager
async def cluster3(root: Path, **kw: Any) -> AsyncIterator[InProcessCluster]:
    """A 3-node in-process cluster on a shared `FakeClock`, with short timeouts."""
    fields = {"gc_delay": GC_DELAY, "rpc_timeout": 3.0, "need_block_timeout": 1.0,
              "inline_threshold": 1024, "resync_tranquility": 0, **kw}
    async with in_process_cluster(root, 3, clock=FakeClock(wall_ms()), **fields) as cl:
        yield cl
