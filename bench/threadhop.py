"""Micro-benchmark of one thread hop: `trio.to_thread.run_sync` vs `blocknode.threads.run_sync`.

    python -m bench.threadhop [--quick] [--pairs N] [--dir DIR] [--json PATH]

Cases, each run old (Trio's) and new (the lean pool) alternately, A B A B ...,
``--pairs`` times in one process, the median of each side reported:

- ``noop c1``: hops of ``int()`` one after another (the bare round trip);
- ``noop c8``: the same from 8 concurrent tasks;
- ``blake2b 1 MiB c1``: hops that each hash a 1 MiB block (`hashlib.blake2b`);
- ``put 1 MiB c1`` / ``c8``: `LocalBlocks.write` of a fresh 1 MiB block with its
  reference, real fsyncs (file, directory, LMDB commit): the storage-level put
  of a replica, two hops (`BlockFiles.awrite`, the group commit), the two sides
  each with their own store in ``DIR``.

Per op: wall µs and CPU µs (`time.process_time`, every thread of the process),
then new/old ratios. The machine's load average is printed with the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from blocknode import threads
from blocknode.block import hashed
from blocknode.context import NodeContext, RunSync
from blocknode.storage import BlockFiles, LocalBlocks, MetadataStore, RefEntry

MIB = 1 << 20


async def _trio_hop(fn: Callable[..., Any], *args: Any,
                    limiter: trio.CapacityLimiter | None = None) -> Any:
    return await trio.to_thread.run_sync(fn, *args, limiter=limiter)


SIDES: dict[str, RunSync] = {"trio.to_thread": _trio_hop, "lean pool": threads.run_sync}


async def _timed(n: int, conc: int, one: Callable[[int], Awaitable[None]]) -> tuple[float, float]:
    # (wall s, CPU s) of n calls of `one(i)` spread over `conc` tasks.
    async def worker(k: int) -> None:
        for i in range(k, n, conc):
            await one(i)

    w0, c0 = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for k in range(conc):
            nursery.start_soon(worker, k)
    return time.perf_counter() - w0, time.process_time() - c0


def _hop_case(run_sync: RunSync, fn: Callable[..., Any], *args: Any) -> Callable[[int], Awaitable[None]]:
    async def one(_i: int) -> None:
        await run_sync(fn, *args)
    return one


class _Store:
    """A `LocalBlocks` with real fsyncs whose blocking calls go through one side's hop."""

    def __init__(self, path: str, run_sync: RunSync) -> None:
        ctx = NodeContext(run_sync=run_sync)
        self.meta = MetadataStore(os.path.join(path, "meta"), map_size=1 << 28, sync=True, ctx=ctx)
        files = BlockFiles(os.path.join(path, "data"), fsync=True, run_sync=run_sync)
        self.blocks = LocalBlocks(files, self.meta, 4096)

    def put_case(self, blocks: list[Any]) -> Callable[[int], Awaitable[None]]:
        async def one(i: int) -> None:
            blk = blocks[i]
            await self.blocks.write(blk, ref=RefEntry(blk.hash, "bench", False, 1))
        return one


async def _run(quick: bool, pairs: int, base: str, only: str | None = None) -> list[dict[str, Any]]:
    n_noop = 5_000 if quick else 20_000
    n_hash = 300 if quick else 2_000
    n_put = 60 if quick else 300
    data = os.urandom(MIB)
    stores = {name: _Store(os.path.join(base, name.replace(" ", "_").replace(".", "_")), rs)
              for name, rs in SIDES.items()}
    cases: list[tuple[str, int, int, Callable[[str], Callable[[int], Awaitable[None]]]]] = [
        ("noop c1", n_noop, 1, lambda s: _hop_case(SIDES[s], int)),
        ("noop c8", n_noop, 8, lambda s: _hop_case(SIDES[s], int)),
        ("blake2b 1 MiB c1", n_hash, 1, lambda s: _hop_case(SIDES[s], hashlib.blake2b, data)),
    ]
    for conc in (1, 8):
        def make(s: str, n: int = n_put) -> Callable[[int], Awaitable[None]]:
            # Fresh blocks every time: a put of a block already there is a no-op.
            return stores[s].put_case([hashed(os.urandom(MIB)) for _ in range(n)])
        cases.append((f"put 1 MiB c{conc}", n_put, conc, make))
    rows: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        for st in stores.values():
            await nursery.start(st.meta.run_writer)
        for label, n, conc, make in cases:
            if only and only not in label:
                continue
            samples: dict[str, list[tuple[float, float]]] = {s: [] for s in SIDES}
            await _timed(min(n, 200), conc, make("lean pool"))  # warm up threads and caches
            await _timed(min(n, 200), conc, make("trio.to_thread"))
            for _ in range(pairs):
                for side in SIDES:
                    one = make(side)
                    samples[side].append(await _timed(n, conc, one))
            for side, got in samples.items():
                rows.append({
                    "case": label, "side": side, "ops": n, "concurrency": conc,
                    "wall_us": statistics.median(w for w, _ in got) / n * 1e6,
                    "cpu_us": statistics.median(c for _, c in got) / n * 1e6,
                    "cpu_us_all": [round(c / n * 1e6, 1) for _, c in got],
                    "wall_us_all": [round(w / n * 1e6, 1) for w, _ in got],
                })
        nursery.cancel_scope.cancel()
    return rows


def render(rows: list[dict[str, Any]], load: tuple[float, float, float]) -> str:
    """The Markdown table: per case, old and new wall/CPU µs per op and new/old ratios."""
    out = [f"load average while measuring: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", "",
           "| case | ops × pairs | wall µs/op old / new | CPU µs/op old / new | wall new/old | CPU new/old |",
           "|---|--:|--:|--:|--:|--:|"]
    by = {(r["case"], r["side"]): r for r in rows}
    for case in dict.fromkeys(r["case"] for r in rows):  # in run order
        a, b = by[(case, "trio.to_thread")], by[(case, "lean pool")]
        out.append(f"| {case} | {a['ops']} × {len(a['cpu_us_all'])} | {a['wall_us']:,.0f} / "
                   f"{b['wall_us']:,.0f} | {a['cpu_us']:,.0f} / {b['cpu_us']:,.0f} | "
                   f"{b['wall_us'] / a['wall_us']:.2f} | {b['cpu_us'] / a['cpu_us']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table (``--json``: the raw rows too)."""
    ap = argparse.ArgumentParser(prog="python -m bench.threadhop", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer ops per sample")
    ap.add_argument("--pairs", type=int, default=3, help="old/new pairs, alternating (default 3)")
    ap.add_argument("--dir", help="where the stores of the put cases go (default: a temp dir)")
    ap.add_argument("--cases", help="only the cases whose name contains this (e.g. blake2b)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if args.pairs < 1:
        ap.error(f"--pairs must be at least 1, not {args.pairs}")
    base = tempfile.mkdtemp(prefix="bn-threadhop-", dir=args.dir)
    try:
        rows = trio.run(_run, args.quick, args.pairs, base, args.cases)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load = os.getloadavg()
    print(render(rows, load))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": load, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
