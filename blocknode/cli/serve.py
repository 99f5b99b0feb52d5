"""`serve`: run one node until SIGINT/SIGTERM, then shut down cleanly."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import logging
import os
import signal

import trio

from blocknode import __version__, fastpath
from blocknode.cli.base import CliError, node_config
from blocknode.config import NodeConfig
from blocknode.errors import single_error
from blocknode.logs import FORMATS, LEVELS, configure_logging

LOCK_NAME = "blocknode.lock"
PRIVATE_UMASK = 0o077
log = logging.getLogger("blocknode.serve")


async def serve_async(cfg: NodeConfig, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
                      locks: DirLocks | None = None) -> None:
    """Run the node; the first SIGINT/SIGTERM cancels it (workers stop between steps)."""
    from blocknode.node import Node  # here, not at the top: the other commands need no node

    node = Node(cfg)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(node.run)
            if locks is not None:
                locks.lock_new_data_dirs()  # the data dirs the node has just made
            log.info("blocknode %s: node %s listening on %s (public address %s), data %s, "
                     "metadata %s, cluster %s, fast path %s", __version__, cfg.node_id, addr,
                     cfg.public_addr, ", ".join(d.path for d in cfg.data_dirs), cfg.metadata_dir,
                     cfg.cluster_file or "single node", fastpath.IMPLEMENTATION)
            task_status.started(addr)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def serve(cfg: NodeConfig) -> int:
    """Blocking entry point for the CLI; returns the exit status.

    The node's directories are locked first (`DirLocks`): a second `serve` on the
    same data_dir or metadata_dir refuses to start. A failure to start (e.g. the
    address is in use) comes out of the nurseries wrapped in exception groups:
    the one error inside is re-raised for the CLI to print as one line.

    Everything the node creates is private to its user: the process runs with
    umask 077 (directories 0700, files 0600: block files, LMDB files holding the
    small blocks, the secret), whatever the umask it was started with.
    """
    os.umask(PRIVATE_UMASK)
    with DirLocks(cfg) as locks:
        try:
            trio.run(functools.partial(serve_async, cfg, locks=locks))
        except BaseExceptionGroup as group:
            raise single_error(group) from None
    log.info("stopped")
    return 0


class DirLocks:
    """Exclusive locks on the node's data_dir and metadata_dir, held while it runs.

    Each directory gets a file `LOCK_NAME`, locked with `flock` (released by the
    kernel when the process ends, however it ends: a stale file locks nothing)
    and holding the owner's pid, which a refused second `serve` names. Two
    processes on one data_dir would sweep each other's half-written blocks and
    collect each other's blocks; on one metadata_dir, keep two views of one
    LMDB. (Only `serve` takes these locks; a `Node` built in-process does not.)

    A data dir that does not exist yet is not made here (the node tells a data dir
    that is gone from one whose disk is not mounted by whether it exists, see
    `blocknode.storage.block_files`): it is locked once the node has made it
    (`lock_new_data_dirs`). With several data dirs, one that cannot be locked
    (an unusable disk) is reported and left to the node, which takes it out of
    service; a data dir locked by another `serve` is always refused.
    """

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self._fds: list[int] = []
        self._seen: set[str] = set()
        self._missing: list[str] = []

    def __enter__(self) -> DirLocks:
        try:
            self._lock_once("metadata_dir", self.cfg.metadata_dir)
            for d in self.cfg.data_dirs:
                if os.path.isdir(d.path):
                    self._lock_data_dir(d.path)
                else:
                    self._missing.append(d.path)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _lock_once(self, what: str, path: str) -> None:
        real = os.path.realpath(path)
        if real not in self._seen:
            self._seen.add(real)
            self._fds.append(self._lock(what, real))

    def _lock_data_dir(self, path: str) -> None:
        try:
            self._lock_once("data_dir", path)
        except CliError as exc:
            if len(self.cfg.data_dirs) == 1 or "in use by another" in str(exc):
                raise
            log.warning("%s", exc)

    def lock_new_data_dirs(self) -> None:
        """Lock the data dirs that did not exist at `__enter__` and exist now."""
        missing, self._missing = self._missing, []
        for path in missing:
            if os.path.isdir(path):
                self._lock_data_dir(path)

    def _lock(self, what: str, directory: str) -> int:
        lock_path = os.path.join(directory, LOCK_NAME)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CliError(f"cannot lock {what} {directory}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "pid not yet written"
            os.close(fd)
            raise CliError(
                f"{what} {directory} is in use by another blocknode serve ({owner}; lock file "
                f"{lock_path}): stop it first, or give this node its own {what}"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise CliError(f"cannot lock {what} {directory}: {exc.strerror or exc}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, node {self.cfg.node_id}, rpc_bind_addr "
                      f"{self.cfg.rpc_bind_addr}\n".encode(), 0)
        return fd

    def __exit__(self, *exc_info: object) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # the pid is no longer running a node here
            os.close(fd)  # releases the lock
        self._fds.clear()


def cmd_serve(args: argparse.Namespace) -> int:
    """Run a node until SIGINT/SIGTERM, logging to stderr (`blocknode.logs`)."""
    cfg = node_config(args, serving=True)
    configure_logging(cfg.node_id, level=args.log_level or cfg.log_level,
                      fmt=args.log_format or cfg.log_format)
    return serve(cfg)


def add_command(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `serve`."""
    s = sub.add_parser("serve", parents=[common], help="run a node")
    s.add_argument("--log-level", choices=LEVELS, default=None, type=str.lower,
                   help="lowest level logged to stderr (default: log_level in the config, else info)")
    s.add_argument("--log-format", choices=FORMATS, default=None,
                   help="text lines, or one JSON object per line for log shippers "
                   "(default: log_format in the config, else text)")
    s.set_defaults(func=cmd_serve)
