"""The asyncio client: ``await blocknode.aio.connect(...)`` -> `blocknode.aio.Client`.

    async with await blocknode.aio.connect() as client:
        h = await client.put(b"hello", ref="greeting")
        assert await client.get(h) == b"hello"

The same methods as `blocknode.SyncClient`, as coroutines, usable from any
asyncio program (and from several event loops). Each call runs in the Trio
client's background thread (`blocknode.client.portal`: the Trio client itself,
no second protocol implementation) and its result comes back to the loop
through a future. Cancelling the asyncio task cancels the call in the Trio
thread and waits for its cleanup before the task sees `CancelledError`: a
cancelled put either landed with its reference or left nothing referenced
behind (see `blocknode.client.Client.put_chunks`).

Why a thread and not Trio's guest mode on the asyncio loop: see the README
("Using blocknode from your program") and ``bench/RESULTS.md``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import weakref
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, BinaryIO

import outcome

from blocknode.auth import ClientKey
from blocknode.client.portal import Call, ClientThread, ConfigArg, unwrap
from blocknode.client.stream import put_reader, write_all
from blocknode.config import NodeConfig
from blocknode.errors import BlocknodeError


class _Pending:
    """One call's result on its way to the loop (all its methods run in the loop)."""

    __slots__ = ("fut", "result")

    def __init__(self, fut: asyncio.Future[None]) -> None:
        self.fut = fut
        self.result: outcome.Outcome | None = None

    def resolve(self, result: outcome.Outcome) -> None:
        self.result = result
        if not self.fut.done():
            self.fut.set_result(None)


