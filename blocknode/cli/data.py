"""Data commands: `put`, `get`, `ref`, `unref`, `status`."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import AsyncIterator, Awaitable
from typing import Any, BinaryIO

import trio

from blocknode.auth import load_client_key
from blocknode.cli.base import (
    EXIT_USAGE,
    client_config_for,
    fail,
    hash_arg,
    node_config,
    run_with_client,
)
from blocknode.cli.output import OutputFile, duration, print_json, print_table, progress, size
from blocknode.client import Client, new_ref_id, open_client
from blocknode.client.stream import read_block
from blocknode.config import NodeConfig
from blocknode.errors import BlocknodeError

PROGRESS_DELAY_S = 0.5
"""`put` and `get` show a progress bar (on a terminal) once they have run this long."""


def cmd_put(args: argparse.Namespace) -> int:
    """Store a file, a pipe or stdin ('-'), streamed block by block; print its hash alone on stdout."""
    ref = args.ref or new_ref_id()
    source = _open_source(args.path)

    async def go(client: Client) -> int:
        try:
            h = await put_stream(client, source, ref, name=args.path, fresh_ref=not args.ref)
        finally:
            if source is not sys.stdin.buffer:
                source.close()
        print(h)
        if not args.ref:
            print(f"reference: {ref}", file=sys.stderr)
        return 0

    return run_with_client(args, go)


def _open_source(path: str) -> BinaryIO:
    """What `put PATH` reads: stdin for '-', a regular file, or anything readable as a
    stream (a FIFO, `<(cmd)`, a character device); a directory is a usage error."""
    if path == "-":
        return sys.stdin.buffer
    try:
        if stat.S_ISDIR(os.stat(path).st_mode):
            raise fail(f"cannot read {path}: is a directory (put stores one file)", EXIT_USAGE)
        return open(path, "rb")  # noqa: SIM115 - closed by cmd_put
    except FileNotFoundError:
        raise fail(f"cannot read {path}: no such file", EXIT_USAGE) from None
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE) from None


async def put_stream(client: Client, f: BinaryIO, ref: str, *, name: str,
                     fresh_ref: bool = False) -> str:
    """Store everything `f` yields, reading one block at a time in a worker thread.

    Memory stays at a few blocks whatever the size. Blocks are always full
    (`block_size`) but the last, so a file, a pipe and stdin with the same bytes
    get the same hash; data up to one block is one block (hash = its blake2sum).
    A regular file's size is known up front: data too large for one manifest is
    refused before anything is uploaded. `fresh_ref`: `ref` was made for this put
    (on failure it is released from what was stored, see `Client.put_chunks`).
    """
    size = client.block_size
    try:
        st = os.fstat(f.fileno())
        known = st.st_size - f.tell() if stat.S_ISREG(st.st_mode) else None
    except (OSError, ValueError, AttributeError):
        known = None

    async def read() -> bytes:
        try:
            return await trio.to_thread.run_sync(read_block, f, size, abandon_on_cancel=True)
        except OSError as exc:
            raise fail(f"cannot read {name}: {exc.strerror or exc}") from None

    first = await read()
    if len(first) < size:
        return await client.put(first, ref, fresh_ref=fresh_ref)
    second = await read()
    if not second:
        return await client.put(first, ref, fresh_ref=fresh_ref)
    head = [first, second]
    del first, second

    with progress(known, "put", delay=PROGRESS_DELAY_S) as bar:

        async def chunks() -> AsyncIterator[bytes]:
            while head:
                chunk = head.pop(0)
                bar.update(len(chunk))
                yield chunk
            while chunk := await read():
                bar.update(len(chunk))
                yield chunk

        return await client.put_chunks(chunks(), ref=ref, size=known, fresh_ref=fresh_ref)


def cmd_get(args: argparse.Namespace) -> int:
    """Write the bytes stored under HASH to stdout or -o PATH."""
    hash_arg(args.hash)

    async def go(client: Client) -> int:
        with progress(None, "get", delay=PROGRESS_DELAY_S) as bar:
            if args.output:
                with OutputFile(args.output) as out:
                    async for chunk in client.iter_get(args.hash):
                        out.write(chunk)
                        bar.update(len(chunk))
                    out.commit()
            else:
                stdout = sys.stdout.buffer
                async for chunk in client.iter_get(args.hash):
                    stdout.write(chunk)
                    bar.update(len(chunk))
                stdout.flush()
        return 0

    return run_with_client(args, go)


def cmd_ref(args: argparse.Namespace) -> int:
    """Add a reference to a block (and to the blocks of a manifest)."""
    hash_arg(args.hash)
    return run_with_client(args, lambda c: _done(c.ref(args.hash, args.ref)))


def cmd_unref(args: argparse.Namespace) -> int:
    """Delete a reference (the block is collected once no reference is left).

    A reference that did not exist is not an error (the deletion is recorded all
    the same: exit 0), but it is said on stderr.
    """
    hash_arg(args.hash)

    async def go(client: Client) -> int:
        if not await client.unref(args.hash, args.ref):
            print(f"note: {args.hash} had no reference {args.ref!r}: nothing was deleted",
                  file=sys.stderr)
        return 0

    return run_with_client(args, go)


async def _done(aw: Awaitable[Any]) -> int:
    await aw
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Show the cluster overview (a table, one row per node) and this node's details;
    ``--json``: this node's status (the contract keys)."""
    cfg = node_config(args)

    async def go(client: Client) -> int:
        st = await client.status()
        if args.json:
            print_json(st)
            return 0
        others = await _statuses(cfg, [p for p in st["peers"] if p["up"] and p["id"] != st["node_id"]])
        others[st["node_id"]] = st
        lay = st.get("layout", {})
        zone_of = {nid: z for z, ids in (lay.get("zones") or {}).items() for nid in ids}
        rows = []
        for p in st["peers"]:
            o = others.get(p["id"]) or {}
            free = [d["free"] for d in o.get("data_dirs", []) if d.get("free") is not None]
            rows.append([p["id"], o.get("zone") or zone_of.get(p["id"]), o.get("capacity"), p["addr"],
                         bool(p["up"]), o.get("blocks"), size(sum(free)) if free else None,
                         o.get("version"), duration(o["uptime"]) if "uptime" in o else None])
        print_table(["node", "zone", "capacity", "address", "up", "blocks", "disk free", "version",
                     "uptime"], rows)
        print()
        print(f"this node   {st['node_id']} at {st.get('addr')} (zone {st.get('zone')}, fast path "
              f"{st.get('fast_path')})")
        print(f"layout      {lay.get('nodes')} node(s), replication {lay.get('replication_factor')}, "
              f"write quorum {lay.get('write_quorum')}")
        if "version" in lay:
            live = lay.get("live_versions") or []
            sync = ("synced" if not lay.get("pending_sync") else
                    f"migrating (versions {', '.join(map(str, live))}), waiting for "
                    f"{', '.join(lay['pending_sync'])}")
            print(f"layout      version {lay['version']} ({lay.get('digest')}), {sync}")
            for v, digests in sorted((lay.get("conflicts") or {}).items()):
                print(f"layout      CONFLICT: version {v} exists as {' and '.join(digests)} "
                      "(different cluster files?); the larger digest was kept")
            for nid, view in sorted((lay.get("disagree") or {}).items()):
                print(f"layout      DIFFERS on {nid}: version {view.get('version')} "
                      f"({view.get('digest')})")
        print(f"blocks      {st['blocks']} ({st.get('inline_blocks', 0)} inline), "
              f"{st['rc_entries']} RC entries")
        print(f"resync      {st['resync_queue']} queued, {st['errors']} errors")
        for d in st.get("data_dirs", []):
            print(f"data dir    {_dir_line(d)}")
        if st.get("admin_addr"):
            print(f"metrics     http://{st['admin_addr']}/metrics, health at /health")
        return 0

    return run_with_client(args, go)


