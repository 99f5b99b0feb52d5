"""The lean thread hop (`blocknode.threads`): the semantics of `trio.to_thread.run_sync`.

The semantic tests run against both Trio's hop and ours, so a difference shows.
"""

from __future__ import annotations

import contextvars
import subprocess
import sys
import threading
import time
import traceback

import pytest
import sniffio
import trio

from blocknode import threads
from blocknode.context import NodeContext, run_in_thread
from blocknode.threads import ThreadPool


async def _trio_hop(fn, *args, limiter=None):
    return await trio.to_thread.run_sync(fn, *args, limiter=limiter)


HOPS = {"trio": _trio_hop, "lean": threads.run_sync}


@pytest.fixture(params=sorted(HOPS))
def hop(request):
    return HOPS[request.param]


def test_the_node_context_uses_the_lean_pool():
    assert NodeContext.real().run_sync is run_in_thread
    ran_in = []

    async def main():
        await run_in_thread(lambda: ran_in.append(threading.current_thread().name))

    trio.run(main)
    assert ran_in[0].startswith("blocknode-worker-")


async def test_returns_the_result_computed_off_the_trio_thread(hop):
    me = threading.get_ident()
    ident, total = await hop(lambda a, b: (threading.get_ident(), a + b), 2, 3)
    assert total == 5 and ident != me


async def test_the_loop_runs_while_a_job_blocks(hop):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await hop(time.sleep, 0.2)
        nursery.cancel_scope.cancel()
    assert ticks >= 5


async def test_an_exception_propagates_with_its_traceback_and_the_worker_survives(hop):
    def boom(x):
        raise KeyError(f"bad {x}")

    with pytest.raises(KeyError, match="bad 7") as info:
        await hop(boom, 7)
    assert "boom" in [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert await hop(int, "12") == 12  # the pool (or cache) still serves


async def test_a_started_call_is_not_abandoned_on_cancellation(hop):
    release, finished, got = threading.Event(), [], []

    def slow():
        release.wait(5)
        finished.append(True)
        return "done"

    cs = trio.CancelScope()
    waited = []

    async def caller():
        with cs:
            got.append(await hop(slow))  # returns the result: the call was not abandoned
            await trio.sleep(0)  # the cancellation comes at the next checkpoint
            got.append("not reached")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        await trio.sleep(0.05)
        cs.cancel()
        await trio.sleep(0.05)
        waited.append(not finished and not got)  # cancelled, yet the caller still waits
        release.set()
    assert waited == [True]
    assert finished == [True] and got == ["done"] and cs.cancelled_caught


async def test_a_call_cancelled_before_it_starts_never_runs(hop):
    ran = []
    with trio.CancelScope() as cs:
        cs.cancel()
        await hop(ran.append, 1)
    assert cs.cancelled_caught and ran == []


async def test_the_limiter_bounds_concurrency_and_is_released(hop):
    limiter = trio.CapacityLimiter(2)
    lock, running, peak = threading.Lock(), [0], [0]

    def job():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.03)
        with lock:
            running[0] -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(lambda: hop(job, limiter=limiter))
    assert peak[0] == 2 and limiter.borrowed_tokens == 0


async def test_the_default_limiter_holds_a_token_while_the_job_runs(hop):
    default = trio.to_thread.current_default_thread_limiter()
    seen = await hop(lambda: default.borrowed_tokens)
    assert seen == 1 and default.borrowed_tokens == 0


async def test_a_job_sees_the_callers_context_but_cannot_change_it(hop):
    var = contextvars.ContextVar("var", default="unset")
    var.set("caller")

    def job():
        seen = (var.get(), sniffio.current_async_library_cvar.get())
        var.set("job")
        return seen

    assert await hop(job) == ("caller", None)  # no async library inside the thread, as Trio does
    assert var.get() == "caller"


async def test_an_async_function_is_refused(hop):
    async def coro():
        return 1

    with pytest.raises(TypeError, match="asynchronous"):
        await hop(coro)


