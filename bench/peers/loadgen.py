"""The one load generator of the peer comparison: the same code drives blocknode and Swift.

    python -m bench.peers.loadgen --backend blocknode|swift-direct --opt K=V ... -c C
        --workload 4096:1000,1048576:200 [--reps R] [--get-rounds G] [--max-seconds S]
        [--pgids P,P,...] [--quiet-wait S]

Per rep and per size: a PUT phase of `count` distinct blocks (stopped after
`--max-seconds`), then a GET phase reading every key that was PUT `--get-rounds`
times, each round shuffled, each GET compared byte for byte with what was PUT.
Per phase: ops, ops/s, MiB/s of payload, p50/p99 latency of single operations at
concurrency C, errors, and CPU seconds of this process (the client), of the server
process groups `--pgids`, and of the rest of the machine (`bench.peers.sysstat`).
Before each phase it waits (at most `--quiet-wait` s) for the machine to go idle.
Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import struct
import sys
import threading
import time
from typing import Any

from bench.peers import sysstat
from bench.peers.backends import make_backend

MAX_COUNT = 20_000  # blocks per phase, whatever the workload says


def parse_workload(text: str) -> list[tuple[int, int]]:
    """'4096:1000,1048576:200' -> [(4096, 1000), (1048576, 200)]; a clear error otherwise."""
    out = []
    for part in text.split(","):
        try:
            size_s, count_s = part.split(":")
            size, count = int(size_s), int(count_s)
        except ValueError:
            raise ValueError(f"bad workload item {part!r}: want SIZE_BYTES:COUNT") from None
        if not (1 <= size <= 64 << 20) or not (1 <= count <= MAX_COUNT):
            raise ValueError(f"workload item {part!r} out of range (size 1..64 MiB, count 1..{MAX_COUNT})")
        out.append((size, count))
    return out


def make_payloads(size: int, count: int, nonce: int) -> list[bytes]:
    """`count` distinct blocks: a (nonce, index) header + a sliding window over one random buffer."""
    base = os.urandom(size + 65536)
    return [struct.pack("<QQ", nonce, i)[:size] + base[(i * 4099) % 65536 + 16:(i * 4099) % 65536 + size]
            for i in range(count)]


def pct(sorted_vals: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q * len(sorted_vals)) - 1))
    return sorted_vals[k]


class _Phase:
    def __init__(self) -> None:
        self.lat: list[float] = []
        self.errors = 0
        self.bad = 0
        self.first_error: str | None = None
        self.lock = threading.Lock()

    def error(self, e: BaseException) -> None:
        with self.lock:
            self.errors += 1
            if self.first_error is None:
                self.first_error = f"{type(e).__name__}: {e}"

    def summary(self, op: str, size: int, wall: float, cpu: dict[str, Any]) -> dict[str, Any]:
        lat = sorted(self.lat)
        n = len(lat)
        p50, p99 = pct(lat, 0.5), pct(lat, 0.99)
        return {"op": op, "size": size, "ops": n, "errors": self.errors, "bad_data": self.bad,
                "first_error": self.first_error, "wall_s": round(wall, 4),
                "ops_s": n / wall if wall else 0.0, "mib_s": n * size / (1 << 20) / wall if wall else 0.0,
                "p50_ms": p50 * 1e3 if p50 is not None else None,
                "p99_ms": p99 * 1e3 if p99 is not None else None, "cpu": cpu}


def _run_threads(backend: Any, op: str, size: int, items: list[tuple[int, Any, bytes | None]],
                 conc: int, max_s: float, pgids: list[int]) -> tuple[dict[str, Any], list[Any]]:
    ph = _Phase()
    keys: list[Any] = [None] * len(items)
    it = itertools.count()
    deadline = time.monotonic() + max_s

    def worker() -> None:
        fn = backend.put if op == "put" else backend.get
        lat = []
        while True:
            i = next(it)
            if i >= len(items) or time.monotonic() > deadline or ph.errors > 50:
                break
            idx, arg, expect = items[i]
            t0 = time.perf_counter()
            try:
                r = fn(arg)
            except Exception as e:  # noqa: BLE001 - counted and reported
                ph.error(e)
                continue
            lat.append(time.perf_counter() - t0)
            if op == "put":
                keys[idx] = r
            elif r != expect:
                with ph.lock:
                    ph.bad += 1
        with ph.lock:
            ph.lat.extend(lat)

    with sysstat.CpuWindow(pgids) as w:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(conc)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max_s + 120)
        wall = time.perf_counter() - t0
    return ph.summary(op, size, wall, w.result()), keys


def _run_trio(backend: Any, op: str, size: int, items: list[tuple[int, Any, bytes | None]],
              conc: int, max_s: float, pgids: list[int]) -> tuple[dict[str, Any], list[Any]]:
    import trio

    ph = _Phase()
    keys: list[Any] = [None] * len(items)
    it = itertools.count()

    async def worker() -> None:
        fn = backend.put if op == "put" else backend.get
        while ph.errors <= 50:
            i = next(it)
            if i >= len(items):
                return
            idx, arg, expect = items[i]
            t0 = time.perf_counter()
            try:
                r = await fn(arg)
            except Exception as e:  # noqa: BLE001 - counted and reported
                ph.error(e)
                continue
            ph.lat.append(time.perf_counter() - t0)
            if op == "put":
                keys[idx] = r
            elif r != expect:
                ph.bad += 1

    result: dict[str, Any] = {}

    async def main() -> None:
        with sysstat.CpuWindow(pgids) as w:
            t0 = time.perf_counter()
            with trio.move_on_after(max_s):
                async with trio.open_nursery() as nursery:
                    for _ in range(conc):
                        nursery.start_soon(worker)
            result["wall"] = time.perf_counter() - t0
        result["cpu"] = w.result()

    backend.trio_run(main)
    return ph.summary(op, size, result["wall"], result["cpu"]), keys


def run(backend: Any, workload: list[tuple[int, int]], conc: int, *, reps: int, get_rounds: int,
        max_s: float, pgids: list[int], quiet_wait: float) -> list[dict[str, Any]]:
    """Every phase of every rep (see the module docstring)."""
    phase = _run_trio if getattr(backend, "is_async", False) else _run_threads
    rng = random.Random(12345)
    warm = make_payloads(4096, 20, 0xFFFF)
    _, wkeys = phase(backend, "put", 4096, [(i, p, None) for i, p in enumerate(warm)], min(conc, 8), 60, [])
    phase(backend, "get", 4096, [(i, k, warm[i]) for i, k in enumerate(wkeys) if k is not None],
          min(conc, 8), 60, [])
    runs = []
    for rep in range(reps):
        for size, count in workload:
            payloads = make_payloads(size, count, random.getrandbits(63))
            q = sysstat.wait_quiet(quiet_wait, exclude_pgids=pgids) if quiet_wait > 0 else None
            put, keys = phase(backend, "put", size, [(i, p, None) for i, p in enumerate(payloads)],
                              conc, max_s, pgids)
            put["quiet"] = q
            order: list[int] = []
            for _ in range(max(1, get_rounds)):
                o = [i for i, k in enumerate(keys) if k is not None]
                rng.shuffle(o)
                order += o
            q = sysstat.wait_quiet(quiet_wait, exclude_pgids=pgids) if quiet_wait > 0 else None
            get, _ = phase(backend, "get", size, [(i, keys[i], payloads[i]) for i in order],
                           conc, max_s, pgids)
            get["quiet"] = q
            for r in (put, get):
                r["rep"] = rep + 1
                runs.append(r)
                print(f"#   rep {r['rep']} {size:>8} B {r['op']} c{conc}: {r['ops']} ops "
                      f"{r['ops_s']:8.1f}/s {r['mib_s']:7.1f} MiB/s err {r['errors']} bad {r['bad_data']}",
                      file=sys.stderr, flush=True)
            del payloads
    return runs


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.peers.loadgen", description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, choices=("blocknode", "swift-direct"))
    p.add_argument("--opt", action="append", default=[], help="backend option KEY=VALUE")
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("--workload", default="4096:1000,1048576:200")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--get-rounds", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=20.0)
    p.add_argument("--pgids", default="", help="comma-separated server process groups")
    p.add_argument("--quiet-wait", type=float, default=10.0)
    a = p.parse_args(argv)
    if not 1 <= a.concurrency <= 256:
        p.error("--concurrency must be 1..256")
    if not 0 < a.max_seconds <= 300:
        p.error("--max-seconds must be in (0, 300]")
    opts = dict(kv.split("=", 1) for kv in a.opt)
    backend = make_backend(a.backend, opts)
    pgids = [int(x) for x in a.pgids.split(",") if x]
    try:
        runs = run(backend, parse_workload(a.workload), a.concurrency, reps=min(a.reps, 10),
                   get_rounds=min(a.get_rounds, 10), max_s=a.max_seconds, pgids=pgids,
                   quiet_wait=a.quiet_wait)
    finally:
        backend.close()
    json.dump({"backend": a.backend, "describe": backend.describe(), "concurrency": a.concurrency,
               "runs": runs}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
