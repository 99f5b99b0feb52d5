"""`blocknode.client.Client` reopens a connection that ended, with fakes for the
connection and the reconnect function (the real thing, with a SIGKILLed node, is
`tests/cluster/test_client_reconnect.py`): what is sent again, how often it tries,
one reconnect for many callers, and the error when the node stays down."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from blocknode.client import Client
from blocknode.errors import NodeUnreachable, RemoteError
from blocknode.protocol import CLIENT_GET, CLIENT_REF, STATUS


class FakeConn:
    """A connection whose calls are answered, or that breaks under the next call."""

    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        self.name, self.log = name, log
        self.closed = False
        self.break_next = False
        self.peer_id, self.addr = "node1", "127.0.0.1:1"
        self.close_reason: BaseException | None = None

    async def call(self, kind: str, fields: dict[str, Any], data: Any = None, *,
                   timeout: float | None = None) -> tuple[dict[str, Any], bytes | None]:
        if self.closed:
            raise NodeUnreachable(f"connection {self.name} is closed")
        self.log.append((self.name, kind))
        await trio.sleep(0.01)
        if self.break_next:
            self.closed = True
            self.close_reason = NodeUnreachable("peer closed")
            raise NodeUnreachable(f"connection {self.name} closed during {kind}")
        if kind == "boom":
            raise RemoteError("remote says no")
        return {"via": self.name}, None

    async def aclose(self) -> None:
        self.closed = True


class Reconnector:
    """Fails `failures` times, then opens `FakeConn`s; records when it was called."""

    def __init__(self, log: list[tuple[str, str]], failures: int = 0) -> None:
        self.log, self.failures = log, failures
        self.attempts: list[float] = []
        self.made = 0

    async def __call__(self, limit: float) -> FakeConn:
        self.attempts.append(trio.current_time())
        await trio.sleep(0.001)
        if self.failures:
            self.failures -= 1
            raise NodeUnreachable("cannot connect: [Errno 111] Connection refused")
        self.made += 1
        return FakeConn(f"c{self.made}", self.log)


def make(failures: int = 0, timeout: float = 10.0) -> tuple[Client, FakeConn, Reconnector, list]:
    log: list[tuple[str, str]] = []
    first = FakeConn("c0", log)
    rc = Reconnector(log, failures)
    return Client(first, block_size=4096, timeout=timeout, reconnect=rc), first, rc, log  # type: ignore[arg-type]


async def test_an_idempotent_call_broken_under_is_sent_again_on_a_new_connection(autojump_clock):
    for kind in (CLIENT_GET, CLIENT_REF, STATUS):
        client, first, rc, log = make()
        first.break_next = True
        reply, _ = await client.call(kind, {})
        assert reply == {"via": "c1"} and log == [("c0", kind), ("c1", kind)]
        assert client.reconnects == 1


async def test_another_call_broken_under_is_not_sent_again(autojump_clock):
    client, first, rc, log = make()
    first.break_next = True
    with pytest.raises(NodeUnreachable, match="closed during key_put"):
        await client.call("key_put", {})
    assert log == [("c0", "key_put")] and rc.made == 0
    # The next call of any kind finds the connection closed before sending: reopened.
    reply, _ = await client.call("key_put", {})
    assert reply == {"via": "c1"} and log[-1] == ("c1", "key_put")


async def test_a_remote_error_is_not_a_reason_to_reconnect(autojump_clock):
    client, first, rc, log = make()
    with pytest.raises(RemoteError):
        await client.call("boom", {})
    assert rc.attempts == [] and not first.closed


async def test_reconnect_backs_off_until_the_node_is_back(autojump_clock):
    client, first, rc, log = make(failures=4)
    first.closed = True
    reply, _ = await client.call(CLIENT_GET, {})
    assert reply == {"via": "c1"}
    gaps = [round(b - a, 3) for a, b in zip(rc.attempts, rc.attempts[1:], strict=False)]
    assert gaps == [0.051, 0.101, 0.201, 0.401]  # 50 ms doubling, plus each attempt's 1 ms


async def test_a_node_that_stays_down_fails_the_call_within_its_timeout(autojump_clock):
    client, first, rc, log = make(failures=10**6, timeout=5.0)
    first.closed = True
    first.close_reason = NodeUnreachable("peer closed")
    start = trio.current_time()
    with pytest.raises(NodeUnreachable, match=r"could not be reopened within 5s: cannot connect") as e:
        await client.call(STATUS, {})
    assert trio.current_time() - start == pytest.approx(5.0)
    assert "peer closed" in str(e.value)
    assert 5 < len(rc.attempts) < 15  # backoff capped at 1 s, not a busy loop


async def test_many_callers_share_one_reconnect(autojump_clock):
    client, first, rc, log = make(failures=2)
    first.closed = True
    replies: list[dict[str, Any]] = []

    async def one() -> None:
        replies.append((await client.call(CLIENT_GET, {}))[0])

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    assert replies == [{"via": "c1"}] * 20
    assert rc.made == 1 and len(rc.attempts) == 3 and client.reconnects == 1


async def test_no_reconnect_after_close(autojump_clock):
    client, first, rc, log = make()
    await client.aclose()
    with pytest.raises(NodeUnreachable):
        await client.call(CLIENT_GET, {})
    assert rc.attempts == []


async def test_open_client_raises_a_failed_first_connect_as_itself(tmp_path):
    """Not wrapped in an exception group by the nursery the connections run in."""
    import socket

    from blocknode.client import open_client
    from blocknode.config import NodeConfig
    from blocknode.rpc.handshake import ClientKey

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there
    cfg = NodeConfig(node_id="n1", rpc_bind_addr=f"127.0.0.1:{port}", connect_timeout=1.0)
    with pytest.raises(NodeUnreachable, match="cannot connect"):
        async with open_client(cfg, key=ClientKey.generate()):
            pass  # pragma: no cover - never reached
