"""Layout migration (issue 12): how long a 3→4 node migration of N blocks takes, and how
much it slows foreground puts and gets while it runs.

    python -m bench.layout_migration [--blocks N] [--size BYTES] [--tranquility T]
                                     [--results bench/RESULTS.md]

Real ``python -m blocknode serve`` processes on 127.0.0.1 (killed at the end),
rf 3, write quorum 2, in a temp dir. Three nodes are filled with N blocks; then
4 KiB put and get latency is measured idle (concurrency 8, clients → node2);
then node4 is started and added (`layout assign` + `layout apply`), and the
same load runs until the old version retired (every node of the new version
synced it) — the migration time is apply → retirement, seen by polling
`layout show` on node1. The old copies' GC (after `gc_delay`) is not timed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from blocknode.client import open_client  # noqa: E402
from blocknode.config import load_config  # noqa: E402
from tests.cluster.harness import ServeProcesses, write_cluster  # noqa: E402

SECTION = "## Layout migration: 3 → 4 nodes"
CONCURRENCY = 8


def _cli(config: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "blocknode", *args, "--config", str(config)],
                       capture_output=True, timeout=60)
    if r.returncode:
        raise RuntimeError(r.stderr.decode())
    return r.stdout.decode()


async def _fill(cfg: Any, n: int, size: int) -> None:
    async with open_client(cfg, timeout=60) as c:
        async def worker(k: int) -> None:
            for i in range(k, n, CONCURRENCY):
                await c.put_block(os.urandom(size), f"fill-{i}")
        async with trio.open_nursery() as nursery:
            for k in range(CONCURRENCY):
                nursery.start_soon(worker, k)


async def _load(cfg: Any, until: Any, *, min_s: float = 3.0) -> dict[str, list[float]]:
    """4 KiB puts then gets of what was put, at CONCURRENCY, until `until()` (at least `min_s`)."""
    lat: dict[str, list[float]] = {"put": [], "get": []}
    start = time.monotonic()

    def done() -> bool:
        return time.monotonic() - start >= min_s and until()

    async with open_client(cfg, timeout=60) as c:
        async def worker(k: int) -> None:
            i = 0
            while not done():
                data = os.urandom(4096)
                t = time.perf_counter()
                h = await c.put_block(data, f"load-{k}-{i}")
                lat["put"].append(time.perf_counter() - t)
                t = time.perf_counter()
                assert await c.get_block(h) == data
                lat["get"].append(time.perf_counter() - t)
                i += 1
        async with trio.open_nursery() as nursery:
            for k in range(CONCURRENCY):
                nursery.start_soon(worker, k)
    return lat


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")


def run(blocks: int, size: int, tranquility: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        configs = write_cluster(root, 4, rf=3, gc_delay=5.0, anti_entropy_interval=3600.0,
                                resync_tranquility=tranquility, rpc_timeout=30.0)
        text = (root / "cluster.toml").read_text()
        (root / "cluster.toml").write_text(
            re.sub(r'\[\[nodes\]\]\nid = "node4"\n[^\[]*', "", text))
        cfgs = [load_config(p) for p in configs]
        procs = ServeProcesses(configs)
        try:
            for i in range(3):
                procs.start(i)
            for i in range(3):
                procs.wait_ready(i)
            t = time.monotonic()
            trio.run(_fill, cfgs[1], blocks, size)
            fill_s = time.monotonic() - t
            idle = trio.run(lambda: _load(cfgs[1], lambda: True, min_s=5.0))
            before = json.loads(_cli(configs[0], "status", "--json"))["blocks"]
            procs.start(3)  # started first, as an operator does; it holds nothing yet
            procs.wait_ready(3)
            _cli(configs[0], "layout", "assign", "node4", "--zone", "z4", "--capacity", "1",
                 "--addr", cfgs[3].rpc_bind_addr)
            t0 = time.monotonic()
            _cli(configs[0], "layout", "apply", "--version", "2")
            state: dict[str, float | None] = {"done": None}

            def poll() -> None:
                while True:
                    shown = json.loads(_cli(configs[0], "layout", "show", "--json"))
                    print(f"{time.monotonic() - t0:6.1f} s  waiting for {shown['pending_sync']}",
                          file=sys.stderr)
                    if shown["live_versions"] == [2]:
                        state["done"] = time.monotonic()
                        return
                    time.sleep(0.2)

            async def migrate() -> dict[str, list[float]]:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.to_thread.run_sync, poll)
                    return await _load(cfgs[1], lambda: state["done"] is not None, min_s=1.0)

            during = trio.run(migrate)
            if os.environ.get("BENCH_LOGS"):
                for i in range(4):
                    print((configs[i].parent / "serve.log").read_text()[-6000:], file=sys.stderr)
            migration_s = (state["done"] or time.monotonic()) - t0
            st = json.loads(_cli(configs[3], "status", "--json"))
            return {"blocks": blocks, "size": size, "tranquility": tranquility,
                    "fill_s": fill_s, "migration_s": migration_s,
                    "node4_blocks": st["blocks"], "idle": idle, "during": during,
                    "blocks_before": before}
        finally:
            procs.close()


def report(r: dict[str, Any]) -> str:
    mib = r["blocks"] * r["size"] / (1 << 20)
    lines = [
        SECTION, "",
        f"`python -m bench.layout_migration --blocks {r['blocks']} --size {r['size']} "
        f"--tranquility {r['tranquility']:g}` — {_dt.date.today()}, {os.cpu_count()} cores "
        f"({platform.machine()}), Python {platform.python_version()}. 3 nodes (rf 3, write "
        f"quorum 2) hold {r['blocks']} blocks of {r['size'] // 1024} KiB ({mib:.0f} MiB); "
        "node4 is started, assigned and applied (version 2); the migration runs from "
        "`layout apply` until version 1 retired (every node of version 2 synced). "
        "Foreground: 4 KiB put then get, concurrency 8, clients → node2.",
        "",
        f"**Migration**: {r['migration_s']:.1f} s; the cluster held {r['blocks_before']} "
        f"blocks at `apply` (the {r['blocks']} filled + the idle measurement's 4 KiB ones); "
        f"node4 holds 3/4 of the partitions, so about {r['blocks_before'] * 3 // 4} of them "
        f"were fetched by its resync (one worker, tranquility {r['tranquility']:g}), about "
        f"{r['blocks_before'] * 3 / 4 / max(r['migration_s'], 1e-9):.0f} blocks/s; it ended "
        f"with {r['node4_blocks']} blocks, the rest written to it directly by the puts during "
        "the migration.",
        "",
        "| op | condition | ops | p50 ms | p99 ms | p50 × idle | p99 × idle |",
        "|---|---|---|---|---|---|---|",
    ]
    for op in ("put", "get"):
        i50, i99 = _pct(r["idle"][op], 0.5), _pct(r["idle"][op], 0.99)
        for cond, lat in (("idle", r["idle"][op]), ("migrating", r["during"][op])):
            p50, p99 = _pct(lat, 0.5), _pct(lat, 0.99)
            lines.append(f"| {op} 4 KiB | {cond} | {len(lat)} | {p50:.1f} | {p99:.1f} | "
                         f"{p50 / i50:.2f} | {p99 / i99:.2f} |")
    lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=2000)
    p.add_argument("--size", type=int, default=64 * 1024)
    p.add_argument("--tranquility", type=float, default=2.0)
    p.add_argument("--results", type=Path, default=None,
                   help="replace (or append) this section of a RESULTS.md")
    args = p.parse_args()
    r = run(args.blocks, args.size, args.tranquility)
    text = report(r)
    print(text)
    print(json.dumps({"migration_s": r["migration_s"], "idle_put_p99_ms": _pct(r["idle"]["put"], .99),
                      "migrating_put_p99_ms": _pct(r["during"]["put"], .99),
                      "idle_get_p99_ms": _pct(r["idle"]["get"], .99),
                      "migrating_get_p99_ms": _pct(r["during"]["get"], .99),
                      "mean_put_ms": statistics.mean(r["during"]["put"]) * 1000}))
    if args.results is not None:
        old = args.results.read_text() if args.results.exists() else ""
        if SECTION in old:
            head, _, rest = old.partition(SECTION)
            nxt = rest.find("\n## ")
            old = head + text + (rest[nxt + 1:] if nxt >= 0 else "")
        else:
            old = old.rstrip("\n") + "\n\n" + text
        args.results.write_text(old)


if __name__ == "__main__":
    main()
