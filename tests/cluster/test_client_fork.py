"""A client used in a forked child (where its background thread does not exist)
says so at once, naming both processes, instead of hanging; a client made in the
child works, and the parent's client is unharmed by the child's use and close."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

import blocknode
import blocknode.aio
from tests.cluster.cluster_thread import cluster_in_thread

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    with cluster_in_thread(tmp_path_factory.mktemp("fork"), 1, rf=1) as configs:
        yield configs


def _in_child(fn) -> dict:
    """Run `fn()` (returning a JSON-able dict) in a forked child; its result, or a
    failure if it does not finish within 30 s (a hang)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        os.close(r)
        try:
            out = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out = {"unexpected": repr(exc)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the child hung using a client made before the fork")
    with os.fdopen(r, "rb") as f:
        return json.loads(f.read() or b"{}")


def _expect_forked(call) -> dict:
    start = time.monotonic()
    try:
        call()
    except blocknode.BlocknodeError as exc:
        return {"type": type(exc).__name__, "msg": str(exc), "took": time.monotonic() - start}
    return {"type": None}


def test_a_sync_client_used_after_fork_says_so(one):
    with blocknode.connect(one[0], timeout=10) as client:
        h = client.put(b"made before the fork", ref="parent")
        parent = os.getpid()

        def child() -> dict:
            out = {name: _expect_forked(call) for name, call in [
                ("get", lambda: client.get(h)),
                ("put", lambda: client.put(b"from the child")),
                ("status", client.status),
                ("ref", lambda: client.ref(h, "child")),
            ]}
            client.close()  # does not hang, does not touch the parent's thread
            with blocknode.connect(one[0], timeout=10) as fresh:  # the remedy works
                out["fresh"] = {"data": fresh.get(h).decode()}
            return out

        out = _in_child(child)
        for name in ("get", "put", "status", "ref"):
            res = out[name]
            assert res["type"] == "ClientForked", out
            assert f"created in process {parent} used in forked process" in res["msg"]
            assert "create a new client after fork" in res["msg"]
            assert res["took"] < 1.0
        assert out["fresh"] == {"data": "made before the fork"}
        # The parent's client is unharmed by the child's calls and close.
        assert client.get(h) == b"made before the fork"
        assert client.unref(h, "parent") is True


def test_an_asyncio_client_used_after_fork_says_so(one):
    async def main() -> None:
        async with await blocknode.aio.connect(one[0], timeout=10) as client:
            h = await client.put(b"aio before the fork")

            def child() -> dict:
                async def use() -> dict:
                    out = {}
                    for name, coro in [("get", client.get(h)), ("put", client.put(b"c"))]:
                        try:
                            await coro
                            out[name] = None
                        except blocknode.BlocknodeError as exc:
                            out[name] = [type(exc).__name__, str(exc)]
                    return out
                return asyncio.run(use())

            out = await asyncio.to_thread(_in_child, child)
            for name in ("get", "put"):
                assert out[name][0] == "ClientForked", out
                assert "create a new client after fork" in out[name][1]
            assert await client.get(h) == b"aio before the fork"

    asyncio.run(main())
