"""The seams a node runs on: its clock, its randomness, how it runs blocking
calls, how it opens connections, and the file system of its block files.

Every component of a node takes these from one `NodeContext` (the node builds
it, or a test or the simulation hands one in) instead of calling `time`,
`random`, `os.urandom`, `trio.to_thread` or `trio.open_tcp_stream` itself. The
monotonic clock is Trio's own (`trio.current_time`), which `trio.run(clock=...)`
already makes injectable (`trio.testing.MockClock`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import trio

from blocknode import threads
from blocknode.clock import wall_ms
from blocknode.fs import OS_FS, FileSystem
from blocknode.rpc.transport import Connector, tcp_connect

__all__ = ["NodeContext", "RunSync", "run_in_thread"]

T = TypeVar("T")


class RunSync(Protocol):
    """Runs a blocking function off the event loop: ``await run_sync(fn, *args, limiter=...)``."""

    async def __call__(
        self, fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None
    ) -> T: ...


async def run_in_thread(
    fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None
) -> T:
    """The real `RunSync`: a worker thread of the lean pool (`blocknode.threads`).

    Same semantics as ``trio.to_thread.run_sync(fn, *args, limiter=limiter)`` (not
    abandoned on cancellation, `limiter` bounds concurrency) at about half its
    CPU per hop (≈ 45–80 µs here against 100–150 µs: still, batch work per hop).
    """
    return await threads.run_sync(fn, *args, limiter=limiter)


@dataclass(frozen=True)
class NodeContext:
    """Clock, randomness, blocking calls and transport of one node (see module docstring).

    `now_ms`: persisted-time clock (ms since the epoch). `random`: every jitter
    and sampling choice. `urandom`: nonces, secrets, fresh ids. `run_sync`:
    blocking work (file I/O, fsync, LMDB commits, hashing large blocks).
    `connect`: opens a stream to ``"host:port"``. `fs`: the file system of the
    block files (`blocknode.fs`; the metadata's LMDB files are always the OS's).
    """

    now_ms: Callable[[], int] = wall_ms
    random: random.Random = field(default_factory=random.Random)
    urandom: Callable[[int], bytes] = os.urandom
    run_sync: RunSync = run_in_thread
    connect: Connector = tcp_connect
    fs: FileSystem = OS_FS

    @classmethod
    def real(cls) -> NodeContext:
        """The production context: system clock, OS randomness, threads, TCP, OS files."""
        return cls()
