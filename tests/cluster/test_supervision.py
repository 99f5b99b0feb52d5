"""Issue 9 A.3: nothing one step of a worker or one request handler raises stops the node.

An exception is injected into each background worker (a step of it, and one
block or one peer of it) and into a request handler; the node keeps serving
puts and gets, each worker counts the failure (`errors`, `last_error` in
`worker list`) and, after its backoff, goes on working. Only a failure of the
node's own foundations (here: its data dir gone) stops it, with a last log line
saying why.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import trio

from blocknode.clock import wall_ms
from blocknode.config import load_config
from blocknode.errors import BlocknodeError
from blocknode.node import Node
from blocknode.protocol import ADMIN_WORKER_LIST, AE_EXCHANGE, STATUS
from blocknode.rpc.errors import RemoteCallError
from blocknode.storage import RefEntry
from blocknode.workers.base import NodeFoundationError
from tests.cluster.harness import InProcessCluster, in_process_cluster, write_cluster
from tests.fakes import FakeClock

BACKOFF_S = 0.05


class Injected(RuntimeError):
    """Not a BlocknodeError: what a bug would raise."""


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


def fail_first(n: int, real: Callable[..., Any], what: str) -> tuple[Callable[..., Any], list[int]]:
    """An async stand-in for `real` that raises `Injected` on its first `n` calls."""
    calls = [0]

    async def fn(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] <= n:
            raise Injected(f"injected into {what}")
        return await real(*args, **kw)

    return fn, calls


async def put_and_get(cl: InProcessCluster, node_id: str = "node1") -> None:
    data = os.urandom(30_000)
    async with cl.client(node_id) as c:
        h = await c.put(data, f"alive-{os.urandom(4).hex()}")
        assert await c.get(h) == data


async def worker_rows(cl: InProcessCluster, node_id: str = "node1") -> dict[str, dict[str, Any]]:
    async with cl.client(node_id) as c:
        reply, _ = await c.call(ADMIN_WORKER_LIST, {})
    return {r["name"]: r for r in reply["workers"]}


async def test_an_exception_in_a_worker_or_a_handler_does_not_stop_the_node(tmp_path, monkeypatch,
                                                                             caplog):
    caplog.set_level(logging.WARNING, logger="blocknode")
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 3, clock=FakeClock(wall_ms()), gc_delay=600.0, rpc_timeout=3.0,
                                      need_block_timeout=1.0, resync_tranquility=0,
                                      scrub_tranquility=0, anti_entropy_interval=0.2) as cl:
            n1 = cl.nodes["node1"]
            for node in cl.nodes.values():
                for w in node.workers:
                    w.supervisor.base_s = BACKOFF_S
            await put_and_get(cl)

            # -- a request handler raises: that request gets `internal`, the node serves on
            def broken_status() -> dict[str, Any]:
                raise Injected("injected into a handler")

            monkeypatch.setattr(n1, "status", broken_status)
            async with cl.client("node1") as c:
                with pytest.raises(RemoteCallError) as e:
                    await c.call(STATUS, {})
            assert e.value.code == "internal"
            await put_and_get(cl)

            # -- resync: a step raises (claiming), then one block's resync raises
            resync = n1.resync
            claims = [0]
            real_claim = resync._claim

            def claim() -> Any:
                claims[0] += 1
                if claims[0] <= 2:
                    raise Injected("injected into a resync step")
                return real_claim()

            monkeypatch.setattr(resync, "_claim", claim)
            bad_block = bytes.fromhex(await _put(cl, os.urandom(20_000), "bad"))
            real_resync_block = resync.resync_block

            async def resync_block(h: bytes) -> None:
                if h == bad_block:
                    raise Injected(f"injected into the resync of {h.hex()}")
                await real_resync_block(h)

            monkeypatch.setattr(resync, "resync_block", resync_block)
            await n1.meta.resync_put(bad_block, 0)
            await until(lambda: n1.meta.error_get(bad_block) is not None, "bad block moved aside")
            assert claims[0] >= 2  # the step failures came first, the worker went on after them
            await trio.sleep(10 * BACKOFF_S)
            err = n1.meta.error_get(bad_block)
            assert err is not None and err.count == 1  # moved aside: not retried in a loop
            assert err.next_try_ms > n1.meta.now_ms() and "Injected" in err.message
            # ... and the worker keeps running: a good entry is processed
            done = resync.done
            good = bytes.fromhex(await _put(cl, os.urandom(20_000), "good"))
            await n1.meta.resync_put(good, 0)
            await until(lambda: resync.done > done, "resync goes on")
            await put_and_get(cl)

            # -- scrub: a step raises, then one block's check raises; the scrub completes
            scrub = n1.scrub
            fn, steps = fail_first(1, scrub.step, "a scrub step")
            monkeypatch.setattr(scrub, "step", fn)
            real_read = scrub.manager.read_local

            class Manager:
                async def read_local(self, h: bytes) -> Any:
                    if h == bad_block:
                        raise Injected(f"injected into the check of {h.hex()}")
                    return await real_read(h)

            monkeypatch.setattr(scrub, "manager", Manager())
            held = sum(1 for _ in n1.blocks.walk())
            await scrub.start(0)
            await until(lambda: scrub.status()["last_completed"] is not None, "scrub completes")
            assert steps[0] >= 2 and scrub.status()["blocks_checked"] == held
            await put_and_get(cl)

            # -- repair: the repair raises; it reports it, and the next one runs
            repair = n1.repair
            fn, sweeps = fail_first(1, repair._sweep_local, "the repair")
            monkeypatch.setattr(repair, "_sweep_local", fn)
            assert await repair.request()
            await until(lambda: repair.status()["state"] == "idle", "repair fails")
            assert "injected into the repair" in repair.status()["error"]
            assert await repair.request()
            await until(lambda: repair.status()["state"] == "idle" and sweeps[0] == 2, "repair runs")
            assert repair.status()["error"] is None and repair.status()["queued"] >= 2
            await put_and_get(cl)

            # -- anti-entropy: a round raises; and a peer answers garbage for one range
            ae = n1.anti_entropy
            fn, rounds = fail_first(1, ae.run_round, "an anti-entropy round")
            monkeypatch.setattr(ae, "run_round", fn)
            await until(lambda: rounds[0] >= 2 and ae.rounds >= 1, "anti-entropy goes on")
            for node in cl.nodes.values():  # no more background rounds: the next one is ours
                node.anti_entropy.interval = 3600.0
            await trio.sleep(0.5)
            h = os.urandom(32)
            await n1.blocks.apply_refs([RefEntry(h, "only-on-node1", False, n1.meta.now_ms())])

            async def garbage(peer: str, fields: dict[str, Any], data: bytes | None) -> Any:
                return {"refs": [], "changed": "lots", "until": None}, None

            n2 = cl.nodes["node2"]
            monkeypatch.setitem(n2._handlers, AE_EXCHANGE, garbage)
            stats = await ae.run_round()
            assert stats["ranges_failed"] >= 1 and "node2" in stats["peers_ok"]
            assert cl.nodes["node3"].meta.refs_of(h) != []  # node3's range went through
            await put_and_get(cl)

            # -- every failure is counted and shown; every worker is still running
            rows = await worker_rows(cl)
            for name in ("scrub", "repair", "anti-entropy"):
                assert rows[name]["errors"] >= 1, rows[name]
                assert "injected" in (rows[name]["last_error"] or "").lower() or name == "anti-entropy"
            assert "'changed' is not a count" in rows["anti-entropy"]["last_error"]
            assert rows["resync"]["errors"] == 1 and rows["resync"]["failed"] == 1
            assert "Injected" in rows["resync"]["last_error"]
            logged = "\n".join(r.getMessage() for r in caplog.records)
            assert bad_block.hex() in logged and "peer node2" in logged


async def _put(cl: InProcessCluster, data: bytes, ref: str) -> str:
    async with cl.client("node1") as c:
        return await c.put(data, ref)


async def test_a_node_whose_data_dir_is_gone_stops_with_a_clear_last_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="blocknode")
    cfg = load_config(write_cluster(tmp_path, 1, rf=1)[0])
    node = Node(cfg)
    for w in node.workers:
        w.supervisor.base_s = BACKOFF_S
    stopped: list[BaseException] = []
    with trio.fail_after(30):
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run)
                shutil.rmtree(cfg.data_dir)
                # a block referenced here but absent: its resync fails (no other node has it),
                # and the failure's health check finds the data dir gone
                h = os.urandom(32)
                await node.blocks.apply_refs([RefEntry(h, "r", False, node.meta.now_ms())])
                await node.meta.resync_put(h, 0)
                await trio.sleep_forever()
        except BaseExceptionGroup as group:
            stopped.extend(_leaves(group))
    assert [type(e) for e in stopped] == [NodeFoundationError], stopped
    assert isinstance(stopped[0], BlocknodeError) and "data_dir" in str(stopped[0])
    last = caplog.records[-1]
    assert last.levelno == logging.CRITICAL and "is gone: the node stops" in last.getMessage()


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
