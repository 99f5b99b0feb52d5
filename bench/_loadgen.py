"""Load generator process for `bench.macro`: puts, then gets, through `blocknode.client`.

    python -m bench._loadgen --config A.toml[,B.toml...] --size BYTES --concurrency C
        [--conns K] [--duration S] [--windows R] [--proc I] [--start-at UNIX_TIME]
        [--no-get] [--no-direct]

Runs a put phase then a get phase, each for `duration` seconds with
`concurrency` tasks over `conns` client connections (connection j talks to
config ``(proc + j) % len(configs)``: with several nodes the coordinators are
spread). Every put is a distinct block (a per-process random prefix and a
counter); the gets read back this process's blocks in a shuffled order.
Prints one JSON object on stdout: per phase the completion times (relative to
the phase start), latencies, errors and this process's CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

import trio

from blocknode.client import open_client
from blocknode.config import load_config


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def _phase(op: str, clients: list[Any], concurrency: int, duration: float,
                 make: Any, hashes: list[bytes]) -> dict[str, Any]:
    done: list[float] = []
    lat: list[float] = []
    errors: list[str] = []
    perf = time.perf_counter
    started = time.time()
    t0 = perf()
    deadline = t0 + duration
    cpu0 = _cpu()

    async def worker(w: int) -> None:
        client = clients[w % len(clients)]
        i = w
        while perf() < deadline:
            try:
                if op == "put":
                    data = make()
                    s = perf()
                    h = await client.put_block(data, "bench")
                    e = perf()
                    hashes.append(h)
                else:
                    h = hashes[i % len(hashes)]
                    i += concurrency
                    s = perf()
                    await client.get_block(h)
                    e = perf()
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}")
                if len(errors) > 20:
                    return
                continue
            done.append(e - t0)
            lat.append(e - s)

    async with trio.open_nursery() as nursery:
        for w in range(concurrency):
            nursery.start_soon(worker, w)
    wall = perf() - t0
    return {"done": done, "lat": lat, "errors": errors[:5], "n_errors": len(errors),
            "wall": wall, "cpu": _cpu() - cpu0, "duration": duration, "start": started}


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    cfgs = [load_config(p) for p in args.config.split(",")]
    size = args.size
    body = os.urandom(max(size, 24))[:size] if size >= 24 else os.urandom(size)
    prefix = os.urandom(12)
    counter = 0

    def make() -> bytes:
        nonlocal counter
        counter += 1
        head = prefix + counter.to_bytes(12, "little")
        return head + body[24:] if size >= 24 else (head * 2)[:size]

    out: dict[str, Any] = {"proc": args.proc, "size": size, "concurrency": args.concurrency}
    async with AsyncExitStack() as stack:  # clients own nurseries: closed in LIFO order
        clients: list[Any] = []
        for j in range(args.conns):
            cfg = cfgs[(args.proc + j) % len(cfgs)]
            clients.append(await stack.enter_async_context(
                open_client(cfg, timeout=60, direct=False if args.no_direct else None)))
        if args.start_at:
            await trio.sleep(max(0.0, args.start_at - time.time()))
        hashes: list[bytes] = []
        out["put"] = await _phase("put", clients, args.concurrency, args.duration, make, hashes)
        random.Random(args.proc).shuffle(hashes)
        if hashes and not args.no_get:
            out["get"] = await _phase("get", clients, args.concurrency, args.duration, make, hashes)
        stats = [c.direct.stats for c in clients if getattr(c, "direct", None) is not None]
        if stats:
            out["direct"] = {k: sum(st[k] for st in stats) for k in stats[0]}
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (see module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench._loadgen")
    p.add_argument("--config", required=True, help="comma-separated node config paths")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--proc", type=int, default=0)
    p.add_argument("--start-at", type=float, default=0.0)
    p.add_argument("--no-get", action="store_true")
    p.add_argument("--no-direct", action="store_true",
                   help="every block through the node the client talks to (client_direct off)")
    args = p.parse_args(argv)
    result = trio.run(_main, args)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