async def _statuses(cfg: NodeConfig, peers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The status of each of `peers` (those that answer within the connect timeout)."""
    out: dict[str, dict[str, Any]] = {}
    try:
        key = load_client_key(cfg)
    except BlocknodeError:
        return out

    async def one(p: dict[str, Any]) -> None:
        with trio.move_on_after(cfg.connect_timeout + cfg.rpc_handshake_timeout):
            try:
                async with open_client(client_config_for(cfg, p["addr"]), key=key,
                                       timeout=cfg.connect_timeout) as c:
                    out[p["id"]] = await c.status()
            except (BlocknodeError, OSError):
                pass  # shown as "-": the node did not answer

    async with trio.open_nursery() as nursery:
        for p in peers:
            nursery.start_soon(one, p)
    return out


def _dir_line(d: dict[str, Any]) -> str:
    """One data directory of `status`: path, state, blocks, bytes, free space, errors."""
    state = d["state"] + (", read-only" if d.get("read_only") else "")
    line = (f"{d['path']}  {state}  {d['blocks']} blocks, {size(d['bytes'])}, "
            f"{size(d.get('free'))} free, {d['errors']} errors")
    if d.get("capacity"):
        line += f", capacity {size(d['capacity'])}"
    if d.get("failure"):
        line += f" ({d['failure']})"
    return line


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `put`, `get`, `ref`, `unref` and `status`."""
    s = sub.add_parser("put", parents=[common], help="store a file; prints its hash")
    s.add_argument("path", metavar="PATH", help="file to store ('-' for stdin; a FIFO or <(cmd) is read as a stream)")
    s.add_argument("--ref", help="reference name (default: a fresh one, shown on stderr)")
    s.set_defaults(func=cmd_put)

    s = sub.add_parser("get", parents=[common], help="fetch the bytes stored under a hash")
    s.add_argument("hash", metavar="HASH", help="the hash `put` printed (64 hex digits)")
    s.add_argument("-o", "--output", metavar="PATH", help="write to PATH instead of stdout")
    s.set_defaults(func=cmd_get)

    for name, fn, what in (("ref", cmd_ref, "add"), ("unref", cmd_unref, "delete")):
        s = sub.add_parser(name, parents=[common], help=f"{what} a reference to a block")
        s.add_argument("hash", metavar="HASH", help="the block's hash (64 hex digits)")
        s.add_argument("ref", metavar="REF", help="the reference name (e.g. the object's key)")
        s.set_defaults(func=fn)

    s = sub.add_parser("status", parents=[common],
                       help="show the cluster (a row per node) and this node's details")
    s.add_argument("--json", action="store_true", help="print this node's status as JSON")
    s.set_defaults(func=cmd_status)
