"""Admin commands for the background workers: `scrub`, `repair`, `block`, `worker`.

Every command talks to the node named by ``--config`` through the admin RPCs
of `blocknode.admin`. Command names, arguments and JSON keys are a contract:

    scrub start [--tranquility N] [--wait] | pause | resume | cancel
    scrub set-tranquility N | status [--json]
    repair [--wait] [--rc]
    repair rebalance [--wait]
    block info HASH [--json] | list-errors [--json] | retry-now (--all | HASH)
    block purge HASH --yes | repair-rc
    worker list [--json] | get [NAME] [--json] | set NAME VALUE

The worker commands are generated from the node's worker registry: `worker
list` shows every worker's row, `worker get` its settings, and `worker set`
sends any NAME and VALUE to the node, which validates them (an unknown name
or a bad value is refused with exit status 2, naming what is valid).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import trio

from blocknode.cli.base import EXIT_USAGE, add_all_nodes, fail, hash_arg, run_on_nodes
from blocknode.cli.output import (
    cell,
    duration,
    fraction_progress,
    print_json,
    print_table,
    progress,
    set_progress,
    when,
)
from blocknode.client import Client
from blocknode.protocol import block_info_all

POLL_S = 1.0


def _nonneg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


# ------------------------------------------------------------------ scrub

def _print_scrub(st: dict[str, Any]) -> None:
    print(f"state           {st['state']}")
    print(f"progress        {st['progress'] * 100:.1f} %")
    print(f"blocks checked  {st['blocks_checked']}")
    print(f"corruptions     {st['corruptions']}")
    print(f"tranquility     {st['tranquility']:g}")
    print(f"last completed  {when(st.get('last_completed'))}")
    print(f"next run        {when(st.get('next_run'))}")


async def _wait_scrub(client: Client) -> dict[str, Any]:
    with fraction_progress("scrub") as pbar:
        while True:
            st, _ = await client.call("admin_scrub", {"action": "status"})
            set_progress(pbar, st["progress"] * 100,
                         f"{st['blocks_checked']} checked, {st['corruptions']} corrupt")
            if st["state"] != "running":
                return st
            await trio.sleep(POLL_S)


def cmd_scrub(args: argparse.Namespace) -> int:
    """`scrub ACTION`: start / pause / resume / cancel / set-tranquility / status."""
    action = args.scrub_action

    async def go(client: Client) -> int:
        fields: dict[str, Any] = {"action": action.replace("-", "_")}
        if getattr(args, "tranquility", None) is not None:
            fields["tranquility"] = args.tranquility
        st, _ = await client.call("admin_scrub", fields)
        if action == "start" and args.wait:
            st = await _wait_scrub(client)
        if getattr(args, "json", False):
            print_json({k: st.get(k) for k in (
                "state", "tranquility", "blocks_checked", "corruptions", "progress",
                "last_completed", "next_run", "position")})
        elif action == "status" or (action == "start" and args.wait):
            _print_scrub(st)
        else:
            print(f"scrub {st['state']} (tranquility {st['tranquility']:g}, "
                  f"{st['progress'] * 100:.1f} % done)")
        return 0

    return run_on_nodes(args, go)


# ------------------------------------------------------------------ repair

def cmd_repair(args: argparse.Namespace) -> int:
    """`repair [--wait] [--rc]`: queue every block for resync (and recalculate RCs);
    `repair rebalance [--wait]`: move block files to their data directories."""
    if getattr(args, "what", None) == "rebalance":
        if args.rc:
            raise fail("repair rebalance takes no --rc", EXIT_USAGE)
        return run_on_nodes(args, lambda client: _rebalance(client, wait=args.wait))

    async def go(client: Client) -> int:
        st, _ = await client.call("admin_repair", {"action": "start", "rc": bool(args.rc)})
        if not st.get("started_now"):
            print("a repair is already running", file=sys.stderr)
        if not args.wait:
            print(f"repair started{' (with RC recalculation)' if args.rc else ''}; "
                  "poll with `repair --wait` or `worker list`")
            return 0
        with progress(None, "repair", unit="blocks") as pbar:
            while True:
                st, _ = await client.call("admin_repair", {"action": "status"})
                pbar.set_postfix_str(f"phase {st['phase'] or '-'}, "
                                     f"{st['rc_recalculated']} RCs recalculated", refresh=False)
                set_progress(pbar, st["queued"])
                if st["state"] != "running":
                    break
                await trio.sleep(POLL_S)
        if st.get("error"):
            raise fail(f"repair failed: {st['error']}")
        print(f"repair done: {st['queued']} blocks queued for resync"
              + (f", {st['rc_recalculated']} RCs recalculated" if st.get("rc") else ""))
        return 0

    return run_on_nodes(args, go)


async def _rebalance(client: Client, *, wait: bool) -> int:
    st, _ = await client.call("admin_rebalance", {"action": "start"})
    if not wait:
        print("rebalance started; poll with `repair rebalance --wait`")
        return 0
    with fraction_progress("rebalance") as pbar:
        while True:
            st, _ = await client.call("admin_rebalance", {"action": "status"})
            set_progress(pbar, st["progress"] * 100, f"{st['scanned']} looked at, "
                         f"{st['moved']} moved, {st['errors']} errors")
            if st["state"] != "running":
                break
            await trio.sleep(POLL_S)
    print(f"rebalance done: {st['scanned']} blocks looked at, {st['moved']} moved, "
          f"{st['errors']} errors")
    return 1 if st["errors"] else 0


# ------------------------------------------------------------------ block

def cmd_block(args: argparse.Namespace) -> int:
    """`block info | list-errors | retry-now | purge | repair-rc`."""
    action = args.block_action
    if action == "repair-rc":
        args.rc, args.wait = True, getattr(args, "wait", False)
        return cmd_repair(args)
    if action == "purge" and not args.yes:
        raise fail("block purge deletes every reference of the block on the whole cluster; "
                   "add --yes to confirm", EXIT_USAGE)
    if action == "retry-now" and bool(args.all) == bool(args.hash):
        raise fail("block retry-now: give either --all or one HASH", EXIT_USAGE)
    h = hash_arg(args.hash) if getattr(args, "hash", None) else None

    async def go(client: Client) -> int:
        if action == "info":
            assert h is not None

            async def call(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
                reply, _ = await client.call(kind, fields)
                return reply

            info = await block_info_all(call, h)
            if args.json:
                print_json(info)
                return 0
            print(f"hash     {info['hash']}")
            print(f"rc       {info['rc']} ({info['rc_state']})")
            print(f"present  {'yes' if info['present'] else 'no'}")
            print(f"nodes    {', '.join(info['nodes'])}")
            for r in info["refs"]:
                print(f"ref      {r['ref_id']}  {'deleted' if r['deleted'] else 'live'}  {when(r['ts'])}")
            if "error" in info:
                e = info["error"]
                print(f"error    {e['count']} failure(s), next try {when(e['next_try'])}: {e['message']}")
            return 0
        if action == "list-errors":
            reply, _ = await client.call("admin_block_errors", {})
            errors = reply["errors"]
            if args.json:
                print_json(errors)
                return 0
            if not errors:
                print("no block errors")
                return 0
            print_table(["hash", "failures", "next try", "last error"],
                        [[e["hash"], e["count"], when(e["next_try"]), e["message"]] for e in errors])
            return 0
        if action == "retry-now":
            fields: dict[str, Any] = {"all": True} if args.all else {"hash": h}
            reply, _ = await client.call("admin_block_retry_now", fields)
            print(f"{reply['queued']} block(s) queued for resync now")
            return 0
        if action == "purge":
            reply, _ = await client.call("admin_block_purge", {"hash": h})
            print(f"deleted {len(reply['deleted'])} reference(s) of {reply['hash']}: "
                  f"{', '.join(reply['deleted']) or '(none live)'}")
            return 0
        raise fail(f"unknown block action {action!r}", EXIT_USAGE)

    return run_on_nodes(args, go)


# ------------------------------------------------------------------ worker

_ROW_HIDDEN = ("name", "state", "tranquility", "settings", "errors", "last_error",
               "last_error_at", "last_round", "worker_states", "position")


_TIME_KEYS = frozenset({"next_run", "last_completed", "started", "finished", "last_error_at",
                        "next_try"})


def _human(key: str, v: Any) -> str:
    """A worker row value for people: times as dates, progress as a percentage."""
    if key in _TIME_KEYS:
        return when(v)
    if key == "interval":
        return duration(v)
    if key == "progress" and isinstance(v, int | float):
        return f"{v * 100:.1f} %"
    return cell(v)


def _worker_row(w: dict[str, Any]) -> list[Any]:
    details = [f"{k}={_human(k, v)}" for k, v in (w.get("settings") or {}).items()]
    details += [f"{k}={_human(k, v)}" for k, v in w.items()
                if k not in _ROW_HIDDEN and k not in (w.get("settings") or {})
                and v is not None and not isinstance(v, dict | list)]
    return [w["name"], w["state"], w.get("tranquility"), w.get("errors", 0), ", ".join(details)]


def _print_workers(workers: list[dict[str, Any]]) -> None:
    print_table(["worker", "state", "tranquility", "errors", "details"],
                [_worker_row(w) for w in workers])
    for w in workers:
        if w.get("last_error"):
            print(f"{w['name']}: last error {when(w.get('last_error_at'))}: {w['last_error']}")


def cmd_worker(args: argparse.Namespace) -> int:
    """`worker list [--json]` / `worker get [NAME] [--json]` / `worker set NAME VALUE`."""

    async def go(client: Client) -> int:
        if args.worker_action == "set":
            reply, _ = await client.call("admin_worker_set", {"name": args.name, "value": args.value})
            print(f"{reply['name']} = {reply['value']:g}")
            return 0
        if args.worker_action == "get":
            fields = {"name": args.name} if args.name is not None else {}
            reply, _ = await client.call("admin_worker_get", fields)
            settings = reply["settings"]
            if args.json:
                print_json(settings)
                return 0
            if args.name is not None:  # one setting: one line
                for st in settings:
                    print(f"{st['name']} = {st['value']:g}    ({st['worker']}: {st['valid']}; "
                          f"{st['help']})")
                return 0
            print_table(["setting", "value", "worker", "valid values", "what it does"],
                        [[st["name"], st["value"], st["worker"], st["valid"], st["help"]]
                         for st in settings])
            return 0
        reply, _ = await client.call("admin_worker_list", {})
        workers = reply["workers"]
        if args.json:
            print_json(workers)
            return 0
        _print_workers(workers)
        return 0

    return run_on_nodes(args, go)


# ------------------------------------------------------------------ parser

def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `scrub`, `repair`, `block` and `worker`."""

    s = sub.add_parser("scrub", parents=[common], help="verify every block held by the node")
    ss = s.add_subparsers(dest="scrub_action", metavar="ACTION", required=True)
    a = ss.add_parser("start", parents=[common], help="start a scrub (a paused one resumes)")
    a.add_argument("--tranquility", type=_nonneg, default=None, metavar="N",
                   help="rest this many times the step time after each block")
    a.add_argument("--wait", action="store_true", help="show progress until it finishes")
    add_all_nodes(a)
    for name, what in (("pause", "pause the running scrub"), ("resume", "resume a paused scrub"),
                       ("cancel", "stop the scrub and forget its position")):
        add_all_nodes(ss.add_parser(name, parents=[common], help=what))
    a = ss.add_parser("set-tranquility", parents=[common], help="change the scrub's tranquility")
    a.add_argument("tranquility", type=_nonneg, metavar="N",
                   help="rest N times the step time after each block (0: full speed)")
    add_all_nodes(a)
    a = ss.add_parser("status", parents=[common], help="show the scrub state")
    a.add_argument("--json", action="store_true", help="print JSON")
    add_all_nodes(a)
    s.set_defaults(func=cmd_scrub)

    s = sub.add_parser("repair", parents=[common],
                       help="queue every referenced and every local block for resync; "
                            "`repair rebalance`: move block files to their data directories")
    s.add_argument("what", nargs="?", choices=["rebalance"], metavar="rebalance",
                   help="move every block file to the data directory the current placement "
                        "gives it (after a change of data_dir)")
    s.add_argument("--wait", action="store_true", help="wait until it finishes, showing progress")
    s.add_argument("--rc", action="store_true", help="first recalculate every RC from its references")
    add_all_nodes(s)
    s.set_defaults(func=cmd_repair)

    s = sub.add_parser("block", parents=[common], help="inspect and manage single blocks")
    bs = s.add_subparsers(dest="block_action", metavar="ACTION", required=True)
    a = bs.add_parser("info", parents=[common], help="what this node knows about a block")
    a.add_argument("hash", metavar="HASH", help="the block's hash (64 hex digits)")
    a.add_argument("--json", action="store_true", help="print JSON")
    a = bs.add_parser("list-errors", parents=[common], help="blocks whose resync failed")
    a.add_argument("--json", action="store_true", help="print JSON")
    add_all_nodes(a)
    a = bs.add_parser("retry-now", parents=[common], help="retry failed resyncs now")
    a.add_argument("hash", metavar="HASH", nargs="?", help="the block to retry (or --all)")
    a.add_argument("--all", action="store_true", help="every failed block")
    a = bs.add_parser("purge", parents=[common],
                      help="delete every reference of a block, cluster-wide")
    a.add_argument("hash", metavar="HASH", help="the block's hash (64 hex digits)")
    a.add_argument("--yes", action="store_true", help="confirm the deletion")
    a = bs.add_parser("repair-rc", parents=[common], help="recalculate every RC (repair --rc)")
    a.add_argument("--wait", action="store_true", help="wait until it finishes, showing progress")
    s.set_defaults(func=cmd_block)

    s = sub.add_parser("worker", parents=[common], help="background workers")
    ws = s.add_subparsers(dest="worker_action", metavar="ACTION", required=True)
    a = ws.add_parser("list", parents=[common], help="every background task and its state")
    a.add_argument("--json", action="store_true", help="print JSON")
    add_all_nodes(a)
    a = ws.add_parser("get", parents=[common], help="show worker settings (all, or NAME)")
    a.add_argument("name", metavar="NAME", nargs="?",
                   help="a setting, e.g. resync-workers (Garage's names work too, e.g. "
                        "resync-worker-count)")
    a.add_argument("--json", action="store_true", help="print JSON")
    add_all_nodes(a)
    a = ws.add_parser("set", parents=[common], help="change a worker setting (persisted)")
    a.add_argument("name", metavar="NAME", help="a setting (see `worker get`), e.g. resync-workers")
    a.add_argument("value", metavar="VALUE", help="its new value (the node validates it)")
    add_all_nodes(a)
    s.set_defaults(func=cmd_worker)
