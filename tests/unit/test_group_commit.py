"""Group commit across clients (issue 15 item 3): requests that arrive while the rounds
are busy go together as the next round; each gets its own results."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from blocknode.errors import BlocknodeError, QuorumError
from blocknode.group_commit import GroupCommit


@asynccontextmanager
async def running(gc: GroupCommit) -> AsyncIterator[None]:
    """`gc.run` in a nursery of its own (the node's, in a node), stopped at the end."""
    async with trio.open_nursery() as service:
        await service.start(gc.run)
        yield
        service.cancel_scope.cancel()


class FakeStore:
    """A `put_many` that records each round and holds it until released."""

    def __init__(self) -> None:
        self.rounds: list[list[tuple[bytes, str]]] = []
        self.release = trio.Event()
        self.fail: BaseException | None = None
        self.hold = True

    async def put_many(self, blocks: list[tuple[bytes, str]]) -> list[bytes | BlocknodeError]:
        self.rounds.append(list(blocks))
        if self.hold:
            await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return [b"h:" + d for d, _ in blocks]


async def test_requests_arriving_during_a_round_go_together_as_the_next() -> None:
    store = FakeStore()
    gc = GroupCommit(store.put_many, rounds=1)
    async with running(gc):
        results: dict[str, list] = {}

        async def put(name: str, n: int) -> None:
            results[name] = await gc.put_many([(f"{name}{i}".encode(), name) for i in range(n)])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(put, "a", 1)
            await trio.testing.wait_all_tasks_blocked()
            for name, n in (("b", 2), ("c", 1), ("d", 3)):
                nursery.start_soon(put, name, n)
            await trio.testing.wait_all_tasks_blocked()
            assert len(store.rounds) == 1  # b, c, d wait for the busy round
            store.release.set()
        assert [sorted(d for d, _ in r) for r in store.rounds] == [
            [b"a0"], [b"b0", b"b1", b"c0", b"d0", b"d1", b"d2"]]
        assert results == {"a": [b"h:a0"], "b": [b"h:b0", b"h:b1"], "c": [b"h:c0"],
                           "d": [b"h:d0", b"h:d1", b"h:d2"]}
        assert (gc.rounds_run, gc.requests_run) == (2, 4)


async def test_a_lone_request_starts_at_once(mock_clock: trio.testing.MockClock) -> None:
    store = FakeStore()
    store.hold = False
    gc = GroupCommit(store.put_many)
    async with running(gc):
        t0 = trio.current_time()
        assert await gc.put_many([(b"x", "r")]) == [b"h:x"]
        assert trio.current_time() == t0 and len(store.rounds) == 1


async def test_a_failed_round_fails_its_own_requests_only() -> None:
    store = FakeStore()
    gc = GroupCommit(store.put_many, rounds=1)
    async with running(gc):
        outcomes: dict[str, object] = {}

        async def put(name: str) -> None:
            try:
                outcomes[name] = await gc.put_many([(name.encode(), name)])
            except BlocknodeError as exc:
                outcomes[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(put, "a")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(put, "b")
            nursery.start_soon(put, "c")
            await trio.testing.wait_all_tasks_blocked()
            store.fail = QuorumError("put", 2, 1, {})
            store.release.set()
            await trio.testing.wait_all_tasks_blocked()
        assert all(isinstance(outcomes[n], QuorumError) for n in "abc")
        store.fail = None
        store.hold = False
        assert await gc.put_many([(b"d", "d")]) == [b"h:d"]


async def test_a_request_cancelled_before_its_round_is_never_sent() -> None:
    store = FakeStore()
    gc = GroupCommit(store.put_many, rounds=1)
    async with running(gc):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gc.put_many, [(b"a", "a")])
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(1):
                await gc.put_many([(b"gone", "g")])
            store.release.set()
        assert [d for r in store.rounds for d, _ in r] == [b"a"]


async def test_a_round_is_bounded_in_items_and_bytes() -> None:
    store = FakeStore()
    gc = GroupCommit(store.put_many, rounds=1, max_items=3, max_bytes=10)
    async with running(gc):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gc.put_many, [(b"0", "r")])
            await trio.testing.wait_all_tasks_blocked()
            for blocks in ([(b"1", "r"), (b"2", "r")], [(b"3", "r"), (b"4", "r")],
                           [(b"5" * 9, "r")], [(b"6" * 20, "r")]):
                nursery.start_soon(gc.put_many, blocks)
                await trio.testing.wait_all_tasks_blocked()
            store.release.set()
        sizes = [(len(r), sum(len(d) for d, _ in r)) for r in store.rounds]
        assert sizes[0] == (1, 1)
        assert all(n <= 3 and (b <= 10 or n == 1) for n, b in sizes)
        assert sorted(d for r in store.rounds for d, _ in r) == sorted(
            [b"0", b"1", b"2", b"3", b"4", b"5" * 9, b"6" * 20])


async def test_off_each_request_is_its_own_round() -> None:
    store = FakeStore()
    store.hold = False
    gc = GroupCommit(store.put_many, rounds=0)
    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(gc.put_many, [(bytes([i]), "r")])
    assert len(store.rounds) == 3


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="rounds"):
        GroupCommit(FakeStore().put_many, rounds=-1)


async def test_a_request_cancelled_mid_round_leaves_the_round_to_the_others() -> None:
    store = FakeStore()
    gc = GroupCommit(store.put_many, rounds=1)
    got: list[object] = []

    async def put(name: str) -> None:
        got.append(await gc.put_many([(name.encode(), name)]))

    async with running(gc):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(put, "a")
            await trio.testing.wait_all_tasks_blocked()
            with trio.CancelScope() as leader:  # a second request, then its client goes away
                leader.cancel()
                await gc.put_many([(b"b", "b")])
            store.release.set()
    assert got == [[b"h:a"]] and store.rounds == [[(b"a", "a")]]


async def test_stopping_the_service_cancels_a_round_in_progress() -> None:
    """Regression (found by the simulation): a round shielded in its request's task kept a
    stopping node waiting forever for a put_many whose metadata writer had stopped."""
    store = FakeStore()  # holds every round until released: never, here
    gc = GroupCommit(store.put_many, rounds=1)
    outcome: list[BaseException] = []

    async def put() -> None:
        try:
            await gc.put_many([(b"x", "x")])
        except BaseException as exc:
            outcome.append(exc)
            raise

    with trio.move_on_after(5) as deadline:
        async with trio.open_nursery() as node:
            await node.start(gc.run)
            node.start_soon(put)
            await trio.testing.wait_all_tasks_blocked()
            assert len(store.rounds) == 1
            node.cancel_scope.cancel()  # the node stops
    assert not deadline.cancelled_caught and len(outcome) == 1
