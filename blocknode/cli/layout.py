"""The cluster layout: `layout show | assign | remove | apply | revert | history` (admin).

Contract:

    layout show [--json]        JSON keys: version (int), digest, nodes, staged, moves
                                (when changes are staged), live_versions, pending_sync,
                                known (nodes not in the layout that gossip with it: id,
                                addr, zone, up, seen_ago_s); version 0 and joining: true on
                                a node still fetching the layout from its bootstrap_peers
    layout assign NODE --zone Z --capacity C [--addr HOST:PORT]   stage a node (new or changed)
    layout remove NODE          stage a removal
    layout apply --version N    make the staged changes version N (refused unless N is
                                the current version + 1)
    layout revert               forget the staged changes
    layout history [--json]     every version: digest, applied, retired

Changes are made on the node the command talks to and gossiped to every node.
"""

from __future__ import annotations

import argparse
from typing import Any

from blocknode.cli.base import run_with_client
from blocknode.cli.output import print_json, when
from blocknode.client import Client
from blocknode.protocol import (
    ADMIN_LAYOUT_APPLY,
    ADMIN_LAYOUT_ASSIGN,
    ADMIN_LAYOUT_HISTORY,
    ADMIN_LAYOUT_REMOVE,
    ADMIN_LAYOUT_REVERT,
    ADMIN_LAYOUT_SHOW,
)


def _capacity(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}")
    return v


def print_layout(st: dict[str, Any]) -> None:
    """The human form of a `layout show` reply."""
    if st.get("joining"):
        print("no layout yet: this node is joining a cluster via its bootstrap_peers (see its "
              "log); ask a node of the cluster")
        return
    live = st.get("live_versions") or [st["version"]]
    print(f"layout version {st['version']} ({st['digest']}), replication "
          f"{st['replication_factor']}, write quorum {st['write_quorum']}")
    if len(live) > 1:
        print(f"migrating: versions {', '.join(map(str, live))} live; waiting for "
              f"{', '.join(st.get('pending_sync') or []) or '-'} to sync")
    print(f"{'NODE':<16} {'ZONE':<12} {'CAPACITY':>8} {'PARTITIONS':>10}  ADDR")
    for n in st["nodes"]:
        print(f"{n['id']:<16} {n['zone']:<12} {n['capacity']:>8} {n['partitions']:>10}  {n['addr']}")
    for k in st.get("known", []):
        print(f"{k['id']:<16} {k['zone']:<12} {'-':>8} {'-':>10}  {k['addr']}  known, not "
              f"assigned (`layout assign {k['id']} --zone Z --capacity C`)")
    if not st["staged"]:
        print("no staged changes")
        return
    print("staged changes:")
    for c in st["staged"]:
        if c.get("remove"):
            print(f"  remove {c['id']}" + ("" if c.get("up", True) else
                  " (DOWN: the migration goes on without it; copies only it held are lost, "
                  "the others are rebuilt from the survivors)"))
        else:
            print(f"  assign {c['id']} zone={c['zone']} capacity={c['capacity']} addr={c['addr']}")
    if "staged_error" in st:
        print(f"  cannot be applied: {st['staged_error']}")
        return
    print(f"after apply: {st['moves']} partition slot(s) move ({st['partitions_moving']} "
          f"partition(s) change nodes)")
    for n in st.get("staged_nodes", []):
        print(f"  {n['id']:<16} {n['zone']:<12} {n['capacity']:>8} {n['partitions']:>10}")
    print(f"apply with: layout apply --version {st['next_version']}")


def cmd_layout(args: argparse.Namespace) -> int:
    """`layout show | assign | remove | apply | revert | history`."""
    action = args.layout_action

    async def go(client: Client) -> int:
        if action == "history":
            reply, _ = await client.call(ADMIN_LAYOUT_HISTORY, {})
            if args.json:
                print_json(reply["versions"])
                return 0
            for v in reply["versions"]:
                retired = "live" if v["live"] else f"retired {when(v['retired'])}"
                applied = when(v["applied"]) if v["applied"] else "cluster file"
                print(f"version {v['version']:<4} {v['digest']}  applied {applied}  {retired}")
            return 0
        if action == "show":
            reply, _ = await client.call(ADMIN_LAYOUT_SHOW, {})
        elif action == "assign":
            fields: dict[str, Any] = {"node": args.node, "zone": args.zone,
                                      "capacity": args.capacity}
            if args.addr is not None:
                fields["addr"] = args.addr
            reply, _ = await client.call(ADMIN_LAYOUT_ASSIGN, fields)
        elif action == "remove":
            reply, _ = await client.call(ADMIN_LAYOUT_REMOVE, {"node": args.node})
        elif action == "apply":
            reply, _ = await client.call(ADMIN_LAYOUT_APPLY, {"version": args.version})
        else:
            reply, _ = await client.call(ADMIN_LAYOUT_REVERT, {})
        if getattr(args, "json", False):
            print_json(reply)
        else:
            print_layout(reply)
        return 0

    return run_with_client(args, go)


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `layout`."""
    s = sub.add_parser("layout", parents=[common],
                       help="the cluster layout: show, stage and apply changes")
    ls = s.add_subparsers(dest="layout_action", metavar="ACTION", required=True)
    a = ls.add_parser("show", parents=[common],
                      help="current version, nodes, staged changes and what they would move")
    a.add_argument("--json", action="store_true", help="print JSON")
    a = ls.add_parser("assign", parents=[common], help="stage a node (new, or a changed zone/capacity)")
    a.add_argument("node", metavar="NODE", help="the node's id (a new one joins the layout)")
    a.add_argument("--zone", required=True, help="the node's zone (copies spread over zones)")
    a.add_argument("--capacity", required=True, type=_capacity,
                   help="relative weight: how many partitions the node takes (e.g. TB)")
    a.add_argument("--addr", default=None, metavar="HOST:PORT",
                   help="its RPC address (required for a node new to the layout, unless it "
                        "joined with bootstrap_peers: `layout show` lists it as known)")
    a.add_argument("--json", action="store_true", help="print JSON")
    a = ls.add_parser("remove", parents=[common], help="stage the removal of a node")
    a.add_argument("node", metavar="NODE", help="the id of the node to take out of the layout")
    a.add_argument("--json", action="store_true", help="print JSON")
    a = ls.add_parser("apply", parents=[common], help="make the staged changes the next version")
    a.add_argument("--version", required=True, type=int, metavar="N",
                   help="the new version number (current + 1; a stale N is refused)")
    a.add_argument("--json", action="store_true", help="print JSON")
    a = ls.add_parser("revert", parents=[common], help="forget the staged changes")
    a.add_argument("--json", action="store_true", help="print JSON")
    a = ls.add_parser("history", parents=[common], help="every version and when it retired")
    a.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_layout)
