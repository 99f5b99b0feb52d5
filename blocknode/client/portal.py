"""The Trio client run in a background thread, for callers that are not Trio.

`ClientThread` owns one thread running ``trio.run``: it opens the Trio client
(`open_client`: the same connection, batching, manifests and error handling as
every Trio caller) and then runs each submitted call as its own task, inside its
own cancel scope, until it is closed. Both the blocking client
(`blocknode.SyncClient`) and the asyncio client (`blocknode.aio.Client`) are thin
layers on top: they differ only in how a caller waits for a call's result.

A call is `submit`-ted from any thread with a `notify(outcome)` callback, run in
the Trio thread when it completes (success, error or cancel); `cancel(call)`
from any thread cancels it, and the Trio client's own cleanup (a failed or
cancelled put releases the blocks it stored) runs before `notify` is called.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import outcome
import trio

from blocknode.auth import ClientKey
from blocknode.client.api import Client, open_client
from blocknode.config import (
    DEFAULT_ROOT,
    NodeConfig,
    default_config_at,
    find_default_root,
    load_config,
    resolve_config_path,
)
from blocknode.errors import ClientClosed, ClientForked, ConfigError, single_error

ConfigArg = str | os.PathLike[str] | NodeConfig | None
Notify = Callable[[outcome.Outcome], None]


def resolve_config(config: ConfigArg) -> NodeConfig:
    """The node a program talks through, found like the CLI finds it: the path or
    config given; else ``$BLOCKNODE_CONFIG``; else the default node of the nearest
    ``blocknode-data`` directory (the working directory's or a parent's)."""
    if isinstance(config, NodeConfig):
        return config
    path = os.fspath(config) if config is not None else resolve_config_path(None)
    if path is not None:
        return load_config(path)
    root = find_default_root()
    if root is not None:
        return default_config_at(root)
    raise ConfigError(
        f"no node to talk to: no config given, BLOCKNODE_CONFIG is not set, and no "
        f"{DEFAULT_ROOT} directory in {Path.cwd()} or any directory above it")


def resolve_key(key: str | ClientKey | None) -> ClientKey | None:
    """A client key given as ``ID:SECRET`` text (None: the usual lookup, see
    `blocknode.auth.load_client_key`)."""
    if key is None or isinstance(key, ClientKey):
        return key
    try:
        return ClientKey.parse(key)
    except ValueError as exc:
        raise ConfigError(f"client key: {exc}") from None


_pid = os.getpid()
"""This process's id, kept current across forks (cheaper than `os.getpid` per call)."""


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Call:
    """One call submitted to the Trio thread."""

    __slots__ = ("args", "fn", "notify", "scope")

    def __init__(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], notify: Notify) -> None:
        self.fn, self.args, self.notify = fn, args, notify
        self.scope = trio.CancelScope()


def unwrap(result: outcome.Outcome) -> Any:
    """A call's value, or its error as one of blocknode's own (a nursery's
    exception group becomes its first error, see `single_error`)."""
    if isinstance(result, outcome.Error):
        exc = result.error
        if isinstance(exc, BaseExceptionGroup):
            exc = single_error(exc)
        if isinstance(exc, trio.Cancelled):
            exc = ClientClosed("the call was cancelled: the client is closing")
        raise exc
    return result.unwrap()


