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
runs (a put releases what it stored), and the client stays usable. A node that
restarts is reconnected to by the next call (`blocknode.client.Client`). A client
works only in the process that made it: in a forked child its calls raise
`ClientForked` (connect again there).
"""

from __future__ import annotations

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

    __slots__ = ("_lock", "result")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.result: outcome.Outcome | None = None

    def set(self, result: outcome.Outcome) -> None:
        self.result = result
        self._lock.release()

    def wait(self) -> outcome.Outcome:
        self._lock.acquire()  # interruptible (KeyboardInterrupt) on POSIX
        assert self.result is not None
        return self.result


class SyncClient:
    """A blocking client, safe to share between threads (see module docstring)."""

    def __init__(self, thread: ClientThread) -> None:
        self._t = thread

    @property
    def config(self) -> NodeConfig:
        return self._t.config

    @property
    def block_size(self) -> int:
        return self._t.block_size

    def _call(self, fn: Any, *args: Any) -> Any:
        waiter = _Waiter()
        call = self._t.submit(fn, args, waiter.set)
        try:
            result = waiter.wait()
        except BaseException:
            # Interrupted while waiting (KeyboardInterrupt, or an exception another
            # thread raised in this one): cancel the call and wait for its cleanup
            # (bounded by the client's timeout); a second interruption stops waiting.
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
