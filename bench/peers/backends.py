"""The two systems the peer load generator drives, behind one interface.

A backend has ``put(data) -> key``, ``get(key) -> bytes`` and ``close()``; with
``is_async = True`` they are Trio coroutines and the load generator's workers are
Trio tasks, otherwise they are called from `concurrency` threads.

- `BlocknodeBackend`: the blocknode Trio client, one connection per node (at least
  three in all), puts and gets spread round-robin: each node coordinates its share.
  A put returns once the write quorum stored the block and its reference.
- `SwiftDirectBackend`: Swift's object servers driven directly, replication done
  here as Swift's proxy would: the object goes to the ring's 3 primaries in
  parallel and the PUT succeeds at 2 × 201 (the third finishes in the background);
  a GET asks the replicas in random order until one answers 200. No proxy, auth or
  container listing: the closest Swift analogue of a block manager. Placement is
  Swift's hash_path (md5 of prefix/account/container/object/suffix) and part_power.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import random
import struct
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import AsyncExitStack
from typing import Any

LOOPBACK = ("127.", "localhost", "::1")


class BlocknodeBackend:
    """blocknode through its client API (Trio)."""

    is_async = True

    def __init__(self, opts: dict[str, str]) -> None:
        from blocknode.config import load_config

        paths = [p for p in opts.get("configs", "").split(",") if p]
        if not paths:
            raise ValueError("blocknode backend: option configs=A.toml,B.toml,... is required")
        self.cfgs = [load_config(p) for p in paths]
        self.conns = max(len(self.cfgs), int(opts.get("conns", 3)))
        self.clients: list[Any] = []
        self.rr = itertools.count()

    def trio_run(self, main: Callable[[], Awaitable[None]]) -> None:
        """Run `main` with the clients open (they own nurseries, so inside trio.run)."""
        import trio

        from blocknode.client import open_client

        async def wrapped() -> None:
            async with AsyncExitStack() as stack:
                self.clients = [await stack.enter_async_context(
                    open_client(self.cfgs[i % len(self.cfgs)], timeout=60)) for i in range(self.conns)]
                try:
                    await main()
                finally:
                    self.clients = []

        trio.run(wrapped)

    async def put(self, data: bytes) -> bytes:
        """Store one block with a reference; its hash."""
        return await self.clients[next(self.rr) % len(self.clients)].put_block(data, "peer-bench")

    async def get(self, key: bytes) -> bytes:
        """The block's verified bytes."""
        return await self.clients[next(self.rr) % len(self.clients)].get_block(key)

    def close(self) -> None:
        """Nothing left open outside `trio_run`."""

    def describe(self) -> dict[str, Any]:
        """What was measured."""
        import blocknode.fastpath as fp

        return {"kind": f"blocknode {len(self.cfgs)} node(s) via the client API",
                "fastpath": fp.IMPLEMENTATION, "connections": self.conns}


class _ConnPool:
    """One keep-alive HTTPConnection per (thread, host, port), loopback only."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.local = threading.local()
        self.timeout = timeout
        self.all: list[http.client.HTTPConnection] = []
        self.lock = threading.Lock()

    def _get(self, host: str, port: int) -> http.client.HTTPConnection:
        d = getattr(self.local, "d", None)
        if d is None:
            d = self.local.d = {}
        c = d.get((host, port))
        if c is None:
            if not host.startswith(LOOPBACK):
                raise ValueError(f"refusing non-loopback host {host!r}")
            c = d[(host, port)] = http.client.HTTPConnection(host, port, timeout=self.timeout)
            with self.lock:
                self.all.append(c)
        return c

    def _drop(self, host: str, port: int) -> None:
        c = self.local.d.pop((host, port), None)
        if c is not None:
            c.close()

    def request(self, host: str, port: int, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body); retries once on a stale keep-alive connection."""
        for attempt in (0, 1):
            c = self._get(host, port)
            try:
                c.request(method, path, body=body, headers=headers or {})
                r = c.getresponse()
                data = r.read()
                if (r.getheader("Connection") or "").lower() == "close":
                    self._drop(host, port)
                return r.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop(host, port)
                if attempt:
                    raise
            except Exception:
                self._drop(host, port)
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self.lock:
            for c in self.all:
                c.close()


