"""The blocking client: `blocknode.connect(...)` -> `SyncClient`, for programs that are not Trio.

    with blocknode.connect() as client:          # the CLI's config lookup
        h = client.put(b"hello", ref="greeting")
        assert client.get(h) == b"hello"

One `SyncClient` is meant to be shared by all the threads of a program (a web
server's worker threads): every call goes to the one background thread that
runs the Trio client (`blocknode.client.portal`), where calls run concurrently
(small puts from many threads share RPCs, see `PutBatcher`). Errors are
blocknode's own types, raised in the calling thread. A call interrupted in its
caller (Ctrl-C: KeyboardInterrupt) is cancelled in the Trio thread, its cleanup
runs (a put releases what it stored), and the client stays usable.
"""

from __future__ import annotations

import functools
import threading
from types import TracebackType
from typing import Any, BinaryIO

import outcome

from blocknode.auth import ClientKey
from blocknode.client.portal import ClientThread, ConfigArg, unwrap
from blocknode.client.stream import put_reader, write_all
from blocknode.config import NodeConfig
from blocknode.errors import BlocknodeError


class _Waiter:
    """A result handed from the Trio thread to one waiting thread."""

    __slots__ = ("_lock", "chain", "gone", "result")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.result: outcome.Outcome | None = None
        self.chain: list[_Waiter] = []  # waiters this one wakes once woken (`_Wakeups`)
        self.gone = False  # its thread stopped waiting for it: never the head of a chain

    def set(self, result: outcome.Outcome) -> None:
        """Hand `result` over and wake the waiting thread (for a lone waiter)."""
        self.result = result
        self.wake()

    def wake(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # woken twice (an interrupted chain, see `pass_on`): once is enough
            pass

    def wait(self) -> outcome.Outcome:
        self._lock.acquire()  # interruptible (KeyboardInterrupt) on POSIX
        self.pass_on()
        assert self.result is not None
        return self.result

    def pass_on(self) -> None:
        """Wake the waiters chained to this one (each is removed only once woken, so an
        interruption midway leaves the rest to `_Wakeups.give_up`)."""
        chain = self.chain
        while chain:
            chain[-1].wake()
            chain.pop()


class _Wakeups:
    """Results of one client's calls on their way to the waiting threads.

    The Trio thread wakes one waiting thread per scheduler tick, the head of the
    results of that tick, and that thread wakes the others. Releasing a waiting
    thread's lock is the bridge's dearest step when done by the Trio thread: the
    woken thread may take the CPU while the Trio thread still holds the GIL, which
    stops every Python thread until the Trio thread runs again (under load, ~100 µs
    per wakeup, about half of a no-op call's cost; see `bench/RESULTS.md`). A
    thread that stops waiting (interrupted) `give_up`s: it passes on the chain it
    may hold, and later ticks wake it directly.
    """

    def __init__(self, thread: ClientThread) -> None:
        self._thread = thread
        self._lock = threading.Lock()  # the Trio thread choosing a head vs a thread giving up
        self._ready: list[_Waiter] = []  # results of this tick (Trio thread only)

    def put(self, waiter: _Waiter, result: outcome.Outcome) -> None:
        """In the Trio thread: `waiter`'s result, woken at the end of this tick."""
        waiter.result = result
        self._ready.append(waiter)
        if len(self._ready) == 1:
            self._thread.after_tick(self._flush)

    def _flush(self) -> None:
        ready, self._ready = self._ready, []
        with self._lock:
            live = [w for w in ready if not w.gone]
            if live:
                live[0].chain = live[1:]
        for w in ready:
            if w.gone:
                w.wake()
        if live:
            live[0].wake()

    def give_up(self, waiter: _Waiter) -> None:
        """In the waiting thread, once it stops waiting normally (interrupted)."""
        with self._lock:
            waiter.gone = True
        waiter.pass_on()


class SyncClient:
    """A blocking client, safe to share between threads (see module docstring)."""

    def __init__(self, thread: ClientThread) -> None:
        self._t = thread
        self._wakeups = _Wakeups(thread)

    @property
    def config(self) -> NodeConfig:
        return self._t.config

    @property
    def block_size(self) -> int:
        return self._t.block_size

    def _call(self, fn: Any, *args: Any) -> Any:
        waiter = _Waiter()
        call = self._t.submit(fn, args, functools.partial(self._wakeups.put, waiter))
        try:
            result = waiter.wait()
        except BaseException:
            # Interrupted while waiting (KeyboardInterrupt, or an exception another
            # thread raised in this one): cancel the call and wait for its cleanup
            # (bounded by the client's timeout); a second interruption stops waiting.
            # Either way the threads this one was to wake are woken (`give_up`).
            self._wakeups.give_up(waiter)
            if waiter.result is None:
                self._t.cancel(call)
                waiter.wait()
            raise
        return unwrap(result)

    def put(self, data: bytes | bytearray | memoryview | BinaryIO, ref: str | None = None) -> str:
        """Store `data` (bytes, or a binary file object read to its end, block by block)
        under reference `ref` (default: a fresh one); returns the hash hex."""
        if isinstance(data, bytes | bytearray | memoryview):
            return self._call(self._t.client.put, bytes(data), ref)  # type: ignore[union-attr]
        return self._call(put_reader, self._t.client, data, ref)

    def get(self, hash_hex: str) -> bytes:
        """The exact bytes stored under `hash_hex`."""
        return self._call(self._t.client.get, hash_hex)  # type: ignore[union-attr]

    def get_into(self, hash_hex: str, fileobj: BinaryIO) -> int:
        """Write the bytes under `hash_hex` to `fileobj` block by block (in this thread);
        returns how many. Memory stays at a few blocks whatever the size."""
        chunks = self._t.client.iter_get(hash_hex)  # type: ignore[union-attr]
        written = 0
        try:
            while True:
                try:
                    chunk = self._call(chunks.__anext__)
                except StopAsyncIteration:
                    return written
                write_all(fileobj.write, chunk)
                written += len(chunk)
        finally:
            try:
                self._call(chunks.aclose)
            except BlocknodeError:
                pass

    def ref(self, hash_hex: str, ref_id: str) -> None:
        """Add reference `ref_id` to the data under `hash_hex`."""
        self._call(self._t.client.ref, hash_hex, ref_id)  # type: ignore[union-attr]

    def unref(self, hash_hex: str, ref_id: str) -> bool:
        """Delete reference `ref_id`; whether it existed (see `Client.unref`)."""
        return self._call(self._t.client.unref, hash_hex, ref_id)  # type: ignore[union-attr]

    def status(self) -> dict[str, Any]:
        """The node's status."""
        return self._call(self._t.client.status)  # type: ignore[union-attr]

    def close(self) -> None:
        """Close the connection and stop the background thread (calls in flight are
        cancelled). Idempotent."""
        self._t.close()
        self._t.join()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def connect(config: ConfigArg = None, *, key: str | ClientKey | None = None,
            timeout: float | None = None) -> SyncClient:
    """A blocking client of the node `config` names: a config file path, a loaded
    `NodeConfig`, or None for the CLI's lookup (``$BLOCKNODE_CONFIG``, else the
    nearest ``blocknode-data`` directory's default node).

    `key`: a client key ``ID:SECRET`` (default: ``$BLOCKNODE_KEY``, else the config's
    `client_key_file`, else the node's admin key file). `timeout`: seconds per
    operation (default: twice the config's `rpc_timeout`). Connects before
    returning: `NodeUnreachable`, `AuthenticationError`, `ConfigError` come from here.
    """
    thread = ClientThread(config, key=key, timeout=timeout)
    waiter = _Waiter()
    thread.start(waiter.set)
    try:
        result = waiter.wait()
    except BaseException:
        thread.close()
        raise
    try:
        unwrap(result)
    except BaseException:
        thread.join()
        raise
    return SyncClient(thread)


__all__ = ["SyncClient", "connect"]