class ClientThread:
    """A Trio client in its own thread (see module docstring)."""

    def __init__(self, config: ConfigArg = None, *, key: str | ClientKey | None = None,
                 timeout: float | None = None) -> None:
        self.config = resolve_config(config)
        self._key = resolve_key(key)
        self._timeout = timeout
        self.client: Client | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._closing: trio.Event | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._after_tick: list[Callable[[], None]] = []
        self._after_tick_event: trio.Event | None = None
        self._queue: list[Call] = []  # submitted, not yet started (under `_lock`)
        self._wake_pending = False  # a `_start_calls` is scheduled (under `_lock`)
        self._thread = threading.Thread(target=self._run, name="blocknode-client", daemon=True)
        self._on_ready: Notify | None = None
        self._ended: BaseException | None = None  # why the Trio thread stopped, if not closed
        self._pid = _pid

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def start(self, on_ready: Notify) -> None:
        """Start the thread; `on_ready(outcome)` is called (in it) once connected or failed."""
        self._on_ready = on_ready
        self._thread.start()

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._ended = exc
            self._ready(outcome.Error(exc))
        finally:
            with self._lock:
                self._closed = True
                orphans, self._queue = self._queue, []
            for call in orphans:  # submitted as the run ended: never started
                call.notify(outcome.Error(ClientClosed("the client is closed")))

    def _ready(self, result: outcome.Outcome) -> None:
        notify, self._on_ready = self._on_ready, None
        if notify is not None:
            notify(result)

    async def _main(self) -> None:
        async with open_client(self.config, timeout=self._timeout, key=self._key) as client, \
                trio.open_nursery() as nursery:
            self.client = client
            self._closing = trio.Event()
            self._nursery = nursery
            self._after_tick_event = trio.Event()
            nursery.start_soon(self._run_after_tick)
            with self._lock:
                self._token = trio.lowlevel.current_trio_token()
                closed_early = self._closed  # `close` came while connecting
            self._ready(outcome.Value(None))
            if closed_early:
                self._closing.set()
            await self._closing.wait()
            nursery.cancel_scope.cancel()

    # ---- calls (any thread) ----

    def submit(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], notify: Notify,
               *, wake: bool = True) -> Call:
        """Run `await fn(*args)` in the Trio thread; `notify(outcome)` there when done.

        `wake=False`: the caller calls `wake()` soon (after submitting more calls:
        one wakeup of the Trio thread for the lot).
        """
        call = Call(fn, args, notify)
        if self._pid != _pid:
            raise self._forked_error()
        with self._lock:
            if self._closed or self._token is None:
                raise self._closed_error()
            self._queue.append(call)
            if wake:
                self._wake_locked()
        return call

    @property
    def forked(self) -> bool:
        """True in a child forked after this client was made (its thread is not here)."""
        return self._pid != _pid

    def _forked_error(self) -> ClientForked:
        return ClientForked(
            f"client created in process {self._pid} used in forked process {_pid}: its "
            "background thread exists only in the process that created it; create a new "
            "client after fork")

    def _closed_error(self) -> ClientClosed:
        if self._ended is None:
            return ClientClosed("the client is closed")
        err = ClientClosed(f"the client is closed: its connection ended ({self._ended}); "
                           "connect again")
        err.__cause__ = self._ended
        return err

    def wake(self) -> None:
        """Start the calls submitted with ``wake=False`` (any thread)."""
        if self._pid != _pid:
            raise self._forked_error()
        with self._lock:
            if self._queue:
                self._wake_locked()

    def _wake_locked(self) -> None:
        # One wakeup of the Trio thread per burst of calls: they start in the same
        # scheduler round, so concurrent small puts still share RPCs (`PutBatcher`).
        if self._wake_pending or self._token is None:
            return
        self._wake_pending = True
        try:
            self._token.run_sync_soon(self._start_calls)
        except trio.RunFinishedError:
            self._wake_pending = False  # the thread's end notifies the queued calls

    def after_tick(self, fn: Callable[[], None]) -> None:
        """In the Trio thread: `fn()` once the tasks runnable now have run (so that the
        results of calls finishing together leave together); at once if stopping."""
        if self._after_tick_event is None:
            fn()
            return
        self._after_tick.append(fn)
        self._after_tick_event.set()

    async def _run_after_tick(self) -> None:
        try:
            while True:
                assert self._after_tick_event is not None
                await self._after_tick_event.wait()
                self._after_tick_event = trio.Event()
                fns, self._after_tick = self._after_tick, []
                for fn in fns:
                    fn()
        finally:
            self._after_tick_event = None
            fns, self._after_tick = self._after_tick, []
            for fn in fns:
                fn()

    def cancel(self, call: Call) -> None:
        """Cancel `call` (its cleanup still runs; its `notify` still comes)."""
        if self._pid != _pid:
            return
        with self._lock:
            if self._closed or self._token is None:
                return
            try:
                self._token.run_sync_soon(call.scope.cancel)
            except trio.RunFinishedError:
                pass

    def close(self) -> bool:
        """Ask the thread to stop (calls in flight are cancelled); False if it had stopped.

        In a forked child it only marks this copy closed: the thread and the connection
        belong to the parent (its lock may even have been held at the fork).
        """
        if self._pid != _pid:
            self._closed = True
            return False
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            if self._token is None:  # still connecting: it stops once connected
                return True
            try:
                self._token.run_sync_soon(self._close_now)
            except trio.RunFinishedError:
                return False
        return True

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (not in a forked child: it is not there)."""
        if self._pid == _pid and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- in the Trio thread ----

    def _close_now(self) -> None:
        if self._closing is not None:
            self._closing.set()

    def _start_calls(self) -> None:
        assert self._nursery is not None and self._closing is not None
        with self._lock:
            calls, self._queue = self._queue, []
            self._wake_pending = False
        for call in calls:
            if self._closing.is_set():
                call.notify(outcome.Error(ClientClosed("the client is closed")))
            else:
                self._nursery.start_soon(self._run_call, call)

    async def _run_call(self, call: Call) -> None:
        result: outcome.Outcome | None = None
        try:
            with call.scope:
                result = outcome.Value(await call.fn(*call.args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result = outcome.Error(exc)
        if result is None:
            result = outcome.Error(CallCancelled())
        call.notify(result)


class CallCancelled(BaseException):
    """The call was cancelled at its caller's request (the caller raises its own
    interruption instead: KeyboardInterrupt, asyncio's CancelledError)."""