class SwiftDirectBackend:
    """Swift 2.30 object servers direct, write quorum 2 of 3 (threads)."""

    is_async = False

    def __init__(self, opts: dict[str, str]) -> None:
        peer_path = opts.get("peer")
        if not peer_path:
            raise ValueError("swift-direct backend: option peer=.../etc/peer.json is required")
        with open(peer_path) as f:
            self.peer = json.load(f)
        self.nodes = self.peer["object_servers"]
        self.quorum = int(opts.get("quorum", 2))
        self.shift = 32 - int(self.peer["part_power"])
        self.prefix = self.peer["hash_path_prefix"].encode("latin1")
        self.suffix = self.peer["hash_path_suffix"].encode("latin1")
        self.acct, self.cont = self.peer["account"], self.peer["container"]
        self.pool = _ConnPool()
        self.ex = ThreadPoolExecutor(max_workers=int(opts.get("fanout_threads", 48)))
        self.ts_lock = threading.Lock()
        self.last_ts = 0.0

    def _part(self, name: str) -> int:
        h = hashlib.md5(self.prefix + f"/{self.acct}/{self.cont}/{name}".encode() + self.suffix)
        return struct.unpack_from(">I", h.digest())[0] >> self.shift

    def _ts(self) -> str:
        with self.ts_lock:  # unique, increasing X-Timestamp (Swift's internal format)
            t = max(time.time(), self.last_ts + 0.00001)
            self.last_ts = t
        return f"{t:016.05f}"

    def _put_one(self, node: dict[str, Any], path: str, data: bytes, ts: str) -> int:
        st, _ = self.pool.request(node["host"], node["port"], "PUT", f"/{node['device']}{path}",
                                  body=data, headers={
                                      "X-Timestamp": ts, "Content-Length": str(len(data)),
                                      "Content-Type": "application/octet-stream",
                                      "X-Backend-Storage-Policy-Index": "0"})
        return st

    def put(self, data: bytes) -> str:
        """PUT to the 3 primaries in parallel; return at quorum."""
        name = uuid.uuid4().hex
        path = f"/{self._part(name)}/{self.acct}/{self.cont}/{name}"
        ts = self._ts()
        futs: set[Future[int]] = {self.ex.submit(self._put_one, n, path, data, ts) for n in self.nodes}
        ok = failed = 0
        errs: list[str] = []
        while futs:
            done, futs = wait(futs, return_when=FIRST_COMPLETED)
            for fut in done:
                try:
                    st = fut.result()
                except Exception as e:  # noqa: BLE001 - one replica's failure
                    failed += 1
                    errs.append(repr(e))
                    continue
                if st == 201:
                    ok += 1
                else:
                    failed += 1
                    errs.append(str(st))
            if ok >= self.quorum:
                return name
            if failed > len(self.nodes) - self.quorum:
                break
        raise RuntimeError(f"PUT {name}: quorum not reached ({ok} ok, errors {errs})")

    def get(self, key: str) -> bytes:
        """GET from the replicas in random order."""
        path = f"/{self._part(key)}/{self.acct}/{self.cont}/{key}"
        nodes = list(self.nodes)
        random.shuffle(nodes)
        last: object = None
        for n in nodes:
            try:
                st, body = self.pool.request(n["host"], n["port"], "GET", f"/{n['device']}{path}",
                                             headers={"X-Backend-Storage-Policy-Index": "0"})
            except Exception as e:  # noqa: BLE001 - try the next replica
                last = repr(e)
                continue
            if st == 200:
                return body
            last = st
        raise RuntimeError(f"GET {key}: no replica answered 200 (last {last})")

    def close(self) -> None:
        """Wait for background replica PUTs, close connections."""
        self.ex.shutdown(wait=True)
        self.pool.close()

    def describe(self) -> dict[str, Any]:
        """What was measured."""
        return {"kind": f"swift object servers direct, quorum {self.quorum} of {len(self.nodes)}"}


BACKENDS: dict[str, type[BlocknodeBackend] | type[SwiftDirectBackend]] = {
    "blocknode": BlocknodeBackend, "swift-direct": SwiftDirectBackend}


def make_backend(name: str, opts: dict[str, str]) -> BlocknodeBackend | SwiftDirectBackend:
    """The backend called `name` ('blocknode' or 'swift-direct')."""
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None
    return cls(opts)
