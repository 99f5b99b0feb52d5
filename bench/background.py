"""Background work (issue 4): scrub speed against the machine's limit, and client latency
while scrub or resync runs.

    python -m bench.background [--quick] [--json PATH] [--results bench/RESULTS.md]

Real ``python -m blocknode serve`` processes on 127.0.0.1 (own process groups,
killed at the end whatever happens), configs and data in a temp dir.

1. **Scrub speed** (one node): fill it with 1 MiB blocks (files) and 4 KiB
   blocks (inline in LMDB). Nothing is dropped from the page cache: the scrub
   reads from the page cache, and so does the raw baseline, which reads the same
   block files in one Python thread (``open().read()`` + ``hashlib.blake2b``).
   Scrubs at tranquility 0 (twice, interleaved with the raw baseline), then 1
   and 3, started through the ``admin_scrub`` RPC and timed by the node itself
   (``last_completed - started``, ms) and by polling ``status`` every 10 ms.
   Throughput at tranquility T should be about 1/(T+1) of T=0's.
2. **Client latency under background work** (three nodes, rf 3, write quorum 2;
   clients talk to node1): put and get latency p50/p99 for 4 KiB and 1 MiB
   blocks at concurrency 8 (8 tasks, one connection each, in this process),
   (a) idle, (b) while every node scrubs at tranquility 2 (restarted whenever it
   completes), (c) while node3 catches up through resync at tranquility 2: before
   each measurement node3 is stopped, its block files deleted, restarted, and a
   ``repair`` queues every block, so node3 fetches them from node1/node2 during
   the whole window (the remaining queue is checked at the end).

`run(quick)` returns rows ``{"name", "value", "unit", ...}`` for the driver.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._report import write_section  # noqa: E402
from blocknode.client import open_client  # noqa: E402
from blocknode.config import load_config  # noqa: E402
from tests.cluster.harness import ServeProcesses, write_cluster  # noqa: E402

MIB = 1 << 20
KIB = 1 << 10
CONCURRENCY = 8
SECTION = "## Background work: scrub speed and client latency"


def _log(msg: str) -> None:
    print(f"[background {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _label(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def _blocks(n: int, size: int) -> list[bytes]:
    """`n` distinct blocks of `size` bytes (a random body with a distinct head)."""
    body = os.urandom(size)
    salt = os.urandom(8)
    return [salt + i.to_bytes(8, "little") + body[16:] for i in range(n)]


async def _fill(cfg: Any, blocks: list[bytes], conc: int = CONCURRENCY) -> list[bytes]:
    hashes: list[bytes] = []
    it = iter(blocks)

    async def worker() -> None:
        async with open_client(cfg, timeout=60) as c:
            for data in it:
                hashes.append(await c.put_block(data, "bg-fill"))

    async with trio.open_nursery() as n:
        for _ in range(conc):
            n.start_soon(worker)
    return hashes


def _block_files(data_dir: Path) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(data_dir):
        for f in files:
            if len(f) == 64 and "." not in f:
                out.append(os.path.join(dirpath, f))
    out.sort()
    return out


def raw_read_hash(paths: list[str], repeats: int = 3) -> tuple[float, float]:
    """MiB/s of open().read() + blake2b over `paths` in one thread: (median, spread)."""
    rates = []
    for _ in range(repeats):
        total = 0
        t0 = time.perf_counter()
        for p in paths:
            with open(p, "rb") as f:
                data = f.read()
            hashlib.blake2b(data).digest()
            total += len(data)
        rates.append(total / MIB / (time.perf_counter() - t0))
    med = statistics.median(rates)
    return med, (max(rates) - min(rates)) / med


async def _scrub(client: Any, **fields: Any) -> dict[str, Any]:
    st, _ = await client.call("admin_scrub", fields)
    return st


async def scrub_once(cfg: Any, tranquility: float, cap_s: float) -> dict[str, Any]:
    """Start a scrub and wait for it to complete (or `cap_s`); its duration and count."""
    async with open_client(cfg, timeout=30) as c:
        st = await _scrub(c, action="status")
        if st["state"] != "idle":
            await _scrub(c, action="cancel")
        t0 = time.perf_counter()
        st = await _scrub(c, action="start", tranquility=tranquility)
        completed = True
        while st["state"] == "running":
            if time.perf_counter() - t0 > cap_s:
                completed = False
                st = await _scrub(c, action="cancel")
                break
            await trio.sleep(0.01)
            st = await _scrub(c, action="status")
        wall = time.perf_counter() - t0
        server = (st["last_completed"] - st["started"]) / 1000 if completed else None
        return {"wall_s": wall, "server_s": server, "blocks": st["blocks_checked"],
                "completed": completed}


def part_scrub(root: Path, quick: bool) -> list[dict[str, Any]]:
    """Scrub speed vs the raw read + hash limit (see module docstring)."""
    n_big, n_small = (200, 500) if quick else (600, 2000)
    (cfg_path,) = write_cluster(root, 1, rf=1)
    cfg = load_config(cfg_path)
    procs = ServeProcesses([cfg_path])
    rows: list[dict[str, Any]] = []
    try:
        procs.start_all()
        big = _blocks(n_big, MIB)
        small = _blocks(n_small, 4 * KIB)
        _log("scrub part: filling")
        trio.run(_fill, cfg, big)
        trio.run(_fill, cfg, small)
        del big, small
        paths = _block_files(Path(cfg.data_dir))
        assert len(paths) == n_big, (len(paths), n_big)
        total_mib = (n_big * MIB + n_small * 4 * KIB) / MIB
        _log("scrub part: raw and scrub runs")
        raws, t0s = [], []
        for _ in range(2):
            raws.append(raw_read_hash(paths, repeats=2 if quick else 3)[0])
            t0s.append(trio.run(scrub_once, cfg, 0.0, 60.0))
        raw = statistics.median(raws)
        s0 = [r["server_s"] for r in t0s]
        rate0 = total_mib / statistics.median(s0)
        rows.append({"name": "raw read+blake2b (1 thread, page cache)", "value": raw, "unit": "MiB/s",
                     "runs": raws, "files": n_big})
        rows.append({"name": "scrub T=0", "value": rate0, "unit": "MiB/s",
                     "blocks_per_s": (n_big + n_small) / statistics.median(s0),
                     "runs_s": s0, "wall_s": [r["wall_s"] for r in t0s], "blocks": n_big + n_small,
                     "mib": total_mib, "ratio_to_raw": rate0 / raw, "target": 0.8})
        for t in (1.0, 3.0):
            r = trio.run(scrub_once, cfg, t, 30.0)
            if r["completed"]:
                rate = total_mib / r["server_s"]
            else:  # capped: blocks checked in the wall time (blocks are mixed uniformly)
                rate = total_mib * r["blocks"] / (n_big + n_small) / r["wall_s"]
            rows.append({"name": f"scrub T={t:g}", "value": rate, "unit": "MiB/s",
                         "seconds": r["server_s"] or r["wall_s"], "completed": r["completed"],
                         "ratio_to_T0": rate / rate0, "expected_ratio": 1 / (t + 1)})
    finally:
        procs.close()
    return rows


# ------------------------------------------------------------------ latency


def _pct(vals: list[float], q: float) -> float:
    s = sorted(vals)
    return s[min(len(s) - 1, max(0, int(round(q * len(s))) - 1))]


async def _load(cfg: Any, op: str, size: int, hashes: list[bytes], duration: float) -> dict[str, Any]:
    lat: list[float] = []
    errors: list[str] = []
    body = os.urandom(size)
    salt = os.urandom(8)
    counter = iter(range(10**9))
    perf = time.perf_counter
    async with trio.open_nursery() as nursery:
        clients = []
        for _ in range(CONCURRENCY):
            clients.append(await nursery.start(_hold_client, cfg))
        deadline = perf() + duration

        async def worker(w: int) -> None:
            c = clients[w]
            i = w * 7919
            while perf() < deadline:
                try:
                    if op == "put":
                        data = salt + next(counter).to_bytes(8, "little") + body[16:]
                        s = perf()
                        await c.put_block(data, "bg-load")
                    else:
                        h = hashes[i % len(hashes)]
                        i += 1
                        s = perf()
                        await c.get_block(h)
                    lat.append(perf() - s)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors.append(f"{type(exc).__name__}: {exc}")
                    if len(errors) > 20:
                        return

        async with trio.open_nursery() as workers:
            for w in range(CONCURRENCY):
                workers.start_soon(worker, w)
        nursery.cancel_scope.cancel()
    return {"n": len(lat), "p50_ms": _pct(lat, 0.5) * 1e3 if lat else None,
            "p99_ms": _pct(lat, 0.99) * 1e3 if lat else None,
            "ops_s": len(lat) / duration, "errors": len(errors), "error_sample": errors[:2]}


async def _hold_client(cfg: Any, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async with open_client(cfg, timeout=60) as c:
        task_status.started(c)
        await trio.sleep_forever()


async def _keep_scrubbing(cfgs: list[Any], tranquility: float, stop: trio.Event,
                          counts: dict[str, int]) -> None:
    """Keep a scrub running on every node until `stop` (restart it whenever it completes)."""
    async with trio.open_nursery() as n:
        for cfg in cfgs:
            async def one(cfg: Any = cfg) -> None:
                async with open_client(cfg, timeout=30) as c:
                    await _scrub(c, action="start", tranquility=tranquility)
                    last = 0
                    while not stop.is_set():
                        with trio.move_on_after(0.2):
                            await stop.wait()
                        st = await _scrub(c, action="status")
                        if st["state"] == "idle":
                            counts[cfg.node_id] = counts.get(cfg.node_id, 0) + last
                            st = await _scrub(c, action="start", tranquility=tranquility)
                            last = 0
                        else:
                            last = st["blocks_checked"]
                    counts[cfg.node_id] = counts.get(cfg.node_id, 0) + last
                    await _scrub(c, action="cancel")
            n.start_soon(one)


async def _measure(cfg: Any, op: str, size: int, hashes: list[bytes], duration: float,
                   scrub_cfgs: list[Any] | None) -> dict[str, Any]:
    if not scrub_cfgs:
        return await _load(cfg, op, size, hashes, duration)
    stop = trio.Event()
    counts: dict[str, int] = {}
    async with trio.open_nursery() as n:
        n.start_soon(_keep_scrubbing, scrub_cfgs, 2.0, stop, counts)
        await trio.sleep(0.3)  # let the scrubs get going
        res = await _load(cfg, op, size, hashes, duration)
        stop.set()
    res["scrubbed_blocks"] = sum(counts.values())
    return res


async def _status(cfg: Any) -> dict[str, Any]:
    async with open_client(cfg, timeout=30) as c:
        return await c.status()


async def _start_catch_up(cfgs: list[Any]) -> int:
    """node3 (restarted, files gone): set resync tranquility 2, start a repair; queue length."""
    cfg3 = cfgs[2]
    async with open_client(cfg3, timeout=30) as c:
        await c.call("admin_worker_set", {"name": "resync-tranquility", "value": 2.0})
        await c.call("admin_repair", {"action": "start", "rc": False})
        with trio.fail_after(20):
            while True:
                st, _ = await c.call("admin_repair", {"action": "status"})
                if st["state"] != "running":
                    break
                await trio.sleep(0.05)
        return (await c.status())["resync_queue"]


async def _peers_up(cfg: Any, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while True:
            st = await _status(cfg)
            if all(p["up"] for p in st["peers"]):
                return
            await trio.sleep(0.1)


def _wipe_node3(procs: ServeProcesses, cfgs: list[Any]) -> None:
    procs.kill(2)
    for p in _block_files(Path(cfgs[2].data_dir)):
        os.unlink(p)
    procs.start(2)
    procs.wait_ready(2)


def part_latency(root: Path, quick: bool) -> list[dict[str, Any]]:
    """put/get p50/p99 idle, during scrub (T=2) and during resync catch-up (T=2)."""
    n_big, n_small = (100, 300) if quick else (300, 1000)
    duration = {4 * KIB: 0.8 if quick else 3.0, MIB: 1.2 if quick else 4.0}
    paths = write_cluster(root, 3, rf=3, write_quorum=2, rpc_timeout=30.0)
    cfgs = [load_config(p) for p in paths]
    procs = ServeProcesses(paths)
    rows: list[dict[str, Any]] = []
    try:
        procs.start_all()
        trio.run(_peers_up, cfgs[0])
        _log("latency part: filling")
        hashes = {MIB: trio.run(_fill, cfgs[0], _blocks(n_big, MIB)),
                  4 * KIB: trio.run(_fill, cfgs[0], _blocks(n_small, 4 * KIB))}
        data1, data3 = Path(cfgs[0].data_dir), Path(cfgs[2].data_dir)
        for cond in ("idle", "scrub T=2", "resync T=2"):
            for size in (4 * KIB, MIB):
                for op in ("put", "get"):
                    extra: dict[str, Any] = {}
                    if cond == "resync T=2":
                        # Catch-up work left? (node3 short of >= 25 % of node1's files) else redo it.
                        if len(_block_files(data3)) > 0.75 * len(_block_files(data1)):
                            _wipe_node3(procs, cfgs)
                            trio.run(_peers_up, cfgs[0])
                            trio.run(_start_catch_up, cfgs)
                        extra["queue_before"] = trio.run(_status, cfgs[2])["resync_queue"]
                        extra["files_before"] = len(_block_files(data3))
                    _log(f"{cond}: {op} {_label(size)}")
                    res = trio.run(_measure, cfgs[0], op, size, hashes[size], duration[size],
                                   cfgs if cond == "scrub T=2" else None)
                    if cond == "resync T=2":
                        extra["queue_after"] = trio.run(_status, cfgs[2])["resync_queue"]
                        # New 1 MiB puts land on node3 too (rf 3): not fetched by resync.
                        new_files = res["n"] if (op, size) == ("put", MIB) else 0
                        extra["fetched_mib_s"] = (len(_block_files(data3)) - extra["files_before"]
                                                  - new_files) / duration[size]
                    rows.append({"name": f"{op} {_label(size)} c{CONCURRENCY} {cond}",
                                 "value": res["p99_ms"], "unit": "ms p99", "op": op,
                                 "size": size, "condition": cond, **res, **extra})
    finally:
        procs.close()
    idle = {(r["op"], r["size"]): r for r in rows if r["condition"] == "idle"}
    for r in rows:
        base = idle[(r["op"], r["size"])]
        if r["p99_ms"] and base["p99_ms"]:
            r["p99_vs_idle"] = r["p99_ms"] / base["p99_ms"]
            r["p50_vs_idle"] = r["p50_ms"] / base["p50_ms"]
    return rows


# ------------------------------------------------------------------ driver


def run(quick: bool = False, base_dir: str | None = None) -> list[dict[str, Any]]:
    """Both parts; rows with at least name, value, unit (and `part`)."""
    root = Path(tempfile.mkdtemp(prefix="bn-bg-", dir=base_dir))
    try:
        (root / "scrub").mkdir()
        (root / "lat").mkdir()
        rows = [{"part": "scrub", **r} for r in part_scrub(root / "scrub", quick)]
        rows += [{"part": "latency", **r} for r in part_latency(root / "lat", quick)]
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def environment() -> dict[str, Any]:
    """Date, cores, Python, fast path in use."""
    try:
        from blocknode import fastpath
        impl = fastpath.IMPLEMENTATION
    except Exception:  # noqa: BLE001
        impl = "?"
    return {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "nproc": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine(), "fastpath": impl}


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "—" if v is None else fmt.format(v)


def render(rows: list[dict[str, Any]], env: dict[str, Any], quick: bool) -> str:
    """The RESULTS.md tables (without the section heading)."""
    out = [f"`python -m bench.background{' --quick' if quick else ''}` — {env['date'][:10]}, "
           f"{env['nproc']} cores ({env['machine']}), Python {env['python']}, fast path "
           f"{env['fastpath']}.", ""]
    sc = {r["name"]: r for r in rows if r.get("part") == "scrub"}
    raw = sc["raw read+blake2b (1 thread, page cache)"]
    s0 = sc["scrub T=0"]
    out += [f"**Scrub speed**, one node, {raw['files']} blocks of 1 MiB (files) + "
            f"{s0['blocks'] - raw['files']} of 4 KiB (inline), {s0['mib']:.0f} MiB; page cache "
            "warm (nothing dropped) for the scrub and for the raw baseline alike. Scrub time "
            "from the node's own `started`/`last_completed`.", "",
            "| run | MiB/s | vs raw | vs T=0 | expected vs T=0 |", "|---|---|---|---|---|",
            f"| raw read + BLAKE2b, 1 thread (runs {', '.join(f'{v:.0f}' for v in raw['runs'])}) "
            f"| {raw['value']:.0f} | 1.00 | | |",
            f"| scrub T=0 (runs {', '.join(f'{v:.2f} s' for v in s0['runs_s'])}; "
            f"{s0['blocks_per_s']:.0f} blocks/s) | {s0['value']:.0f} | **{s0['ratio_to_raw']:.2f}** "
            "(target ≥ 0.80) | 1.00 | 1.00 |"]
    for t in ("1", "3"):
        r = sc[f"scrub T={t}"]
        out.append(f"| scrub T={t} ({r['seconds']:.2f} s{'' if r['completed'] else ', capped'}) "
                   f"| {r['value']:.0f} | {r['value'] / raw['value']:.2f} | "
                   f"**{r['ratio_to_T0']:.2f}** | {r['expected_ratio']:.2f} |")
    lat = [r for r in rows if r.get("part") == "latency"]
    out += ["", f"**Client latency under background work**: 3 nodes (rf 3, write quorum 2), "
            f"clients → node1, concurrency {CONCURRENCY}. Scrub: every node, T=2, restarted "
            "when done. Resync: node3's block files deleted, node3 restarted, `repair`, resync "
            "T=2 fetching from node1/node2 (queue length before → after the window).", "",
            "| op | size | condition | ops | ops/s | p50 ms | p99 ms | p50 × idle | p99 × idle "
            "(target ≤ 2) | background |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in lat:
        bg = ""
        if r["condition"].startswith("scrub"):
            bg = f"{r['scrubbed_blocks']} blocks scrubbed"
        elif r["condition"].startswith("resync"):
            bg = (f"node3 fetching {r['fetched_mib_s']:.0f} MiB/s; queue "
                  f"{r['queue_before']} → {r['queue_after']}")
        if r["errors"]:
            bg += f"; {r['errors']} errors"
        out.append(f"| {r['op']} | {_label(r['size'])} | {r['condition']} | {r['n']} | "
                   f"{r['ops_s']:.0f} | {_f(r['p50_ms'])} | {_f(r['p99_ms'])} | "
                   f"{_f(r.get('p50_vs_idle'), '{:.2f}')} | {_f(r.get('p99_vs_idle'), '{:.2f}')} "
                   f"| {bg} |")
    return "\n".join(out) + "\n"



def main(argv: list[str] | None = None) -> int:
    """Command-line entry (see module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.background")
    p.add_argument("--quick", action="store_true", help="fewer blocks, shorter windows (< 1 min)")
    p.add_argument("--json", metavar="PATH", help="write the rows and environment as JSON")
    p.add_argument("--results", metavar="PATH", help="write the tables into this RESULTS.md section")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    rows = run(args.quick)
    env = environment()
    text = render(rows, env, args.quick)
    print(text)
    print(f"(took {time.monotonic() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))
    if args.results:
        write_section(Path(args.results), SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
