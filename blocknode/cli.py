"""The command line: `python -m blocknode COMMAND ...`.

Command names, their arguments and the JSON keys they print are a contract
(README, "Command line"). Every failure is one line on stderr and a non-zero exit
status, never a traceback: 1 for an operational error (unreachable node, quorum
not reached, block not found, ...), 2 for bad usage or bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from blocknode.client import Client, new_ref_id, open_client, parse_hash
from blocknode.config import NodeConfig, load_config, resolve_config_path
from blocknode.errors import (
    AuthenticationError,
    BlocknodeError,
    CliError,
    ConfigError,
    InvalidHash,
    NodeUnreachable,
    single_error,
)

EXIT_ERROR = 1
EXIT_USAGE = 2

Command = Callable[[argparse.Namespace], int]
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def register_commands(add: Callable[[argparse._SubParsersAction], None]) -> None:
    """Let another module (e.g. the worker CLI) add its sub-commands."""
    _EXTRA_COMMANDS.append(add)


def fail(message: str, status: int = EXIT_ERROR) -> CliError:
    """Build a `CliError` (raise it)."""
    return CliError(message, status)


def node_config(args: argparse.Namespace) -> NodeConfig:
    """The config named by --config / BLOCKNODE_CONFIG, or the embedded default."""
    return load_config(resolve_config_path(getattr(args, "config", None)))


def run_with_client(args: argparse.Namespace, fn: Callable[[Client], Awaitable[int]]) -> int:
    """Connect to the configured node and run `fn(client)` under Trio."""
    cfg = node_config(args)

    async def main() -> int:
        async with open_client(cfg) as client:
            return await fn(client)

    try:
        return trio.run(main)
    except NodeUnreachable as exc:
        raise fail(f"node unreachable at {cfg.public_addr}: {exc} (is `python -m blocknode serve` running?)") from None
    except AuthenticationError as exc:
        raise fail(f"authentication with {cfg.public_addr} failed (wrong cluster secret?): {exc}") from None


def print_json(obj: Any) -> None:
    """Print `obj` as JSON on stdout."""
    print(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, bytes):
        return o.hex()
    raise TypeError(f"cannot encode {type(o).__name__}")


# ------------------------------------------------------------------ commands

def cmd_serve(args: argparse.Namespace) -> int:
    """Run a node until SIGINT/SIGTERM."""
    from blocknode.serve import serve

    return serve(node_config(args))


def cmd_put(args: argparse.Namespace) -> int:
    """Store a file (or stdin with '-'); print its hash alone on stdout."""
    if args.path != "-" and not os.path.isfile(args.path):
        raise fail(f"cannot read {args.path}: no such file", EXIT_USAGE)
    ref = args.ref or new_ref_id()

    async def go(client: Client) -> int:
        if args.path == "-":
            data = sys.stdin.buffer.read()
            h = await client.put(data, ref)
        else:
            h = await client.put_file(args.path, ref)
        print(h)
        if not args.ref:
            print(f"reference: {ref}", file=sys.stderr)
        return 0

    return run_with_client(args, go)


def cmd_get(args: argparse.Namespace) -> int:
    """Write the bytes stored under HASH to stdout or -o PATH."""
    _check_hash(args.hash)

    async def go(client: Client) -> int:
        if args.output:
            tmp = Path(args.output + ".part")
            try:
                with open(tmp, "wb") as f:
                    async for chunk in client.iter_get(args.hash):
                        f.write(chunk)
                os.replace(tmp, args.output)
            finally:
                tmp.unlink(missing_ok=True)  # nothing half-written is left behind
        else:
            out = sys.stdout.buffer
            async for chunk in client.iter_get(args.hash):
                out.write(chunk)
            out.flush()
        return 0

    return run_with_client(args, go)


def cmd_ref(args: argparse.Namespace) -> int:
    """Add a reference to a block (and to the blocks of a manifest)."""
    _check_hash(args.hash)
    return run_with_client(args, lambda c: _done(c.ref(args.hash, args.ref)))


def cmd_unref(args: argparse.Namespace) -> int:
    """Delete a reference (the block is collected once no reference is left)."""
    _check_hash(args.hash)
    return run_with_client(args, lambda c: _done(c.unref(args.hash, args.ref)))


async def _done(aw: Awaitable[Any]) -> int:
    await aw
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Show the node's status."""

    async def go(client: Client) -> int:
        st = await client.status()
        if args.json:
            print_json(st)
            return 0
        lay = st.get("layout", {})
        print(f"node        {st['node_id']} at {st.get('addr')} (zone {st.get('zone')}, fast path {st.get('fast_path')})")
        print(f"layout      {lay.get('nodes')} node(s), replication {lay.get('replication_factor')}, "
              f"write quorum {lay.get('write_quorum')}")
        for p in st["peers"]:
            print(f"peer        {p['id']:<12} {p['addr']:<22} {'up' if p['up'] else 'DOWN'}")
        print(f"blocks      {st['blocks']} ({st.get('inline_blocks', 0)} inline)")
        print(f"rc entries  {st['rc_entries']}")
        print(f"resync      {st['resync_queue']} queued")
        print(f"errors      {st['errors']}")
        return 0

    return run_with_client(args, go)


