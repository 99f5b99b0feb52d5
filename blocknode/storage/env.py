"""`MetadataEnv`: the LMDB environment of one node and its group-commit writer.

Writes: every mutation is a function ``fn(txn) -> result`` submitted to one
writer task, which drains whatever is queued into a single transaction and
commits it in one blocking call (`run_sync`; an LMDB write transaction must
begin and commit on the same thread). One durable commit costs ~260 µs here;
batching is what turns ~3.8k commits/s into tens of thousands of durable
operations/s. A caller awaits its own operation's commit. If one function
raises, the batch is aborted and re-run one function per transaction, so only
that caller sees the error.

Reads are small mmap reads (1–3 µs) and run inline on the caller's thread
(`read()`); an LMDB failure on either path surfaces as `MetadataError`.

A transaction function that changes something others wait for (the resync
queue) calls `wake_after_commit(notify)`: the `Notify` fires on the Trio thread
once that commit is durable.

Only the `blocknode.storage` package uses this module (and LMDB).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import lmdb
import trio

from blocknode.context import RunSync, run_in_thread
from blocknode.errors import BlocknodeError, MetadataError, MetadataFull
from blocknode.notify import Notify

__all__ = ["MetadataEnv", "Txn", "Db"]

T = TypeVar("T")
Txn = lmdb.Transaction
Db = Any
"""A named LMDB database handle (`lmdb._Database`)."""

BATCH_MAX = 512
"""Most operations one group commit takes from the queue."""
MAX_DBS = 16


class _Op:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[Txn], Any]) -> None:
        self.fn = fn
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _Read:
    """A read transaction as a context manager; LMDB errors become `MetadataError`."""

    __slots__ = ("_env", "_txn")

    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env
        self._txn: Txn | None = None

    def __enter__(self) -> Txn:
        try:
            self._txn = self._env.begin(write=False, buffers=False)
        except lmdb.Error as exc:
            raise MetadataError(f"metadata read failed: {exc}") from exc
        return self._txn

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if self._txn is not None:
            self._txn.abort()
        if isinstance(exc, lmdb.Error):
            raise MetadataError(f"metadata read failed: {exc}") from exc
        return False


class MetadataEnv:
    """The LMDB environment at `path`, its named databases and its one writer."""

    def __init__(
        self,
        path: str,
        *,
        map_size: int = 1 << 30,
        max_readers: int = 126,
        sync: bool = True,
        run_sync: RunSync = run_in_thread,
    ) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)  # private: inline blocks live in data.mdb
        try:
            self.env = lmdb.open(
                path,
                mode=0o600,
                map_size=map_size,
                max_readers=max_readers,
                max_dbs=MAX_DBS,
                sync=sync,
                metasync=sync,
                writemap=False,
            )
        except lmdb.Error as exc:
            raise MetadataError(f"cannot open metadata store {path}: {exc}") from exc
        self.path = path
        self._run_sync = run_sync
        self._to_wake: set[Notify] = set()
        self._send, self._recv = trio.open_memory_channel[_Op](math.inf)
        self._writer_running = False

    def open_db(self, name: bytes) -> Db:
        """A named database (created if missing)."""
        try:
            return self.env.open_db(name)
        except lmdb.Error as exc:
            raise MetadataError(f"cannot open metadata table {name.decode()}: {exc}") from exc

    def map_usage(self) -> tuple[int, int]:
        """(map size, bytes in use: the pages up to the last one written), for metrics."""
        info, st = self.env.info(), self.env.stat()
        return info["map_size"], (info["last_pgno"] + 1) * st["psize"]

    def close(self) -> None:
        """Close the environment (no transaction may be running)."""
        self.env.close()

    # ------------------------------------------------------------------ reads

    def read(self) -> _Read:
        """``with env.read() as txn:`` a read transaction (mmap reads on this thread)."""
        return _Read(self.env)

    def entries(self, db: Db) -> int:
        """How many entries `db` holds."""
        with self.read() as txn:
            return int(txn.stat(db)["entries"])

    # ------------------------------------------------------------------ writes

    def wake_after_commit(self, notify: Notify) -> None:
        """From inside a transaction function: fire `notify` once this commit is done."""
        self._to_wake.add(notify)

    def _after_commit(self) -> None:
        # On the Trio thread: waking waiters is only valid here.
        if self._to_wake:
            to_wake, self._to_wake = self._to_wake, set()
            for notify in to_wake:
                notify.notify()

    async def run_writer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The group-commit writer task; run it in the node's nursery.

        It exits when cancelled; operations still queued then fail with
        `MetadataError` rather than hang.
        """
        self._writer_running = True
        task_status.started()
        try:
            while True:
                first = await self._recv.receive()
                batch = [first]
                while len(batch) < BATCH_MAX:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except trio.WouldBlock:
                        break
                with trio.CancelScope(shield=True):
                    await self._run_sync(self._commit_batch, batch)
                    for op in batch:
                        op.done.set()
                    self._after_commit()
        finally:
            self._writer_running = False
            while True:
                try:
                    op = self._recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                op.error = MetadataError("metadata writer stopped")
                op.done.set()

    def _full(self) -> MetadataFull:
        return MetadataFull(
            f"the metadata store {self.path} is full: raise lmdb_map_size in the node config"
        )

    def _commit_batch(self, batch: list[_Op]) -> None:
        try:
            with self.env.begin(write=True) as txn:
                for op in batch:
                    op.result = op.fn(txn)
            return
        except lmdb.MapFullError:
            err: BaseException = self._full()
            for op in batch:
                op.error = err
            return
        except BaseException:  # noqa: BLE001 - one bad op: re-run each alone below
            pass
        for op in batch:
            op.result = None
            op.error = None
            try:
                with self.env.begin(write=True) as txn:
                    op.result = op.fn(txn)
            except lmdb.MapFullError:
                op.error = self._full()
            except BlocknodeError as exc:
                op.error = exc
            except lmdb.Error as exc:
                op.error = MetadataError(f"metadata write failed: {exc}")
            except Exception as exc:  # noqa: BLE001 - delivered to the caller, not lost
                op.error = exc

    async def submit(self, fn: Callable[[Txn], T]) -> T:
        """Run `fn(txn)` in the next group commit; returns once it is durable."""
        if not self._writer_running:
            result = await self._run_sync(self._write_txn, fn)
            self._after_commit()
            return result
        op = _Op(fn)
        self._send.send_nowait(op)
        await op.done.wait()
        if op.error is not None:
            raise op.error
        return op.result

    def write_now(self, fn: Callable[[Txn], T]) -> T:
        """Run `fn(txn)` in its own transaction on this thread (blocking; tools and tests).

        Called from the Trio thread it also wakes the waiters of the commit; from
        any other thread it cannot (the next commit on the Trio thread does).
        """
        result = self._write_txn(fn)
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return result  # not on the Trio thread: nobody here to wake
        self._after_commit()
        return result

    def _write_txn(self, fn: Callable[[Txn], T]) -> T:
        try:
            with self.env.begin(write=True) as txn:
                result = fn(txn)
        except lmdb.MapFullError:
            raise self._full() from None
        except lmdb.Error as exc:
            raise MetadataError(f"metadata write failed: {exc}") from exc
        return result
