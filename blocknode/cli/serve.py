"""`serve`: run one node until SIGINT/SIGTERM, then shut down cleanly."""

from __future__ import annotations

import argparse
import signal
import sys

import trio

from blocknode import fastpath
from blocknode.cli.base import node_config
from blocknode.config import NodeConfig
from blocknode.errors import single_error


async def serve_async(cfg: NodeConfig, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the node; the first SIGINT/SIGTERM cancels it (workers stop between steps)."""
    from blocknode.node import Node  # here, not at the top: the other commands need no node

    node = Node(cfg)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(node.run)
            print(
                f"blocknode: node {cfg.node_id} listening on {addr} "
                f"(data {cfg.data_dir}, metadata {cfg.metadata_dir}, fast path {fastpath.IMPLEMENTATION})",
                file=sys.stderr, flush=True,
            )
            task_status.started(addr)
            async for signum in signals:
                print(f"blocknode: {signal.Signals(signum).name}: shutting down", file=sys.stderr, flush=True)
                nursery.cancel_scope.cancel()
                break


def serve(cfg: NodeConfig) -> int:
    """Blocking entry point for the CLI; returns the exit status.

    A failure to start (e.g. the address is in use) comes out of the nurseries
    wrapped in exception groups: the one error inside is re-raised for the CLI to
    print as one line.
    """
    try:
        trio.run(serve_async, cfg)
    except BaseExceptionGroup as group:
        raise single_error(group) from None
    print("blocknode: stopped", file=sys.stderr, flush=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run a node until SIGINT/SIGTERM."""
    return serve(node_config(args))


def add_command(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `serve`."""
    s = sub.add_parser("serve", parents=[common], help="run a node")
    s.set_defaults(func=cmd_serve)