def cmd_init_cluster(args: argparse.Namespace) -> int:
    """Write configs for N local nodes sharing one cluster file and secret."""
    from blocknode.init_cluster import init_cluster

    if args.nodes < 1:
        raise fail("--nodes: expected an integer >= 1", EXIT_USAGE)
    rf = args.replication if args.replication is not None else min(3, args.nodes)
    if not 1 <= rf <= args.nodes:
        raise fail(f"--replication: expected 1..{args.nodes} (the number of nodes), got {rf}", EXIT_USAGE)
    paths = init_cluster(Path(args.dir), nodes=args.nodes, replication=rf,
                         base_port=args.base_port, host=args.host)
    print(f"wrote a {args.nodes}-node cluster (replication {rf}) in {args.dir}:")
    for p in paths:
        print(f"  python -m blocknode serve --config {p}")
    print(f"then, e.g.: python -m blocknode --config {paths[0]} status")
    return 0


def _check_hash(text: str) -> None:
    try:
        parse_hash(text)
    except InvalidHash as exc:
        raise fail(str(exc), EXIT_USAGE) from None


# ------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="node config file (default: $BLOCKNODE_CONFIG, else the embedded default)")
    p = argparse.ArgumentParser(prog="python -m blocknode", parents=[common],
                                description="blocknode: a distributed content-addressed block store node")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("serve", parents=[common], help="run a node")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("put", parents=[common], help="store a file; prints its hash")
    s.add_argument("path", metavar="PATH", help="file to store ('-' for stdin)")
    s.add_argument("--ref", help="reference name (default: a fresh one, shown on stderr)")
    s.set_defaults(func=cmd_put)

    s = sub.add_parser("get", parents=[common], help="fetch the bytes stored under a hash")
    s.add_argument("hash", metavar="HASH")
    s.add_argument("-o", "--output", metavar="PATH", help="write to PATH instead of stdout")
    s.set_defaults(func=cmd_get)

    for name, fn, what in (("ref", cmd_ref, "add"), ("unref", cmd_unref, "delete")):
        s = sub.add_parser(name, parents=[common], help=f"{what} a reference to a block")
        s.add_argument("hash", metavar="HASH")
        s.add_argument("ref", metavar="REF")
        s.set_defaults(func=fn)

    s = sub.add_parser("status", parents=[common], help="show the node's status")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("init-cluster", help="write configs for N local nodes")
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--replication", type=int, default=None, help="default: min(3, nodes)")
    s.add_argument("--base-port", type=int, default=3901)
    s.add_argument("--host", default="127.0.0.1")
    s.set_defaults(func=cmd_init_cluster)

    for add in _EXTRA_COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    _load_extra_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        try:
            return args.func(args)
        except BaseExceptionGroup as group:  # from a nursery: report the error inside
            raise single_error(group) from None
    except (CliError, BlocknodeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, CliError):
            return exc.status
        # Bad input (a config field, a hash) is a usage error; the rest are operational.
        return EXIT_USAGE if isinstance(exc, ConfigError | InvalidHash) else EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _load_extra_commands() -> None:
    # Worker/admin commands live in their own module; importing it registers them.
    try:
        import blocknode.cli_admin  # noqa: F401
    except ImportError as exc:
        if exc.name != "blocknode.cli_admin":
            raise
