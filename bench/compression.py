"""Compression (issue 14): put/get throughput, server CPU per MiB and space saved,
with `compression_level` "none", 1 and 3, on compressible and incompressible data.

    python -m bench.compression [--quick] [--blocks N] [--json PATH] [--results bench/RESULTS.md]

For each (data, level) cell a fresh real ``python -m blocknode serve`` process
(one node, rf 1, 1 MiB blocks, default durability: fsync on) is filled with N
distinct 1 MiB blocks by 4 client tasks (one connection each, in this process),
then every block is read back by 4 tasks (after a warm-up of 8 random blocks,
put and read, not counted). Per phase: MiB/s of plaintext, and
the server process's CPU time (user + system, from /proc) per MiB of
plaintext. Space: the bytes the node's data directory holds (`status`,
``data_dirs``) against the plaintext. The data:

- **text**: distinct 1 MiB windows of the Python standard library's source
  (real text, ~4x compressible at level 1);
- **random**: `os.urandom` (incompressible: stored plain whatever the level, so
  the cost of trying is what shows).

A first table measures zstd alone in this process (one thread, 1 MiB blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import zstandard

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._report import cpu_model, write_section  # noqa: E402
from blocknode.client import open_client  # noqa: E402
from blocknode.config import load_config  # noqa: E402
from tests.cluster.harness import ServeProcesses, write_cluster  # noqa: E402

MIB = 1 << 20
TASKS = 4
LEVELS: list[int | None] = [None, 1, 3]
SECTION = "## Compression: throughput, CPU and space"


def text_corpus(size: int) -> bytes:
    """At least `size` bytes of real text: the standard library's Python sources."""
    out: list[bytes] = []
    got = 0
    root = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(root.rglob("*.py")):
        try:
            b = p.read_bytes()
        except OSError:
            continue
        out.append(b)
        got += len(b)
        if got >= size:
            break
    data = b"".join(out)
    while len(data) < size:
        data += data
    return data