async def test_sequential_hops_reuse_a_thread_named_once():
    pool = ThreadPool(4, name="t-seq")
    idents = set()
    for _ in range(50):
        idents.add(await pool.run_sync(lambda: (threading.get_ident(), threading.current_thread().name)))
    assert len(idents) == 1 and next(iter(idents))[1] == "t-seq-1" and pool.threads == 1


async def test_the_pool_never_exceeds_its_threads_and_queues_the_rest():
    pool = ThreadPool(2, name="t-max")
    limiter = trio.CapacityLimiter(10)
    lock, running, peak, names = threading.Lock(), [0], [0], set()

    def job(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            names.add(threading.current_thread().name)
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return i

    results = []

    async def one(i):
        results.append(await pool.run_sync(job, i, limiter=limiter))

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(one, i)
    assert sorted(results) == list(range(10))
    assert peak[0] == 2 and names == {"t-max-1", "t-max-2"} and pool.threads == 2
    assert await pool.run_sync(int, "3") == 3  # nothing stuck in the queue afterwards


async def test_idle_threads_retire_and_new_ones_start_on_demand():
    pool = ThreadPool(4, idle_timeout=0.05, name="t-idle")
    assert await pool.run_sync(int, "1") == 1 and pool.threads == 1
    deadline = trio.current_time() + 5
    while pool.threads and trio.current_time() < deadline:
        await trio.sleep(0.02)
    assert pool.threads == 0
    assert await pool.run_sync(int, "2") == 2 and pool.threads == 1


def test_bad_pool_settings_are_refused():
    with pytest.raises(ValueError, match="max_threads"):
        ThreadPool(0)
    with pytest.raises(ValueError, match="idle_timeout"):
        ThreadPool(2, idle_timeout=0)


def test_several_trio_runs_and_several_trio_threads_share_the_pool():
    async def many(tag):
        return [await threads.run_sync(lambda i=i: (tag, i * i)) for i in range(200)]

    assert trio.run(many, "a") == [("a", i * i) for i in range(200)]
    assert trio.run(many, "b") == [("b", i * i) for i in range(200)]  # a second run, same pool
    out: dict[str, object] = {}

    def in_thread(tag):
        try:
            out[tag] = trio.run(many, tag)
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            out[tag] = exc

    ts = [threading.Thread(target=in_thread, args=(t,)) for t in ("x", "y", "z")]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert {t: out.get(t) for t in "xyz"} == {t: [(t, i * i) for i in range(200)] for t in "xyz"}


def test_the_pool_does_not_keep_a_process_alive():
    code = ("import trio; from blocknode import threads\n"
            "async def main():\n"
            "    assert await threads.run_sync(sum, [1, 2]) == 3\n"
            "trio.run(main)\n"
            "assert threads.default_pool().threads >= 1\n")  # idle workers still there at exit
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], timeout=30, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert time.monotonic() - t0 < threads.IDLE_TIMEOUT_S  # did not wait for them to retire


async def test_no_job_is_stranded_while_threads_start_retire_and_queue():
    # Threads retire after 1 ms idle, so starting, retiring, promising and queueing race
    # all the time; every job must still be taken and the pool stay within its bound.
    pool = ThreadPool(3, idle_timeout=0.001, name="t-race")
    limiter = trio.CapacityLimiter(16)
    done, peak = [], [0]

    def job(i):
        peak[0] = max(peak[0], pool.threads)
        if i % 7 == 0:
            time.sleep(0.002)
        return i

    async def caller(k):
        for i in range(k, 1600, 16):
            done.append(await pool.run_sync(job, i, limiter=limiter))
            if i % 5 == 0:
                await trio.sleep(0.002)  # let threads go idle and retire meanwhile

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for k in range(16):
                nursery.start_soon(caller, k)
    assert sorted(done) == list(range(1600)) and 1 <= peak[0] <= 3
    assert pool._backlog == 0 and pool._idle <= pool.threads <= 3
