"""The command line: `blocknode COMMAND ...` (or `python -m blocknode COMMAND ...`).

Command names, their arguments and the JSON keys they print are a contract
(README, "Command line"). Every failure is one line on stderr and a non-zero exit
status, never a traceback: 1 for an operational error (unreachable node, quorum
not reached, block not found, ...), 2 for bad usage or bad input, 3 when the node
refused the client key (unknown or revoked, or without the permission). A closed
stdout (`... | head`) ends a command quietly with 141 (`EXIT_PIPE`).

    __init__      main() and the parser
    base          exit statuses, CliError, the node config, a connected client
    output        JSON, times, progress bars
    data          put, get, ref, unref, status
    admin         scrub, repair, block, worker
    keys          key create, key list, key delete
    layout        layout show, assign, remove, apply, revert, history
    serve         serve
    init_cluster  init-cluster
"""

from __future__ import annotations

import argparse
import os
import sys

from blocknode import __version__
from blocknode.cli import admin, data, init_cluster, keys, layout, serve
from blocknode.cli.base import (
    EXIT_DENIED,
    EXIT_ERROR,
    EXIT_PIPE,
    EXIT_USAGE,
    PROG_MODULE,
    PROG_SCRIPT,
    CliError,
    common_parser,
)
from blocknode.errors import BlocknodeError, ConfigError, InvalidHash, single_error

__all__ = ["EXIT_DENIED", "EXIT_ERROR", "EXIT_PIPE", "EXIT_USAGE", "PROG_MODULE", "PROG_SCRIPT", "CliError", "build_parser", "explain", "main"]


def build_parser(prog: str = PROG_SCRIPT) -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    common = common_parser()
    p = argparse.ArgumentParser(prog=prog, parents=[common],
                                description="blocknode: a distributed content-addressed block store node")
    p.add_argument("--version", action="version", version=f"blocknode {__version__}",
                   help="print the version and exit")
    p.set_defaults(prog=prog)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve.add_command(sub, common)
    data.add_commands(sub, common)
    init_cluster.add_command(sub, common)
    admin.add_commands(sub, common)
    keys.add_commands(sub, common)
    layout.add_commands(sub, common)
    return p


def main(argv: list[str] | None = None, *, prog: str = PROG_SCRIPT) -> int:
    """Entry point; returns the exit status.

    `prog` is how the user ran us: the installed `blocknode` script (the
    default), or `python -m blocknode` (`blocknode.__main__` says so).
    """
    args = build_parser(prog).parse_args(argv)
    try:
        try:
            status = args.func(args)
            sys.stdout.flush()  # here, where a closed stdout can still be handled
            return status
        except BaseExceptionGroup as group:  # from a nursery: report the error inside
            raise single_error(group) from None
    except BrokenPipeError:
        # Whoever read our stdout is gone (`status | head -1`): not an error to report.
        return _stdout_closed()
    except (CliError, BlocknodeError, OSError) as exc:
        message, status = explain(exc)
        print(f"error: {message}", file=sys.stderr)
        return status
    except KeyboardInterrupt as exc:
        notes = getattr(exc, "__notes__", None)
        print("interrupted" + (f" ({'; '.join(notes)})" if notes else ""), file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the contract is one line, never a traceback
        if os.environ.get("BLOCKNODE_DEBUG"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (a bug in blocknode; "
              "BLOCKNODE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_ERROR


def explain(exc: BaseException) -> tuple[str, int]:
    """The line to print for an error, and the exit status.

    Bad input is a usage error (2) wherever it was found: by the CLI, by the
    config loader, or by the node (a remote error with code ``bad_request``).
    A request the client key may not make (code ``forbidden``) is 3.
    A remote error shows the node and its message; its code is for programs,
    not for people.
    """
    text, status = _explain(exc)
    notes = getattr(exc, "__notes__", None)  # what a failed put did about it (PEP 678)
    if isinstance(notes, list) and notes:
        text += " (" + "; ".join(str(n) for n in notes) + ")"
    return text, status


def _explain(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, CliError):
        return str(exc), exc.status
    code, message, node = (getattr(exc, a, None) for a in ("code", "message", "node"))
    if isinstance(code, str) and isinstance(message, str):
        text = f"node {node}: {message}" if isinstance(node, str) else message
        status = {"bad_request": EXIT_USAGE, "forbidden": EXIT_DENIED}.get(code, EXIT_ERROR)
        return text, status
    return str(exc), EXIT_USAGE if isinstance(exc, ConfigError | InvalidHash) else EXIT_ERROR


def _stdout_closed() -> int:
    """Exit quietly with `EXIT_PIPE`; stdout now goes to /dev/null, so that the
    interpreter's own flush at exit has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file descriptor (tests)
        pass
    return EXIT_PIPE
