"""Test fakes shared by every test module: one definition each.

`SECRET` (a cluster secret), `KEY` and `OPEN` (a client key and what an
in-memory network accepts), `FakeClock` (a settable millisecond clock for
persisted times), `MemoryNet` / `MemoryListener` (in-memory transport: listeners
by address and a connector, the transport seam of `NodeContext`).
"""

from __future__ import annotations

import trio
import trio.testing

from blocknode.rpc.handshake import ClientKey

SECRET = bytes(range(32))
"""A cluster secret (32 bytes)."""
KEY = ClientKey.generate()
"""A client key every in-memory network here accepts."""
OPEN = {"members": {"a", "b", "n"}, "lookup_key": {KEY.id: KEY.verifier}.get}
"""What a serving network here accepts: nodes a, b and n, and clients with KEY."""


class FakeClock:
    """A settable millisecond clock (the `now_ms` of a `NodeContext`)."""

    def __init__(self, t: int = 1_700_000_000_000) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t

    def advance(self, seconds: float) -> None:
        """Move the clock forward by `seconds`."""
        self.t += int(seconds * 1000)


class MemoryNet:
    """In-memory listeners by address, and a connector for RpcNetwork."""

    def __init__(self) -> None:
        self.listeners: dict[str, MemoryListener] = {}

    def listener(self, addr: str) -> MemoryListener:
        """A new listener at `addr` (replacing any earlier one)."""
        self.listeners[addr] = MemoryListener()
        return self.listeners[addr]

    async def connect(self, addr: str) -> trio.abc.Stream:
        """The connector: a memory stream pair, the server end handed to `addr`'s listener."""
        if addr not in self.listeners:
            raise OSError(f"connection refused: {addr}")
        client, server = trio.testing.memory_stream_pair()
        await self.listeners[addr].send.send(server)
        return client


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener fed by `MemoryNet.connect`."""

    def __init__(self) -> None:
        self.send, self.recv = trio.open_memory_channel[trio.abc.Stream](100)

    async def accept(self) -> trio.abc.Stream:
        return await self.recv.receive()

    async def aclose(self) -> None:
        await self.recv.aclose()
