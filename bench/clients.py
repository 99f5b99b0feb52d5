"""Bench cell: the blocking and asyncio clients against the Trio client, same cluster.

    python -m bench.clients [--duration S] [--rounds R] [--nodes N] [--json PATH]

One real server cluster (``python -m blocknode serve`` processes, see
`bench.macro.running_cluster`; 1 node by default, ``--nodes 3`` for rf 3), and
in this process, one after the other: the Trio client (`blocknode.open_client`,
8 tasks), the blocking client (`blocknode.connect`, 8 threads sharing one
`SyncClient`) and the asyncio client (`blocknode.aio.connect`, 8 tasks sharing
one client), and for comparison the asyncio design not shipped: the same Trio
client run as a guest of the asyncio loop (`trio.lowlevel.start_guest_run`). Each puts distinct blocks of 4 KiB and of 1 MiB (`put(data,
ref=...)`) for `duration` seconds, then gets them back for `duration` seconds.
The flavours take turns, `rounds` times (the order rotated each round). Printed:
the median ops/s per flavour; the bridges' cost, the median over rounds of
their ops/s relative to Trio's in the same round (targets: at most 15 % on
1 MiB, 30 % on 4 KiB); and the client process's CPU time per op (all its
threads), which a busy machine disturbs less than throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
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
from blocknode.client.portal import ClientThread
from blocknode.config import load_config

KIB, MIB = 1 << 10, 1 << 20
SIZES = (4 * KIB, MIB)
CONCURRENCY = 8
FLAVOURS = ("trio", "sync", "asyncio", "guest")
TARGETS = {4 * KIB: 0.30, MIB: 0.15}


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


Phase = tuple[int, float]  # ops done, client CPU seconds


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


def _trio(cfg: Any, data: _Data, duration: float, hashes: list[str]) -> tuple[Phase, Phase]:
    async def main() -> tuple[Phase, Phase]:
        async with blocknode.open_client(cfg, timeout=30) as client:
            counts: list[Phase] = []
            for op in ("put", "get"):
                deadline = time.perf_counter() + duration
                done = [0]
                cpu0 = _cpu()

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
                counts.append((done[0], _cpu() - cpu0))
            return counts[0], counts[1]

    return trio.run(main)


def _sync(cfg: Any, data: _Data, duration: float, hashes: list[str]) -> tuple[Phase, Phase]:
    with blocknode.connect(cfg, timeout=30) as client:
        counts: list[Phase] = []
        for op in ("put", "get"):
            deadline = time.perf_counter() + duration
            done = [0] * CONCURRENCY
            cpu0 = _cpu()

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
            counts.append((sum(done), _cpu() - cpu0))
        return counts[0], counts[1]


def _asyncio(cfg: Any, data: _Data, duration: float, hashes: list[str], *,
             connect: Any = None) -> tuple[Phase, Phase]:
    async def main() -> tuple[Phase, Phase]:
        async with await (connect or blocknode.aio.connect)(cfg, timeout=30) as client:
            counts: list[Phase] = []
            for op in ("put", "get"):
                deadline = time.perf_counter() + duration
                done = [0]
                cpu0 = _cpu()

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
                counts.append((done[0], _cpu() - cpu0))
            return counts[0], counts[1]

    return asyncio.run(main())


class _GuestThread(ClientThread):
    """The measured alternative: the same Trio client as a *guest* of the asyncio loop
    (`trio.lowlevel.start_guest_run`), no thread of its own (its I/O waits still run
    in a Trio helper thread)."""

    def start(self, on_ready: Any) -> None:
        loop = asyncio.get_running_loop()
        self._on_ready = on_ready
        self.finished = loop.create_future()

        def done(result: Any) -> None:
            with self._lock:
                self._closed = True
            if not self.finished.done():
                self.finished.set_result(result)
            self._ready(result)

        trio.lowlevel.start_guest_run(
            self._main, run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            run_sync_soon_not_threadsafe=loop.call_soon, done_callback=done,
            host_uses_signal_set_wakeup_fd=True, restrict_keyboard_interrupt_to_checkpoints=True)

    def join(self, timeout: float | None = None) -> None:
        pass


class _GuestClient(blocknode.aio.Client):
    def _submit(self, loop: asyncio.AbstractEventLoop, fn: Any, args: tuple[Any, ...],
                pending: Any) -> Any:
        return self._t.submit(fn, args, pending.resolve)  # Trio runs in the loop's own thread

    async def close(self) -> None:
        self._t.close()
        await self._t.finished  # type: ignore[attr-defined]


async def _guest_connect(cfg: Any, timeout: float) -> _GuestClient:
    from blocknode.aio import _Pending

    loop = asyncio.get_running_loop()
    thread = _GuestThread(cfg, timeout=timeout)
    pending = _Pending(loop.create_future())
    thread.start(pending.resolve)
    await pending.fut
    assert pending.result is not None
    pending.result.unwrap()
    return _GuestClient(thread)


def _guest(cfg: Any, data: _Data, duration: float, hashes: list[str]) -> tuple[Phase, Phase]:
    return _asyncio(cfg, data, duration, hashes, connect=_guest_connect)


RUNNERS: dict[str, Callable[[Any, _Data, float, list[str]], tuple[Phase, Phase]]] = {
    "trio": _trio, "sync": _sync, "asyncio": _asyncio, "guest": _guest,
}


def run(*, duration: float = 2.0, rounds: int = 5, nodes: int = 1,
        sizes: tuple[int, ...] = SIZES, base_dir: str | None = None) -> list[dict[str, Any]]:
    """Every (size, op): per flavour the median ops/s and client CPU µs per op over
    `rounds`, and the median over rounds of its ops/s relative to Trio's in the same
    round (the flavours of a round run back to back: the ratio is paired in time)."""
    rows: list[dict[str, Any]] = []
    base = base_dir or tempfile.gettempdir()
    with running_cluster(base, nodes, min(nodes, 3), pure=False) as cluster:
        cfg = load_config(cluster.configs[0])
        for size in sizes:
            data = _Data(size)
            got: dict[tuple[str, str], list[Phase]] = {}
            for r in range(rounds):
                order = FLAVOURS[r % len(FLAVOURS):] + FLAVOURS[:r % len(FLAVOURS)]
                for flavour in order:
                    hashes: list[str] = []
                    put, get = RUNNERS[flavour](cfg, data, duration, hashes)
                    got.setdefault(("put", flavour), []).append(put)
                    got.setdefault(("get", flavour), []).append(get)
            for op in ("put", "get"):
                row: dict[str, Any] = {"size": size, "op": op}
                trio_ops = [n / duration for n, _ in got[(op, "trio")]]
                for flavour in FLAVOURS:
                    phases = got[(op, flavour)]
                    ops = [n / duration for n, _ in phases]
                    row[flavour] = statistics.median(ops)
                    row[f"{flavour}_cpu_us"] = statistics.median(
                        cpu / n * 1e6 for n, cpu in phases if n)
                    row[f"{flavour}_ratio"] = statistics.median(
                        o / t for o, t in zip(ops, trio_ops, strict=True) if t)
                    row[f"{flavour}_rounds"] = ops
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
    lines = ["| size | op | Trio | blocking (cost) | asyncio (cost) | asyncio guest mode, not shipped (cost) "
             "| target cost | client CPU µs/op: Trio / blocking / asyncio / guest |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        def cell(flavour: str, row: dict[str, Any] = row) -> str:
            return f"{row[flavour]:,.0f}/s ({(1 - row[f'{flavour}_ratio']) * 100:+.0f} %)"

        cpu = " / ".join(f"{row[f'{f}_cpu_us']:,.0f}" for f in FLAVOURS)
        lines.append(f"| {size_label(row['size'])} | {row['op']} | {row['trio']:,.0f}/s | {cell('sync')} | "
                     f"{cell('asyncio')} | {cell('guest')} | ≤ {TARGETS.get(row['size'], 0) * 100:.0f} % "
                     f"| {cpu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="blocking and asyncio clients vs the Trio client")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per phase (default 2)")
    p.add_argument("--rounds", type=int, default=5, help="turns of each flavour (default 5)")
    p.add_argument("--nodes", type=int, default=1, help="cluster nodes (default 1; rf = min(n, 3))")
    p.add_argument("--sizes", default=None, help="comma-separated bytes (default 4096,1048576)")
    p.add_argument("--json", metavar="PATH", help="also write the raw figures as JSON")
    args = p.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else SIZES
    t0 = time.time()
    load0 = os.getloadavg()
    rows = run(duration=args.duration, rounds=args.rounds, nodes=args.nodes, sizes=sizes)
    print(f"clients bench: {args.nodes} node(s), c={CONCURRENCY}, {args.rounds} rounds of "
          f"{args.duration:g}s per phase, {cpu_model()}, Python {sys.version.split()[0]} "
          f"({time.time() - t0:.0f}s); load average {load0[0]:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")
    print("cost = median over rounds of how much fewer ops/s than the Trio client in the same "
          "round (negative: more); ops/s are medians over rounds")
    print(render(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "cpu": cpu_model(), "nodes": args.nodes,
                       "duration": args.duration, "rounds": args.rounds}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
