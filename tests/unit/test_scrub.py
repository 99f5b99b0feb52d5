"""Scrub: finds and heals corruption, pause/resume/cancel, resumes after a restart, periodic."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing
from bg_helpers import FakeCluster, block
from storage_helpers import add_ref

from blocknode.workers.resync import Resync
from blocknode.workers.scrub import IDLE, PAUSED, RUNNING, Scrub


@pytest.fixture
def cluster(tmp_path):
    c = FakeCluster(str(tmp_path), n=3, rf=3)
    yield c
    c.close()


async def fill(cluster: FakeCluster, nid: str, n: int, size: int = 2000) -> list[tuple[bytes, bytes]]:
    out = [block(size) for _ in range(n)]
    for h, data in out:
        await cluster[nid].blocks.write(data)
        await add_ref(cluster[nid].meta, h, "r")
    return out


def flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 0xFF]))


async def test_flipped_byte_found_quarantined_and_restored_from_peer(cluster):
    with trio.fail_after(10):
        shared = [block(3000) for _ in range(5)]
        for h, data in shared:
            for nid in ("n1", "n2", "n3"):
                await cluster[nid].blocks.write(data)
                await add_ref(cluster[nid].meta, h, "r")
        n1 = cluster["n1"]
        victim, good = shared[2]
        path = n1.files.path(victim)
        flip_byte(path)
        s = Scrub(n1.manager, n1.ctx, tranquility=0)
        await s.start()
        await s.run_to_completion()
        st = s.status()
        assert st["state"] == IDLE and st["blocks_checked"] == 5 and st["corruptions"] == 1
        assert st["progress"] == 1.0 and st["last_completed"] == cluster.clock.t
        assert os.path.exists(path + ".corrupted") and not n1.blocks.exists(victim)
        due = n1.meta.resync_due()
        assert victim in [h for _, h in due]  # queued at once
        await Resync(n1.manager, n1.ctx).run_once()
        with open(path, "rb") as f:
            assert f.read() == good  # byte-identical copy from a peer


async def test_a_block_file_nothing_references_is_queued_for_resync(cluster):
    """An orphan file (no reference record: a put that failed here but whose file
    survived a crash) is found by scrub and handed to resync, which keeps it for the
    grace period and then collects it."""
    with trio.fail_after(10):
        n1 = cluster["n1"]
        kept = await fill(cluster, "n1", 2)
        orphan, _ = block(2500)
        await n1.blocks.write(_)
        assert n1.meta.rc_get(orphan).is_absent()
        s = Scrub(n1.manager, n1.ctx, tranquility=0)
        await s.start()
        await s.run_to_completion()
        assert s.status()["blocks_checked"] == 3 and s.status()["corruptions"] == 0
        due = [h for _, h in n1.meta.resync_due()]
        assert orphan in due and not any(h in due for h, _ in kept)
        await Resync(n1.manager, n1.ctx).run_once()
        assert n1.blocks.exists(orphan)  # in its grace period: references may still come
        assert not n1.meta.rc_get(orphan).is_nonzero()


async def test_pause_resume_cancel(cluster):
    with trio.fail_after(10):
        await fill(cluster, "n1", 20)
        s = Scrub(cluster["n1"].manager, cluster["n1"].ctx, tranquility=0, batch=5)
        await s.start()
        assert await s.step() == 5
        await s.pause()
        assert s.status()["state"] == PAUSED
        assert await s.step() == 0  # paused: no work
        pos = s.status()["position"]
        assert 0 < s.status()["progress"] < 1
        await s.resume()
        assert await s.step() == 5 and s.status()["position"] > pos
        await s.cancel()
        st = s.status()
        assert st["state"] == IDLE and st["position"] is None
        await s.start()
        assert s.status()["blocks_checked"] == 0  # a new scrub starts from the beginning
        await s.run_to_completion()
        assert s.status()["blocks_checked"] == 20


async def test_worker_obeys_pause_and_resume(cluster):
    with trio.fail_after(10):
        await fill(cluster, "n1", 30)
        n1 = cluster["n1"]
        s = Scrub(n1.manager, n1.ctx, tranquility=0, batch=3)
        async with trio.open_nursery() as nursery:
            await nursery.start(n1.meta.run_writer)
            nursery.start_soon(s.run)
            await s.start()
            while s.status()["blocks_checked"] < 6:
                await s.changed.wait()
            await s.pause()
            checked = s.status()["blocks_checked"]
            await trio.testing.wait_all_tasks_blocked()
            assert s.status()["blocks_checked"] == checked and s.status()["state"] == PAUSED
            await s.resume()
            while s.status()["state"] != IDLE:
                await s.changed.wait()
            assert s.status()["blocks_checked"] == 30
            assert s.status()["next_run"] > cluster.clock.t  # next periodic run scheduled
            nursery.cancel_scope.cancel()


async def test_scrub_interrupted_by_restart_resumes_from_its_position(tmp_path):
    root = str(tmp_path)
    c = FakeCluster(root, n=1, rf=1)
    await fill(c, "n1", 25)
    s = Scrub(c["n1"].manager, c["n1"].ctx, tranquility=0, batch=10)
    await s.start()
    assert await s.step() == 10
    pos = s.status()["position"]
    c.close()  # "crash": the node stops mid-scrub

    c2 = FakeCluster(root, n=1, rf=1)
    try:
        seen: list[bytes] = []
        real = c2["n1"].manager.read_local

        async def spy(h: bytes) -> bytes:
            seen.append(h)
            return await real(h)

        c2["n1"].manager.read_local = spy  # type: ignore[method-assign]
        s2 = Scrub(c2["n1"].manager, c2["n1"].ctx, tranquility=0, batch=10)
        assert s2.status()["state"] == RUNNING and s2.status()["position"] == pos
        await s2.run_to_completion()
        assert len(seen) == 15 and min(seen).hex() > pos  # nothing checked twice
        assert s2.status()["blocks_checked"] == 25
    finally:
        c2.close()


async def test_periodic_scrub_starts_when_next_run_has_passed(cluster):
    with trio.fail_after(10):
        await fill(cluster, "n1", 4)
        n1 = cluster["n1"]
        s = Scrub(n1.manager, n1.ctx, tranquility=0, interval=3600)
        async with trio.open_nursery() as nursery:
            await nursery.start(n1.meta.run_writer)
            nursery.start_soon(s.run)
            await s.changed.wait()  # the first next_run is set and persisted
            nr = n1.meta.state_get("scrub")["next_run"]
            assert 0.85 * 3600_000 <= nr - cluster.clock.t <= 1.15 * 3600_000
            cluster.clock.advance(1.2 * 3600)
            s.changed.notify()  # (the worker would wake by its own timer; time is fake here)
            while s.status()["last_completed"] is None:
                await s.changed.wait()
            assert s.status()["blocks_checked"] == 4
            nursery.cancel_scope.cancel()


async def test_tranquility_is_validated_and_persisted(cluster):
    s = Scrub(cluster["n1"].manager, cluster["n1"].ctx, tranquility=4)
    with pytest.raises(ValueError):
        await s.set_tranquility(-1)
    await s.set_tranquility(7)
    assert Scrub(cluster["n1"].manager, cluster["n1"].ctx).status()["tranquility"] == 7


async def test_cancel_then_start_at_once_checks_every_block(cluster):
    """Issue 9 C.13: `scrub start`, `cancel`, `start` at once: the new run skipped blocks.

    The old run's step sleeps in its throttle (tranquility) with a stale batch in
    hand; when it woke it went on with that batch under the new run, moved the new
    run's position past blocks it never checked, and let the new run complete early.
    Each run has an identity now: the stale step does nothing more.
    """
    with trio.fail_after(20):
        blocks = await fill(cluster, "n1", 61, size=100)
        n1 = cluster["n1"]
        ticks = [0.0]

        def slow_clock() -> float:  # every block seems to take 10 ms: rest 20 x 10 ms after it
            ticks[0] += 0.01
            return ticks[0]

        s = Scrub(n1.manager, n1.ctx, tranquility=20, batch=64, clock=slow_clock)
        restarted = [False]
        after_restart: list[bytes] = []
        real = n1.manager.read_local

        async def spy(h: bytes) -> bytes:
            if restarted[0]:
                after_restart.append(h)
            return await real(h)

        n1.manager.read_local = spy  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            await nursery.start(n1.meta.run_writer)
            nursery.start_soon(s.run)
            await s.start()
            while s.st["blocks_checked"] < 2:  # the old step is in its rest, batch in hand
                await trio.sleep(0.001)
            await s.cancel()
            await s.start(0)
            restarted[0] = True
            while s.status()["state"] != IDLE:
                await s.changed.wait()
            nursery.cancel_scope.cancel()
        st = s.status()
        assert st["blocks_checked"] == 61 and st["progress"] == 1.0
        assert sorted(after_restart) == sorted(h for h, _ in blocks)  # each once, none skipped


async def test_scrub_worker_survives_a_failing_state_save(cluster, monkeypatch):
    # Issue 9 A.3: the idle branch of Scrub.run saved its state outside any try: a
    # failing save escaped the worker and stopped the node.
    from blocknode.errors import MetadataFull

    with trio.fail_after(10):
        await fill(cluster, "n1", 3)
        n1 = cluster["n1"]
        s = Scrub(n1.manager, n1.ctx, tranquility=0)
        s.supervisor.base_s = 0.01
        real = n1.meta.state_set
        fails = [1]

        async def state_set(name: str, value: object) -> None:
            if fails[0]:
                fails[0] -= 1
                raise MetadataFull("the metadata store is full")
            await real(name, value)

        monkeypatch.setattr(n1.meta, "state_set", state_set)
        async with trio.open_nursery() as nursery:
            await nursery.start(n1.meta.run_writer)
            nursery.start_soon(s.run)
            while s.supervisor.errors < 1:  # its first save (next_run) failed
                await trio.sleep(0.01)
            await s.start()  # the worker is still there to run it
            while s.status()["state"] != IDLE:
                await s.changed.wait()
            nursery.cancel_scope.cancel()
        assert s.status()["blocks_checked"] == 3 and s.supervisor.errors == 1
