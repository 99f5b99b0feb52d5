"""Client keys: `key create`, `key list`, `key delete` (the admin permission).

Contract:

    key create NAME [--read] [--write] [--admin]   stdout: exactly one line, ID:SECRET
    key list [--json]                              JSON: [{id, name, permissions, created}]
    key delete NAME                                NAME: a key's name or id

The key's id and secret are made here; the node gets only the secret's
verifier (`blocknode.rpc.handshake.ClientKey`), so the secret is shown once,
by `key create`, and is stored nowhere but where its user puts it
(``BLOCKNODE_KEY=ID:SECRET``, or a file named by `client_key_file`).
"""

from __future__ import annotations

import argparse
import sys

from blocknode.auth import PERMISSIONS, ClientKey
from blocknode.cli.base import EXIT_USAGE, fail, run_with_client
from blocknode.cli.output import print_json, print_table, when
from blocknode.client import Client
from blocknode.protocol import ADMIN_KEY_CREATE, ADMIN_KEY_DELETE, ADMIN_KEY_LIST

_CATCH_UP = "the others apply it at their next key sync (within seconds of coming back)"


def cmd_key(args: argparse.Namespace) -> int:
    """`key create | list | delete`."""
    action = args.key_action
    if action == "create":
        perms = [p for p in PERMISSIONS if getattr(args, p)]
        if not perms:
            raise fail("key create: give at least one of --read, --write, --admin", EXIT_USAGE)
        key = ClientKey.generate()

        async def create(client: Client) -> int:
            reply, _ = await client.call(ADMIN_KEY_CREATE, {
                "name": args.name, "id": key.id, "permissions": perms, "verifier": key.verifier})
            print(key)  # the one line on stdout; shown once
            print(f"key {reply['name']} ({', '.join(reply['permissions'])}) created on "
                  f"{reply['nodes']} of {reply['of']} nodes; its secret is shown only above"
                  + ("" if reply["nodes"] == reply["of"] else f"; {_CATCH_UP}"), file=sys.stderr)
            return 0

        return run_with_client(args, create)

    if action == "list":
        async def show(client: Client) -> int:
            reply, _ = await client.call(ADMIN_KEY_LIST, {})
            keys = reply["keys"]
            if args.json:
                print_json(keys)
                return 0
            if not keys:
                print("no keys")
                return 0
            print_table(["id", "name", "permissions", "created"],
                        [[k["id"], k["name"], ",".join(k["permissions"]),
                          when(k["created"]) if k.get("created") else None] for k in keys])
            return 0

        return run_with_client(args, show)

    async def delete(client: Client) -> int:
        reply, _ = await client.call(ADMIN_KEY_DELETE, {"name": args.name})
        for k in reply["deleted"]:
            print(f"deleted key {k['name'] or '(unnamed)'} ({k['id']}); revoked on "
                  f"{reply['nodes']} of {reply['of']} nodes")
        if reply["nodes"] != reply["of"]:
            print(f"not every node answered: {_CATCH_UP}", file=sys.stderr)
        return 0

    return run_with_client(args, delete)


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `key`."""
    s = sub.add_parser("key", parents=[common], help="client keys: create, list, delete")
    ks = s.add_subparsers(dest="key_action", metavar="ACTION", required=True)
    a = ks.add_parser("create", parents=[common],
                      help="make a client key; prints ID:SECRET, shown only this once")
    a.add_argument("name", metavar="NAME", help="a name for the key (unique), e.g. the application's")
    a.add_argument("--read", action="store_true", help="may get")
    a.add_argument("--write", action="store_true", help="may put, ref and unref")
    a.add_argument("--admin", action="store_true",
                   help="may scrub, repair, manage workers, blocks and keys")
    a = ks.add_parser("list", parents=[common], help="every key: id, name, permissions")
    a.add_argument("--json", action="store_true", help="print JSON")
    a = ks.add_parser("delete", parents=[common], help="revoke a key on every node")
    a.add_argument("name", metavar="NAME", help="the key's name (or id)")
    s.set_defaults(func=cmd_key)