def make_blocks(kind: str, n: int) -> list[bytes]:
    """`n` distinct 1 MiB blocks of `kind` ("text" or "random")."""
    if kind == "random":
        return [os.urandom(MIB) for _ in range(n)]
    step = 256 * 1024
    corpus = text_corpus(MIB + step * n)
    return [corpus[i * step:i * step + MIB] for i in range(n)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def zstd_alone(blocks_by_kind: dict[str, list[bytes]]) -> list[dict[str, Any]]:
    """Compress and decompress speed of zstd itself, one thread (CPU time, best of 3)."""
    rows = []
    d = zstandard.ZstdDecompressor()
    for kind, blocks in blocks_by_kind.items():
        sample = blocks[:8]
        for level in (1, 3):
            c = zstandard.ZstdCompressor(level=level)
            ct = dt = float("inf")
            for _ in range(3):
                t = time.process_time()
                frames = [c.compress(b) for b in sample]
                ct = min(ct, time.process_time() - t)
                t = time.process_time()
                for f in frames:
                    d.decompress(f)
                dt = min(dt, time.process_time() - t)
            rows.append({"data": kind, "level": level,
                         "ratio": sum(map(len, sample)) / sum(map(len, frames)),
                         "compress_mib_s": len(sample) / ct, "decompress_mib_s": len(sample) / dt})
    return rows


async def _phase(cfg_path: Path, pid: int, blocks: list[bytes], hashes: list[str] | None
                 ) -> tuple[float, float, list[str]]:
    """Put `blocks` (hashes None) or get `hashes`; returns (seconds, server CPU s, hashes)."""
    cfg = load_config(cfg_path)
    out: list[str] = [""] * len(blocks)
    todo = list(range(len(blocks)))

    async def worker() -> None:
        async with open_client(cfg, timeout=60) as c:
            while todo:
                i = todo.pop()
                if hashes is None:
                    out[i] = await c.put(blocks[i], "bench")
                else:
                    got = await c.get(hashes[i])
                    assert len(got) == len(blocks[i])
                    out[i] = hashes[i]

    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(TASKS):
            nursery.start_soon(worker)
    return time.perf_counter() - t0, cpu_seconds(pid) - cpu0, out


async def _status(cfg_path: Path) -> dict[str, Any]:
    async with open_client(load_config(cfg_path), timeout=30) as c:
        return await c.status()


def run_cell(root: Path, kind: str, level: int | None, blocks: list[bytes]) -> dict[str, Any]:
    """One fresh node at `level`, filled with `blocks` then read back."""
    cell = root / f"{kind}-{level}"
    cell.mkdir()
    (cfg,) = write_cluster(cell, 1, rf=1, block_size=MIB, data_fsync=True, metadata_fsync=True,
                           rpc_timeout=60.0, lmdb_map_size=1 << 30)
    cfg.write_text(cfg.read_text() + f"compression_level = {json.dumps(level or 'none')}\n")
    procs = ServeProcesses([cfg])
    try:
        procs.start_all()
        pid = procs.procs[0].pid
        warm = [os.urandom(MIB) for _ in range(2 * TASKS)]  # connections, imports, caches
        _, _, wh = trio.run(_phase, cfg, pid, warm, None)
        trio.run(_phase, cfg, pid, warm, wh)
        put_s, put_cpu, hashes = trio.run(_phase, cfg, pid, blocks, None)
        get_s, get_cpu, _ = trio.run(_phase, cfg, pid, blocks, hashes)
        st = trio.run(_status, cfg)
    finally:
        procs.close()
    mib = len(blocks) * MIB / MIB
    stored = sum(d["bytes"] for d in st["data_dirs"]) - len(warm) * MIB
    return {"data": kind, "level": level, "blocks": len(blocks),
            "put_mib_s": mib / put_s, "put_cpu_ms_per_mib": 1000 * put_cpu / mib,
            "get_mib_s": mib / get_s, "get_cpu_ms_per_mib": 1000 * get_cpu / mib,
            "stored_mib": stored / MIB, "saved": 1 - stored / (len(blocks) * MIB)}


def run(n: int, repeat: int = 1) -> dict[str, Any]:
    """Every cell (see module docstring), `repeat` times interleaved; the median of each figure."""
    blocks = {"text": make_blocks("text", n), "random": make_blocks("random", n)}
    runs: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        for r in range(repeat):
            for kind in ("text", "random"):
                for level in LEVELS:
                    root = Path(tmp) / f"run{r}"
                    root.mkdir(exist_ok=True)
                    runs.setdefault((kind, level), []).append(
                        run_cell(root, kind, level, blocks[kind]))
                    print(f"  run {r + 1}/{repeat}: {kind:<6} level {level or 'none':<4} done",
                          file=sys.stderr, flush=True)
    rows = []
    for (kind, level), cells in runs.items():
        row: dict[str, Any] = {"data": kind, "level": level, "blocks": n, "runs": len(cells)}
        for k in cells[0]:
            if k not in row:
                row[k] = statistics.median(c[k] for c in cells)
        rows.append(row)
    return {"zstd": zstd_alone(blocks), "cells": rows, "load": os.getloadavg()}



def render(res: dict[str, Any]) -> str:
    """The tables, as Markdown."""
    cells = res["cells"]
    n = cells[0]["blocks"] if cells else 0
    runs = cells[0].get("runs", 1) if cells else 0
    load = ", ".join(f"{x:.1f}" for x in res.get("load", ()))
    out = [f"`python -m bench.compression --blocks {n} --repeat {runs}`: CPU {cpu_model()}, "
           f"{os.cpu_count()} cores, zstandard {zstandard.__version__}, load average at the end "
           f"{load}. One node (real `serve` process, fsync on), {n} distinct 1 MiB blocks per "
           f"cell, {TASKS} client tasks; each figure is the median of {runs} runs. CPU is the "
           "server process's (user + system) per MiB of plaintext; the client shares the "
           "cores, so MiB/s moves with the machine's load much more than CPU/MiB does.", "",
           "| data | level | put MiB/s | put CPU ms/MiB | get MiB/s | get CPU ms/MiB | stored MiB | space saved |",
           "|---|---|---|---|---|---|---|---|"]
    for r in cells:
        out.append(f"| {r['data']} | {r['level'] if r['level'] is not None else 'none'} | "
                   f"{r['put_mib_s']:.0f} | {r['put_cpu_ms_per_mib']:.1f} | {r['get_mib_s']:.0f} | "
                   f"{r['get_cpu_ms_per_mib']:.1f} | {r['stored_mib']:.1f} | {r['saved'] * 100:.0f} % |")
    out += ["", "zstd alone (this process, one thread, 1 MiB blocks, CPU time, best of 3):", "",
            "| data | level | ratio | compress MiB/s | decompress MiB/s |", "|---|---|---|---|---|"]
    for r in res["zstd"]:
        out.append(f"| {r['data']} | {r['level']} | {r['ratio']:.2f} | {r['compress_mib_s']:.0f} | "
                   f"{r['decompress_mib_s']:.0f} |")
    return "\n".join(out) + "\n"



def main(argv: list[str] | None = None) -> int:
    """Command-line entry (see module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.compression")
    p.add_argument("--quick", action="store_true", help="16 blocks per cell instead of 64")
    p.add_argument("--blocks", type=int, default=None, help="blocks per cell")
    p.add_argument("--repeat", type=int, default=1, help="runs of every cell (median reported)")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--results", metavar="PATH", help="write the tables into this RESULTS.md section")
    args = p.parse_args(argv)
    n = args.blocks or (16 if args.quick else 64)
    t0 = time.monotonic()
    res = run(n, args.repeat)
    text = render(res)
    print(text)
    print(f"(took {time.monotonic() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.results:
        write_section(Path(args.results), SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
