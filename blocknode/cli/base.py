"""What every command shares: exit statuses, `CliError`, the node config, a connected client.

The command modules (`data`, `admin`, `serve`, `init_cluster`) import this one;
it imports none of them.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

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


def hash_arg(text: str) -> bytes:
    """A HASH argument as bytes; a malformed one is a usage error."""
    try:
        return parse_hash(text)
    except InvalidHash as exc:
        raise fail(str(exc), EXIT_USAGE) from None