class _Inbox:
    """Results on their way to one event loop: one loop wakeup per burst of results
    (each `call_soon_threadsafe` writes to the loop's self-pipe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[_Pending, outcome.Outcome]] = []
        self.sending = False  # a `send` is due (under `lock`)
        self.waking: set[ClientThread] = set()  # clients with calls to start (in the loop)

    def put(self, thread: ClientThread, pending: _Pending, result: outcome.Outcome) -> None:
        """In the Trio thread: a result; they leave together once the Trio tasks
        runnable now have run (`ClientThread.after_tick`)."""
        with self.lock:
            self.items.append((pending, result))
            if self.sending:
                return
            self.sending = True
        thread.after_tick(self.send)

    def send(self) -> None:  # in the Trio thread
        with self.lock:
            self.sending = False
            if not self.items:
                return
        try:
            self.loop.call_soon_threadsafe(self.drain)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def wake_soon(self, thread: ClientThread) -> None:
        """In the loop: start `thread`'s new calls at the end of this loop iteration
        (the calls of every task that runs now go in one wakeup)."""
        if not self.waking:
            self.loop.call_soon(self.wake)
        self.waking.add(thread)

    def wake(self) -> None:
        threads, self.waking = self.waking, set()
        for thread in threads:
            thread.wake()

    def drain(self) -> None:  # in the loop
        with self.lock:
            items, self.items = self.items, []
        for pending, result in items:
            pending.resolve(result)


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = weakref.WeakKeyDictionary()


def _inbox(loop: asyncio.AbstractEventLoop) -> _Inbox:
    inbox = _inboxes.get(loop)
    if inbox is None:
        inbox = _inboxes[loop] = _Inbox(loop)
    return inbox


def _block_writer(fileobj: Any) -> Callable[[bytes], Awaitable[None]]:
    """``await write(block)`` for `fileobj`, as `Client.get_into` describes."""
    write = getattr(fileobj, "write", None)
    if not callable(write):
        raise TypeError(f"get_into needs an object with a write method, not {type(fileobj).__name__}")
    drain = getattr(fileobj, "drain", None)
    if drain is not None or inspect.iscoroutinefunction(write):
        async def in_loop(chunk: bytes) -> None:
            result = write(chunk)
            if inspect.isawaitable(result):
                await result
            if drain is not None:
                result = drain()
                if inspect.isawaitable(result):
                    await result
        return in_loop
    try:
        fileobj.fileno()
    except (OSError, ValueError, AttributeError):  # in memory (io.UnsupportedOperation)
        async def inline(chunk: bytes) -> None:
            result = write(chunk)
            if inspect.isawaitable(result):
                await result
            elif isinstance(result, int) and result < len(chunk):
                write_all(write, chunk[result:])
        return inline

    async def in_thread(chunk: bytes) -> None:
        await asyncio.to_thread(write_all, write, chunk)
    return in_thread


def _notifier(loop: asyncio.AbstractEventLoop, thread: ClientThread, pending: _Pending) -> Any:
    return functools.partial(_inbox(loop).put, thread, pending)


class Client:
    """An asyncio client (see module docstring); make one with `connect`."""

    def __init__(self, thread: ClientThread) -> None:
        self._t = thread

    @property
    def config(self) -> NodeConfig:
        return self._t.config

    @property
    def block_size(self) -> int:
        return self._t.block_size

    def _submit(self, loop: asyncio.AbstractEventLoop, fn: Any, args: tuple[Any, ...],
                pending: _Pending) -> Call:
        """Hand a call to the Trio thread; its result comes back to `loop`."""
        inbox = _inbox(loop)
        call = self._t.submit(fn, args, functools.partial(inbox.put, self._t, pending), wake=False)
        inbox.wake_soon(self._t)
        return call

    async def _call(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future())
        call = self._submit(loop, fn, args, pending)
        try:
            await pending.fut
        except asyncio.CancelledError:
            if pending.result is None:
                # Cancel the call in the Trio thread and wait for its cleanup (bounded
                # by the client's timeout), whatever further cancels come meanwhile.
                self._t.cancel(call)
                while pending.result is None:
                    pending.fut = loop.create_future()
                    try:
                        await pending.fut
                    except asyncio.CancelledError:
                        continue
            raise
        assert pending.result is not None
        return unwrap(pending.result)

    async def put(self, data: bytes | bytearray | memoryview | BinaryIO, ref: str | None = None) -> str:
        """Store `data` (bytes, or a binary file object read to its end in a worker
        thread, block by block) under `ref` (default: a fresh one); the hash hex."""
        if isinstance(data, bytes | bytearray | memoryview):
            return await self._call(self._t.client.put, bytes(data), ref)  # type: ignore[union-attr]
        return await self._call(put_reader, self._t.client, data, ref)

    async def get(self, hash_hex: str) -> bytes:
        """The exact bytes stored under `hash_hex`."""
        return await self._call(self._t.client.get, hash_hex)  # type: ignore[union-attr]

    async def get_into(self, hash_hex: str, fileobj: Any) -> int:
        """Write the bytes under `hash_hex` to `fileobj` block by block; how many.

        The next block is fetched only once the last one is written (memory stays at
        a few blocks; a slow reader slows the download). `fileobj` may be:

        - an asyncio stream writer (an object with a ``drain()``): each block is
          written and the writer drained (awaited) before the next;
        - an object with an async ``write`` (or one returning an awaitable, as
          aiofiles' does): each write is awaited before the next;
        - a plain binary file with a file descriptor: written in a worker thread, so
          a slow disk does not stall the event loop; an in-memory one (`io.BytesIO`)
          is written in the loop.
        """
        write = _block_writer(fileobj)
        chunks = self._t.client.iter_get(hash_hex)  # type: ignore[union-attr]
        written = 0
        try:
            while True:
                try:
                    chunk = await self._call(chunks.__anext__)
                except StopAsyncIteration:
                    return written
                await write(chunk)
                written += len(chunk)
        finally:
            try:
                await self._call(chunks.aclose)
            except BlocknodeError:
                pass

    async def ref(self, hash_hex: str, ref_id: str) -> None:
        """Add reference `ref_id` to the data under `hash_hex`."""
        await self._call(self._t.client.ref, hash_hex, ref_id)  # type: ignore[union-attr]

    async def unref(self, hash_hex: str, ref_id: str) -> bool:
        """Delete reference `ref_id`; whether it existed."""
        return await self._call(self._t.client.unref, hash_hex, ref_id)  # type: ignore[union-attr]

    async def status(self) -> dict[str, Any]:
        """The node's status."""
        return await self._call(self._t.client.status)  # type: ignore[union-attr]

    async def close(self) -> None:
        """Close the connection and stop its thread (calls in flight are cancelled)."""
        self._t.close()
        await asyncio.to_thread(self._t.join)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


async def connect(config: ConfigArg = None, *, key: str | ClientKey | None = None,
                  timeout: float | None = None) -> Client:
    """An asyncio client of the node `config` names (arguments as `blocknode.connect`)."""
    loop = asyncio.get_running_loop()
    thread = ClientThread(config, key=key, timeout=timeout)
    pending = _Pending(loop.create_future())
    thread.start(_notifier(loop, thread, pending))
    try:
        await pending.fut
    except asyncio.CancelledError:
        thread.close()
        raise
    assert pending.result is not None
    try:
        unwrap(pending.result)
    except BaseException:
        await asyncio.to_thread(thread.join)
        raise
    return Client(thread)


__all__ = ["Client", "connect"]
