"""A lean thread hop: `run_sync` runs a blocking call on a long-lived worker thread.

`trio.to_thread.run_sync` costs ≈ 75–120 µs of CPU per call here (this pool:
≈ 30–70 µs; `python -m bench.threadhop`): it looks for a
cached thread (`ThreadCache.start_thread_soon`), renames the OS thread for every
job, builds several closures, takes its limiter token in two checkpoints and
reports back through nested outcomes. A node makes one to three such hops per
1 MiB block (hash, write + fsync, LMDB commit), so this module does the same job
with less: a process-wide `ThreadPool` of daemon worker threads, each named once
when it starts, fed through a `queue.SimpleQueue`; a finished job wakes its
waiting Trio task with `TrioToken.run_sync_soon(trio.lowlevel.reschedule, ...)`,
the only way back into a Trio run from another thread.

Semantics kept from `trio.to_thread.run_sync` (with its default
``abandon_on_cancel=False``):

- it is a checkpoint: cancellation is checked before the job starts;
- once started, the call is never abandoned: a cancelled caller waits for the
  function to finish, gets its result, and the cancellation is raised at the
  caller's next checkpoint (callers such as the group-commit writer also shield);
- the function's exception propagates, with its traceback;
- ``limiter=`` (a `trio.CapacityLimiter`; the default is Trio's
  `current_default_thread_limiter`, 40 tokens) bounds how many jobs of that
  limiter run at once; the token is released once the function has finished;
- the function runs in a copy of the caller's `contextvars` context (with
  sniffio's current async library unset, as Trio does);
- it works from any number of Trio threads and successive `trio.run` calls: each
  job carries its own `TrioToken` and task.

Not supported (nothing here needs them): ``abandon_on_cancel=True`` (callers that
want it keep `trio.to_thread.run_sync`), `trio.from_thread.*` without an explicit
``trio_token=``, and `trio.testing.wait_all_threads_completed`.

The pool holds at most `MAX_THREADS` threads, started on demand; one idle for
`IDLE_TIMEOUT_S` exits. A job that raises never kills its thread. The threads
are daemons, so the pool never keeps a process alive at exit (the caller of a
running job is waiting for it, so a `trio.run` cannot end with a job of its own
still running, except through an error that also abandons Trio's own threads).
"""

from __future__ import annotations

import contextvars
import itertools
import os
import queue
import threading
import types
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import sniffio
import trio

__all__ = ["IDLE_TIMEOUT_S", "MAX_THREADS", "ThreadPool", "default_pool", "run_sync"]

T = TypeVar("T")

#: Upper bound on the pool's threads. One node uses at most its block-file
#: limiter's 8 tokens (`threads`), the metadata writer's one commit and the hashes
#: under Trio's default limiter (40 tokens): 49. 64 leaves room for a client and
#: a few in-process nodes in one process; past it, jobs wait in the queue (in
#: order; none is dropped) for the next free thread.
MAX_THREADS = 64

#: A worker idle this long exits (as Trio's own thread cache does after 10 s).
IDLE_TIMEOUT_S = 10.0

_Job = tuple[contextvars.Context, Callable[..., Any], tuple[Any, ...], trio.lowlevel.TrioToken,
             trio.lowlevel.Task]


class ThreadPool:
    """A bounded pool of long-lived daemon threads fed by one `queue.SimpleQueue`.

    The pool keeps an exact account so a job is never left in the queue with no
    thread to take it: `_idle` counts waiting threads not yet promised a job, and
    `_backlog` the jobs queued while every thread was busy and the pool full; a
    thread finishing a job takes a backlog job before it counts itself idle.
    """

    def __init__(self, max_threads: int = MAX_THREADS, *, idle_timeout: float = IDLE_TIMEOUT_S,
                 name: str = "blocknode-worker") -> None:
        if not isinstance(max_threads, int) or max_threads < 1:
            raise ValueError(f"max_threads must be a positive integer, not {max_threads!r}")
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be positive, not {idle_timeout!r}")
        self.max_threads = max_threads
        self.idle_timeout = idle_timeout
        self.name = name
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._backlog = 0
        self._seq = itertools.count(1)

    @property
    def threads(self) -> int:
        """How many worker threads exist now."""
        return self._threads

    def submit(self, job: _Job) -> None:
        """Queue `job`, starting a thread for it if none is free and the pool is not full."""
        with self._lock:
            if self._idle:
                self._idle -= 1
                spawn = False
            elif self._threads < self.max_threads:
                self._threads += 1
                spawn = True
            else:
                self._backlog += 1
                spawn = False
        if spawn:
            try:
                threading.Thread(target=self._work, name=f"{self.name}-{next(self._seq)}",
                                 daemon=True).start()
            except BaseException:
                with self._lock:
                    self._threads -= 1
                raise
        self._jobs.put(job)

    async def run_sync(self, fn: Callable[..., T], *args: Any,
                       limiter: trio.CapacityLimiter | None = None) -> T:
        """``fn(*args)`` on a pool thread, like ``await trio.to_thread.run_sync(fn, *args)``.

        See the module docstring for the semantics (not abandoned on cancellation;
        `limiter` bounds concurrency, Trio's default limiter when None).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if limiter is None:
            limiter = trio.to_thread.current_default_thread_limiter()
        borrower = object()
        try:
            limiter.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            await limiter.acquire_on_behalf_of(borrower)
        try:
            self.submit((contextvars.copy_context(), fn, args,
                         trio.lowlevel.current_trio_token(), trio.lowlevel.current_task()))
            return await trio.lowlevel.wait_task_rescheduled(_abort_failed)  # type: ignore[no-any-return]
        finally:
            limiter.release_on_behalf_of(borrower)

    def _work(self) -> None:
        get = self._jobs.get
        timeout = self.idle_timeout
        while True:
            try:
                ctx, fn, args, token, task = get(timeout=timeout)
            except queue.Empty:
                with self._lock:
                    if self._idle:  # nobody was promised this thread: retire it
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue  # a job is on its way to this thread
            result = outcome.capture(ctx.run, _call, fn, args)
            del ctx, fn, args
            # Count this thread free before waking the caller, so the caller's next job
            # (often submitted right away) is promised to it instead of a new thread.
            with self._lock:
                if self._backlog:
                    self._backlog -= 1
                else:
                    self._idle += 1
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:  # pragma: no cover - the run died under its caller
                pass
            del token, task, result

    def _reset_after_fork(self) -> None:
        # The child has none of the parent's threads: start from an empty pool.
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = self._idle = self._backlog = 0


def _call(fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    sniffio.current_async_library_cvar.set(None)
    ret = fn(*args)
    if isinstance(ret, types.CoroutineType):
        ret.close()
        raise TypeError(f"run_sync expected a sync function, but "
                        f"{getattr(fn, '__qualname__', fn)!r} appears to be asynchronous")
    return ret


def _abort_failed(_raise_cancel: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


_default_pool = ThreadPool()
os.register_at_fork(after_in_child=_default_pool._reset_after_fork)


def default_pool() -> ThreadPool:
    """The process-wide pool `run_sync` uses."""
    return _default_pool


run_sync = _default_pool.run_sync
"""``await run_sync(fn, *args, limiter=None)``: `ThreadPool.run_sync` on the process-wide pool."""
