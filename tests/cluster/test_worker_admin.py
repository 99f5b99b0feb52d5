"""`worker list` / `get` / `set` against a running node: generated from its worker registry."""

from __future__ import annotations

import math

import pytest
import trio

from blocknode.protocol import ADMIN_WORKER_GET, ADMIN_WORKER_LIST, ADMIN_WORKER_SET
from blocknode.rpc.errors import RemoteCallError
from tests.cluster.harness import in_process_cluster

SETTINGS = {"resync-workers", "resync-tranquility", "scrub-tranquility", "rebalance-tranquility"}


async def test_worker_list_shows_every_registered_worker_and_its_settings(tmp_path):
    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 1, rf=1, resync_workers=2) as cl:
            node = cl.nodes["node1"]
            async with cl.client("node1") as c:
                rows = (await c.call(ADMIN_WORKER_LIST, {}))[0]["workers"]
                got = (await c.call(ADMIN_WORKER_GET, {}))[0]["settings"]
            assert [r["name"] for r in rows] == [w.name for w in node.workers]
            assert [r["name"] for r in rows] == ["resync", "scrub", "repair", "anti-entropy", "rebalance",
                                                  "layout-sync"]
            for row, worker in zip(rows, node.workers, strict=True):
                assert {"name", "state", "tranquility", "errors", "last_error", "settings"} <= set(row)
                assert row["settings"] == {s.name: s.get() for s in worker.settings()}
            by_name = {r["name"]: r for r in rows}
            # today's keys of each row stay (the CLI contract)
            assert {"workers", "queue_length", "processed", "failed", "worker_states"} <= set(by_name["resync"])
            assert {"blocks_checked", "corruptions", "progress", "next_run"} <= set(by_name["scrub"])
            assert {"phase", "queued"} <= set(by_name["repair"])
            assert {"interval", "rounds", "last_round"} <= set(by_name["anti-entropy"])
            assert by_name["resync"]["settings"] == {"resync-workers": 2, "resync-tranquility": 2.0}
            assert {s["name"] for s in got} == SETTINGS
            assert {s["name"]: s["worker"] for s in got}["scrub-tranquility"] == "scrub"


@pytest.mark.parametrize(("name", "value", "says"), [
    ("nope", 1, "unknown setting 'nope' (valid settings: resync-workers, resync-tranquility, "
                "scrub-tranquility, rebalance-tranquility)"),
    (None, 1, "unknown setting None"),
    ("resync-workers", 0, "resync-workers: expected an integer from 1 to 64, got 0"),
    ("resync-workers", 100000, "expected an integer from 1 to 64"),
    ("resync-workers", 1e300, "expected an integer from 1 to 64"),
    ("resync-workers", 2.5, "expected an integer"),
    ("resync-workers", math.inf, "got inf"),
    ("resync-workers", math.nan, "got nan"),
    ("resync-tranquility", math.inf, "resync-tranquility: expected a number >= 0, got inf"),
    ("resync-tranquility", "inf", "got inf"),
    ("scrub-tranquility", math.nan, "scrub-tranquility: expected a number >= 0, got nan"),
    ("scrub-tranquility", -1, "got -1"),
    ("scrub-tranquility", "fast", "got fast"),
    ("scrub-tranquility", [1], "got [1]"),
    ("scrub-tranquility", None, "got None"),
    ("resync-workers", True, "got True"),
])
async def test_worker_set_refuses_with_a_clear_bad_request(tmp_path, name, value, says):
    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 1, rf=1) as cl:
            node = cl.nodes["node1"]
            before = [(s.name, s.get()) for w in node.workers for s in w.settings()]
            async with cl.client("node1") as c:
                with pytest.raises(RemoteCallError) as e:
                    await c.call(ADMIN_WORKER_SET, {"name": name, "value": value})
            assert e.value.code == "bad_request", e.value
            assert says in e.value.message, e.value.message
            assert [(s.name, s.get()) for w in node.workers for s in w.settings()] == before


async def test_worker_get_of_an_unknown_setting_names_the_valid_ones(tmp_path):
    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 1, rf=1) as cl, cl.client("node1") as c:
            assert (await c.call(ADMIN_WORKER_GET, {"name": "resync-workers"}))[0]["settings"][0][
                "value"] == 1
            with pytest.raises(RemoteCallError) as e:
                await c.call(ADMIN_WORKER_GET, {"name": "resync-wrokers"})
            assert e.value.code == "bad_request" and "valid settings: resync-workers" in e.value.message


async def test_worker_set_applies_and_persists(tmp_path):
    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 1, rf=1) as cl:
            node = cl.nodes["node1"]
            async with cl.client("node1") as c:
                reply, _ = await c.call(ADMIN_WORKER_SET, {"name": "resync-workers", "value": "3"})
                assert reply["name"] == "resync-workers" and reply["value"] == 3
                await c.call(ADMIN_WORKER_SET, {"name": "resync-tranquility", "value": 0.5})
                await c.call(ADMIN_WORKER_SET, {"name": "scrub-tranquility", "value": 7})
            # applied: three worker tasks run now
            assert node.resync.workers == 3 and node.resync.tranquility == 0.5
            assert node.scrub.status()["tranquility"] == 7.0
            while len(node.resync.worker_states) < 3:
                await trio.sleep(0.01)
            # persisted: a restarted node has them
            await cl.stop("node1")
            node = await cl.start("node1")
            assert node.resync.workers == 3 and node.resync.tranquility == 0.5
            assert node.scrub.status()["tranquility"] == 7.0
            async with cl.client("node1") as c:
                rows = (await c.call(ADMIN_WORKER_LIST, {}))[0]["workers"]
            assert rows[0]["settings"] == {"resync-workers": 3, "resync-tranquility": 0.5}
            assert rows[1]["settings"] == {"scrub-tranquility": 7.0}
