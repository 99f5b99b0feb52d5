"""What every command shares: exit statuses, `CliError`, the node config, a connected client.

The command modules (`data`, `admin`, `serve`, `init_cluster`) import this one;
it imports none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from blocknode.auth import load_client_key
from blocknode.client import Client, open_client, parse_hash
from blocknode.config import (
    DEFAULT_ROOT,
    NodeConfig,
    default_config_at,
    find_default_root,
    load_config,
    resolve_config_path,
)
from blocknode.errors import (
    AuthenticationError,
    BlocknodeError,
    CliError,
    ConfigError,
    InvalidHash,
    NodeUnreachable,
)

EXIT_ERROR = 1
EXIT_USAGE = 2
# The node refused the client key: unknown or revoked (the handshake), or it lacks the
# permission the command needs (a `forbidden` answer).
EXIT_DENIED = 3
# stdout was closed by its reader: 128 + SIGPIPE, the status a shell shows for a tool
# killed by SIGPIPE, so `set -o pipefail` tells a cut-short `get | head` from a full one.
EXIT_PIPE = 141

PROG_SCRIPT = "blocknode"
PROG_MODULE = "python -m blocknode"


def fail(message: str, status: int = EXIT_ERROR) -> CliError:
    """Build a `CliError` (raise it)."""
    return CliError(message, status)


def common_parser() -> argparse.ArgumentParser:
    """The parent parser of every (sub-)command: `--config PATH`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="node config file (default: $BLOCKNODE_CONFIG, else the default node "
                        "in the nearest blocknode-data directory, here or above)")
    return common


def prog_of(args: argparse.Namespace) -> str:
    """How the user ran us (`blocknode` or `python -m blocknode`), for messages."""
    return getattr(args, "prog", PROG_SCRIPT)


def node_config(args: argparse.Namespace, *, serving: bool = False) -> NodeConfig:
    """The node a command talks through (or, `serving`, runs). The rule, the same
    for every command and from any working directory:

    1. ``--config PATH``; 2. ``$BLOCKNODE_CONFIG``; 3. the embedded default node
    in the nearest ``blocknode-data`` directory: the working directory's, else its
    parent's, and so on up to ``/``; 4. for `serve` only, a new default node in
    ``./blocknode-data``. Otherwise a `ConfigError` says where we looked.
    """
    path = resolve_config_path(getattr(args, "config", None))
    if path is not None:
        return load_config(path)
    root = find_default_root()
    if root is not None:
        return default_config_at(root)
    cwd = Path.cwd()
    if serving:
        return default_config_at(cwd / DEFAULT_ROOT)
    raise ConfigError(
        f"no node to talk to: no --config, BLOCKNODE_CONFIG is not set, and no {DEFAULT_ROOT} "
        f"directory (the default node's) in {cwd} or any directory above it; pass --config PATH, "
        f"or run from where `{prog_of(args)} serve` made {DEFAULT_ROOT}"
    )


def run_with_client(args: argparse.Namespace, fn: Callable[[Client], Awaitable[int]]) -> int:
    """Connect to the configured node and run `fn(client)` under Trio."""
    cfg = node_config(args)

    async def main() -> int:
        async with open_client(cfg) as client:
            return await fn(client)

    try:
        return trio.run(main)
    except NodeUnreachable as exc:
        raise fail(f"node unreachable at {cfg.public_addr}: {exc} "
                   f"(is `{prog_of(args)} serve` running?)") from None
    except AuthenticationError as exc:
        raise fail(str(exc), EXIT_DENIED) from None  # it names the node and the key


def add_all_nodes(parser: argparse.ArgumentParser) -> None:
    """`-a` / `--all-nodes`: run the command on every node of the cluster (as Garage's `-a`)."""
    parser.add_argument("-a", "--all-nodes", action="store_true",
                        help="run it on every node of the cluster, one after the other (the "
                        "node --config names lists them; the same client key is used)")


async def cluster_nodes(client: Client) -> list[tuple[str, str]]:
    """Every node of the cluster as (id, address), from the status of the node `client` talks to."""
    st = await client.status()
    return [(p["id"], p["addr"]) for p in st["peers"]]


def client_config_for(cfg: NodeConfig, addr: str) -> NodeConfig:
    """`cfg`, but dialling `addr` (another node of the same cluster)."""
    return replace(cfg, rpc_public_addr=addr)


def run_on_nodes(args: argparse.Namespace, fn: Callable[[Client], Awaitable[int]]) -> int:
    """`run_with_client`, or with ``--all-nodes`` `fn` on every node of the cluster in turn.

    Each node's output is collected: a JSON command prints one object keyed by
    node id; a one-line answer is printed after the node's id; a longer one under
    a ``== NODE (ADDRESS) ==`` header. A node that fails (down, or refusing) is
    reported on stderr and the others still run; the exit status is the worst.
    """
    if not getattr(args, "all_nodes", False):
        return run_with_client(args, fn)
    cfg = node_config(args)
    as_json = bool(getattr(args, "json", False))

    async def main(first: Client) -> int:
        from blocknode.cli import explain  # the package imports this module

        nodes = await cluster_nodes(first)
        key = load_client_key(cfg)
        worst, collected = 0, dict[str, Any]()
        for node_id, addr in nodes:
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    if addr == cfg.public_addr:
                        status = await fn(first)
                    else:
                        async with open_client(client_config_for(cfg, addr), key=key) as c:
                            status = await fn(c)
            except (CliError, BlocknodeError, OSError) as exc:
                message, status = explain(exc)
                print(f"{node_id}: error: {message}", file=sys.stderr)
                worst = max(worst, status)
                continue
            worst = max(worst, status)
            text = out.getvalue()
            if as_json:
                collected[node_id] = json.loads(text) if text.strip() else None
            elif text.count("\n") <= 1:
                print(f"{node_id:<12} {text}", end="" if text.endswith("\n") else "\n")
            else:
                print(f"== {node_id} ({addr}) ==")
                print(text, end="")
        if as_json:
            print(json.dumps(collected, indent=2, sort_keys=True))
        return worst

    return run_with_client(args, main)


def hash_arg(text: str) -> bytes:
    """A HASH argument as bytes; a malformed one is a usage error."""
    try:
        return parse_hash(text)
    except InvalidHash as exc:
        raise fail(str(exc), EXIT_USAGE) from None
