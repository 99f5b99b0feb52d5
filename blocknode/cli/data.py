"""Data commands: `put`, `get`, `ref`, `unref`, `status`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable
from typing import Any

from blocknode.cli.base import EXIT_USAGE, fail, hash_arg, run_with_client
from blocknode.cli.output import OutputFile, print_json
from blocknode.client import Client, new_ref_id


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
    hash_arg(args.hash)

    async def go(client: Client) -> int:
        if args.output:
            with OutputFile(args.output) as out:
                async for chunk in client.iter_get(args.hash):
                    out.write(chunk)
                out.commit()
        else:
            stdout = sys.stdout.buffer
            async for chunk in client.iter_get(args.hash):
                stdout.write(chunk)
            stdout.flush()
        return 0

    return run_with_client(args, go)


def cmd_ref(args: argparse.Namespace) -> int:
    """Add a reference to a block (and to the blocks of a manifest)."""
    hash_arg(args.hash)
    return run_with_client(args, lambda c: _done(c.ref(args.hash, args.ref)))


def cmd_unref(args: argparse.Namespace) -> int:
    """Delete a reference (the block is collected once no reference is left)."""
    hash_arg(args.hash)
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


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `put`, `get`, `ref`, `unref` and `status`."""
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
