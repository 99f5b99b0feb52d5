"""Bench cell: the blocking and asyncio clients against the Trio client, same cluster.

    python -m bench.clients [--duration S] [--rounds R] [--nodes N] [--json PATH]

One real server cluster (``python -m blocknode serve`` processes, see
`bench.macro.running_cluster`; 1 node by default, ``--nodes 3`` for rf 3), and
in this process, one after the other: the Trio client (`blocknode.open_client`,
8 tasks), the blocking client (`blocknode.connect`, 8 threads sharing one
`SyncClient`) and the asyncio client (`blocknode.aio.connect`, 8 tasks sharing
one client). Each puts distinct blocks of 4 KiB and of 1 MiB (`put(data,
ref=...)`) for `duration` seconds, then gets them back for `duration` seconds.
The flavours take turns, `rounds` times (the order rotated each round); a figure
is the median ops/s of its rounds. Printed: ops/s per flavour and the bridges'
cost relative to Trio (targets: at most 15 % on 1 MiB, 30 % on 4 KiB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import trio

import blocknode
import blocknode.aio
from bench.macro import running_cluster, size_label
from blocknode.config import load_config

KIB, MIB = 1 << 10, 1 << 20
SIZES = (4 * KIB, MIB)
CONCURRENCY = 8
FLAVOURS = ("trio", "sync", "asyncio")
TARGETS = {4 * KIB: 0.30, MIB: 0.15}


class _Data:
    """Distinct blocks of one size: a random body with a unique 16-byte head."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.body = os.urandom(size)
        self.prefix = os.urandom(8)
        self.n = 0
        self.lock = threading.Lock()

    def make(self) -> bytes:
        with self.lock:
            self.n += 1
            n = self.n
        head = self.prefix + n.to_bytes(8, "big")
        return head + self.body[16:]


def _trio(cfg: Any, data: _Data, duration: float, hashes: list[str]) -> tuple[int, int]:
    async def main() -> tuple[int, int]:
        async with blocknode.open_client(cfg, timeout=30) as client:
            counts = []
            for op in ("put", "get"):
                deadline = time.perf_counter() + duration
                done = [0]

                async def worker(w: int, op: str = op, deadline: float = deadline,
                                 done: list[int] = done) -> None:
                    i = w
                    while time.perf_counter() < deadline:
                        if op == "put":
                            hashes.append(await client.put(data.make(), "bench"))
                        else:
                            await client.get(hashes[i % len(hashes)])
                            i += CONCURRENCY
                        done[0] += 1

                async with trio.open_nursery() as nursery:
                    for w in range(CONCURRENCY):
                        nursery.start_soon(worker, w)
                counts.append(done[0])
            return counts[0], counts[1]

    return trio.run(main)


def _sync(cfg: Any, data: _Data, duration: float, hashes: list[str]) -> tuple[int, int]:
    with blocknode.connect(cfg, timeout=30) as client:
        counts = []
        for op in ("put", "get"):
            deadline = time.perf_counter() + duration
            done = [0] * CONCURRENCY

            def worker(w: int, op: str = op, deadline: float = deadline,
                       done: list[int] = done) -> None:
                i = w
                while time.perf_counter() < deadline:
                    if op == "put":
                        hashes.append(client.put(data.make(), "bench"))
                    else:
                        client.get(hashes[i % len(hashes)])
                        i += CONCURRENCY
                    done[w] += 1

            threads = [threading.Thread(target=worker, args=(w,)) for w in range(CONCURRENCY)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            counts.append(sum(done))
        return counts[0], counts[1]


def _asyncio(cfg: Any, data: _Data, duration: float, hashes: list[str]) -> tuple[int, int]:
    async def main() -> tuple[int, int]:
        async with await blocknode.aio.connect(cfg, timeout=30) as client:
            counts = []
            for op in ("put", "get"):
                deadline = time.perf_counter() + duration
                done = [0]

                async def worker(w: int, op: str = op, deadline: float = deadline,
                                 done: list[int] = done) -> None:
                    i = w
                    while time.perf_counter() < deadline:
                        if op == "put":
                            hashes.append(await client.put(data.make(), "bench"))
                        else:
                            await client.get(hashes[i % len(hashes)])
                            i += CONCURRENCY
                        done[0] += 1

                await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)))
                counts.append(done[0])
            return counts[0], counts[1]

    return asyncio.run(main())


RUNNERS: dict[str, Callable[[Any, _Data, float, list[str]], tuple[int, int]]] = {
    "trio": _trio, "sync": _sync, "asyncio": _asyncio,
}


def run(*, duration: float = 2.0, rounds: int = 3, nodes: int = 1,
        sizes: tuple[int, ...] = SIZES, base_dir: str | None = None) -> list[dict[str, Any]]:
    """Every (size, op, flavour): the median ops/s over `rounds`."""
    rows: list[dict[str, Any]] = []
    base = base_dir or tempfile.gettempdir()
    with running_cluster(base, nodes, min(nodes, 3), pure=False) as cluster:
        cfg = load_config(cluster.configs[0])
        for size in sizes:
            data = _Data(size)
            rates: dict[tuple[str, str], list[float]] = {}
            for r in range(rounds):
                order = FLAVOURS[r % 3:] + FLAVOURS[:r % 3]
                for flavour in order:
                    hashes: list[str] = []
                    puts, gets = RUNNERS[flavour](cfg, data, duration, hashes)
                    rates.setdefault(("put", flavour), []).append(puts / duration)
                    rates.setdefault(("get", flavour), []).append(gets / duration)
            for op in ("put", "get"):
                row: dict[str, Any] = {"size": size, "op": op}
                for flavour in FLAVOURS:
                    row[flavour] = statistics.median(rates[(op, flavour)])
                    row[f"{flavour}_rounds"] = rates[(op, flavour)]
                rows.append(row)
    return rows


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return f"unknown CPU, {os.cpu_count()} cores"


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| size | op | Trio ops/s | blocking ops/s (cost) | asyncio ops/s (cost) | target cost |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        base = row["trio"]

        def cell(flavour: str, base: float = base, row: dict[str, Any] = row) -> str:
            v = row[flavour]
            return f"{v:,.0f} ({(1 - v / base) * 100:+.0f} %)" if base else f"{v:,.0f}"

        lines.append(f"| {size_label(row['size'])} | {row['op']} | {base:,.0f} | {cell('sync')} | "
                     f"{cell('asyncio')} | ≤ {TARGETS.get(row['size'], 0) * 100:.0f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="blocking and asyncio clients vs the Trio client")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per phase (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="turns of each flavour (default 3)")
    p.add_argument("--nodes", type=int, default=1, help="cluster nodes (default 1; rf = min(n, 3))")
    p.add_argument("--sizes", default=None, help="comma-separated bytes (default 4096,1048576)")
    p.add_argument("--json", metavar="PATH", help="also write the raw figures as JSON")
    args = p.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else SIZES
    t0 = time.time()
    rows = run(duration=args.duration, rounds=args.rounds, nodes=args.nodes, sizes=sizes)
    print(f"clients bench: {args.nodes} node(s), c={CONCURRENCY}, {args.rounds} rounds of "
          f"{args.duration:g}s per phase, {cpu_model()}, Python {sys.version.split()[0]} "
          f"({time.time() - t0:.0f}s)")
    print("cost = how much fewer ops/s than the Trio client (negative: more)")
    print(render(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "cpu": cpu_model(), "nodes": args.nodes,
                       "duration": args.duration, "rounds": args.rounds}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
