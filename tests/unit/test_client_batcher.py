"""The client's put batcher (issue 9 C.14): every caller gets an answer, within a deadline."""

from __future__ import annotations

from typing import Any

import trio

from blocknode.client.batcher import BATCH_MAX_ITEMS, PutBatcher
from blocknode.errors import NodeUnreachable, RpcError, RpcTimeout


class FakeClient:
    """What `PutBatcher` uses of a `Client`: `call`, `block_size`, `timeout`."""

    def __init__(self, *, fail_first: int = 0, hang: bool = False, timeout: float = 10.0) -> None:
        self.block_size = 1 << 20
        self.timeout = timeout
        self.batches: list[int] = []
        self.fail_first = fail_first
        self.hang = hang
        self.gate: trio.Event | None = None  # when set: the first call waits for it

    async def call(self, kind: str, fields: dict[str, Any], data: bytes | None = None
                   ) -> tuple[dict[str, Any], bytes | None]:
        assert kind == "client_put_many"
        rows = fields["items"]
        assert all(len(r) == 2 for r in rows)  # [ref_id, length]: no client time
        self.batches.append(len(rows))
        await trio.sleep(0.01)
        if self.gate is not None and len(self.batches) == 1:
            await self.gate.wait()
        if self.hang:
            await trio.sleep_forever()
        if len(self.batches) <= self.fail_first:
            raise NodeUnreachable("connection lost")
        return {"hashes": [bytes([i % 256]) * 32 for i in range(len(rows))],
                "errors": [None] * len(rows)}, None


async def test_callers_queued_beyond_a_failed_batch_still_get_an_answer():
    """Issue 9 C.14: when a batch failed, the callers queued beyond it waited forever
    (44 of 300 in a run: the 300 did not fit in one batch of 256)."""
    client = FakeClient(fail_first=1)
    batcher = PutBatcher(client)  # type: ignore[arg-type]
    outcomes: dict[int, str] = {}

    async def put(i: int) -> None:
        try:
            await batcher.put(i.to_bytes(4, "big"), f"r{i}")
            outcomes[i] = "ok"
        except NodeUnreachable:
            outcomes[i] = "failed"

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(put, i)
    assert len(outcomes) == 300
    assert client.batches[0] == BATCH_MAX_ITEMS and sum(client.batches) == 300
    assert list(outcomes.values()).count("failed") == BATCH_MAX_ITEMS
    assert list(outcomes.values()).count("ok") == 300 - BATCH_MAX_ITEMS


async def test_a_put_has_a_deadline():
    client = FakeClient(hang=True)
    batcher = PutBatcher(client)  # type: ignore[arg-type]
    errors: list[BaseException] = []

    async def put(i: int) -> None:
        try:
            await batcher.put(b"x", f"r{i}", timeout=0.3)
        except RpcTimeout as exc:
            errors.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(put, 0)  # becomes the collector, its call never returns
            await trio.sleep(0.05)
            for i in range(1, 4):  # queued behind it
                nursery.start_soon(put, i)
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
    assert len(errors) == 3 and "no answer within 0.3s" in str(errors[0])
    assert batcher._pending == []  # a put that gave up is not sent later


async def test_a_cancelled_collector_hands_the_queue_on():
    """The caller sending the batches is cancelled while its batch is in flight: that
    batch's callers get an error, the callers queued beyond it are still served."""
    client = FakeClient()
    client.gate = trio.Event()  # never set: the first batch stays in flight
    batcher = PutBatcher(client)  # type: ignore[arg-type]
    outcomes: dict[int, str] = {}

    async def put(i: int) -> None:
        try:
            await batcher.put(i.to_bytes(4, "big"), f"r{i}")
            outcomes[i] = "ok"
        except RpcError:
            outcomes[i] = "cancelled"

    collector = trio.CancelScope()

    async def first() -> None:
        with collector:
            await batcher.put(b"first", "r-first")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            while not batcher._collecting:  # it becomes the collector
                await trio.sleep(0)
            for i in range(299):
                nursery.start_soon(put, i)
            while not client.batches:  # the first batch is in flight
                await trio.sleep(0.001)
            await trio.sleep(0.05)  # everybody has queued
            in_flight = client.batches[0]
            assert len(client.batches) == 1 and in_flight < 300
            collector.cancel()
    assert len(outcomes) == 299
    assert list(outcomes.values()).count("cancelled") == in_flight - 1  # beside "first"
    assert list(outcomes.values()).count("ok") == 300 - in_flight
