"""How a node opens a byte stream to an address: the transport seam.

`Connector` is the one type every connect routine takes; `tcp_connect` is the
real one. Tests and the simulation pass their own (in-memory streams).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

__all__ = ["Connector", "split_addr", "tcp_connect"]

Connector = Callable[[str], Awaitable[trio.abc.Stream]]
"""Opens a transport stream to ``"host:port"`` (injectable for in-memory tests)."""


def split_addr(addr: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); `ValueError` if malformed."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"address {addr!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


async def tcp_connect(addr: str) -> trio.abc.Stream:
    """The default connector: a TCP stream (TCP_NODELAY is set by trio)."""
    host, port = split_addr(addr)
    return await trio.open_tcp_stream(host, port)
