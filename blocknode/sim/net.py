"""The simulated network: in-memory byte streams between nodes (and the client).

Every stream is a pair of one-way `_Pipe`s. Bytes sent are delivered in order
(TCP) after a seeded per-link delay, in random pieces. Faults, all decided by
the simulation's seeded RNG:

- *partition* (symmetric or one-way): bytes on a blocked direction are held
  (the connection stalls, timeouts fire) and new connects over it hang until
  the connect timeout;
- *clog*: a link's delay goes up for a while;
- *reset*: every stream between two endpoints breaks at once (what a dropped
  segment storm / RST does to TCP: a byte stream cannot lose or reorder bytes
  silently, so message-level loss, duplication and reordering show up to the
  node as broken connections and retried calls);
- a *crash* of a node breaks all of its streams and closes its listener
  (connects are refused until it listens again).
"""

from __future__ import annotations

import errno
import math
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["SimNet", "SimListener", "SimStream"]


class _Pipe:
    """One direction of a stream: bytes in flight with their delivery times."""

    def __init__(self, net: SimNet, src: str, dst: str) -> None:
        self.net, self.src, self.dst = net, src, dst
        self.chunks: deque[tuple[float, bytearray]] = deque()
        self.last_at = 0.0
        self.eof = False
        self.broken = False
        self.lot = trio.lowlevel.ParkingLot()

    def put(self, data: bytes) -> None:
        now = trio.current_time()
        at = max(now + self.net.delay(self.src, self.dst), self.last_at)
        self.last_at = at
        self.chunks.append((at, bytearray(data)))
        self.lot.unpark_all()

    async def get(self, max_bytes: int | None) -> bytes:
        while True:
            if self.broken:
                raise trio.BrokenResourceError("connection reset (simulated)")
            blocked = self.net.blocked(self.src, self.dst)
            if self.chunks and not blocked:
                at, buf = self.chunks[0]
                now = trio.current_time()
                if at <= now:
                    n = len(buf)
                    if n > 1 and self.net.rng.random() < 0.1:
                        n = self.net.rng.randint(1, n)  # a partial read
                    if max_bytes is not None:
                        n = min(n, max_bytes)
                    out = bytes(buf[:n])
                    del buf[:n]
                    if not buf:
                        self.chunks.popleft()
                    return out
                deadline = at
            elif self.eof and not self.chunks:
                return b""
            else:
                deadline = math.inf
            if deadline == math.inf:
                await self.lot.park()
            else:
                with trio.move_on_at(deadline):
                    await self.lot.park()

    def wake(self) -> None:
        self.lot.unpark_all()


class SimStream(trio.abc.Stream):
    """One end of a simulated connection."""

    def __init__(self, net: SimNet, local: str, remote: str, out: _Pipe, inp: _Pipe) -> None:
        self.net, self.local, self.remote = net, local, remote
        self._out, self._in = out, inp
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self._out.broken or self._out.eof:
            raise trio.BrokenResourceError("connection reset (simulated)")
        if data:
            self._out.put(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        self._out.eof = True
        self._out.wake()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        data = await self._in.get(max_bytes)
        await trio.lowlevel.checkpoint_if_cancelled()
        return data

    def break_(self) -> None:
        for p in (self._out, self._in):
            p.broken = True
            p.wake()

    async def aclose(self) -> None:
        self._closed = True
        self._out.eof = True
        self._out.wake()
        self._in.broken = True
        self._in.wake()
        self.net.forget(self)
        await trio.lowlevel.checkpoint()


class SimListener(trio.abc.Listener[trio.abc.Stream]):
    """A node's listening socket: connects arrive through a memory channel."""

    def __init__(self, net: SimNet, node_id: str) -> None:
        self.net, self.node_id = net, node_id
        self.send, self.recv = trio.open_memory_channel[SimStream](math.inf)
        self.closed = False

    async def accept(self) -> trio.abc.Stream:
        try:
            return await self.recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("listener closed") from None

    async def aclose(self) -> None:
        self.closed = True
        if self.net.listeners.get(self.node_id) is self:
            del self.net.listeners[self.node_id]
        self.recv.close()
        await trio.lowlevel.checkpoint()


class SimNet:
    """All links of one simulation (see module docstring)."""

    def __init__(self, rng: random.Random, addrs: dict[str, str],
                 trace: Callable[[str], None]) -> None:
        self.rng = rng
        self.addr_to_node = {a: n for n, a in addrs.items()}
        self.listeners: dict[str, SimListener] = {}
        self.streams: set[SimStream] = set()
        self.blocked_links: set[tuple[str, str]] = set()
        self.clogged: dict[tuple[str, str], float] = {}
        self.trace = trace
        self.stats: dict[str, int] = {"connects": 0, "refused": 0, "hung": 0}

    # --- faults
    def delay(self, src: str, dst: str) -> float:
        base = self.rng.uniform(0.0002, 0.003)
        return base + self.clogged.get((src, dst), 0.0)

    def blocked(self, src: str, dst: str) -> bool:
        return (src, dst) in self.blocked_links

    def _wake_all(self) -> None:
        for s in self.streams:
            s._in.wake()
            s._out.wake()

    def set_blocked(self, links: set[tuple[str, str]]) -> None:
        self.blocked_links = set(links)
        self._wake_all()

    def reset(self, a: str, b: str) -> int:
        hit = [s for s in self.streams if {s.local, s.remote} == {a, b}]
        for s in hit:
            s.break_()
        return len(hit)

    def crash(self, node: str) -> None:
        for s in [s for s in self.streams if node in (s.local, s.remote)]:
            s.break_()
        lst = self.listeners.pop(node, None)
        if lst is not None:
            lst.closed = True

    def forget(self, s: SimStream) -> None:
        self.streams.discard(s)

    # --- endpoints
    def listener(self, node: str) -> SimListener:
        lst = SimListener(self, node)
        self.listeners[node] = lst
        return lst

    def connector(self, src: str) -> Callable[[str], Any]:
        async def connect(addr: str) -> trio.abc.Stream:
            dst = self.addr_to_node.get(addr)
            await trio.sleep(self.delay(src, dst or ""))
            if dst is None:
                raise OSError(errno.EHOSTUNREACH, f"no route to {addr}")
            if self.blocked(src, dst) or self.blocked(dst, src):
                self.stats["hung"] += 1
                await trio.sleep_forever()  # SYN or SYN-ACK lost: the connect timeout fires
            lst = self.listeners.get(dst)
            if lst is None or lst.closed:
                self.stats["refused"] += 1
                raise OSError(errno.ECONNREFUSED, f"connection refused by {addr}")
            self.stats["connects"] += 1
            ab, ba = _Pipe(self, src, dst), _Pipe(self, dst, src)
            mine = SimStream(self, src, dst, ab, ba)
            theirs = SimStream(self, dst, src, ba, ab)
            self.streams.update((mine, theirs))
            lst.send.send_nowait(theirs)
            return mine

        return connect
