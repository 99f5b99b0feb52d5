"""Direct path and group commit across clients (issue 15 items 2 and 3), before/after interleaved.

    python -m bench.direct [--reps 3] [--duration 3] [--parts direct,group] [--json PATH]

3-node clusters of real `serve` processes on 127.0.0.1 (replication 3,
write quorum 2), one per `group_commit_rounds` value compared (`--rounds`,
default 0 = off and the default).

- **direct**: 1 MiB puts then gets at c=8 (`--conc`; one load generator
  process, up to 4 connections to node1..3) on the default cluster, with the
  client's direct path on and off (`--no-direct`), alternated, `reps` times.
- **group**: 4 KiB puts at c=8 and c=64 over as many distinct connections
  (two load generator processes), on each cluster in turn, `reps` times.

Per run: MiB/s or ops/s (median of the windows, `bench.macro`), p50/p99, and
server CPU per op: the three servers' CPU seconds over exactly that phase
(sampled every 20 ms, interpolated at the phase's start and end) divided by
the ops done; the client's CPU per op likewise. The load average before and
after each run is printed with it: other work on the machine shows there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import trio

from bench import macro
from blocknode.group_commit import DEFAULT_ROUNDS

MIB = 1 << 20
KIB = 1 << 10


@contextmanager
def cluster(base: str, extra: str) -> Iterator[macro.Cluster]:
    """A 3-node cluster (rf 3) with `extra` appended to every node's config."""
    root = Path(tempfile.mkdtemp(prefix="bench-direct-", dir=base))
    cl = macro.Cluster(root, macro.write_cluster(root, 3, 3))
    for cfg in cl.configs:
        cfg.write_text(cfg.read_text() + extra)
    env = {**os.environ, "PYTHONPATH": macro.REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("BLOCKNODE_PURE", None)
    try:
        for i, cfg in enumerate(cl.configs, 1):
            with open(root / f"node{i}.log", "wb") as log:
                cl.procs.append(subprocess.Popen(
                    [macro.PY, "-m", "blocknode", "serve", "--config", str(cfg)],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(root),
                    start_new_session=True))
        trio.run(macro._wait_ready, cl, 30.0)
        yield cl
    finally:
        macro._stop(cl.procs)
        shutil.rmtree(root, ignore_errors=True)


class CpuSampler:
    """The servers' total CPU seconds, sampled every 20 ms in a thread."""

    def __init__(self, cl: macro.Cluster) -> None:
        self.cl = cl
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), sum(self.cl.cpu_seconds())))
            self._stop.wait(0.02)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t: float) -> float:
        """CPU seconds at time `t` (linear between the samples around it)."""
        s = self.samples
        for (t0, c0), (t1, c1) in zip(s, s[1:], strict=False):
            if t0 <= t <= t1:
                return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)
        return s[-1][1] if t > s[-1][0] else s[0][1]


def run(cl: macro.Cluster, size: int, conc: int, conns: int, procs: int, duration: float,
        flags: list[str]) -> dict[str, Any]:
    """One load run; per phase: rate, latency, server and client CPU per op."""
    start_at = time.time() + 0.8 + 0.3 * procs
    per = [conc // procs + (1 if i < conc % procs else 0) for i in range(procs)]
    per_conns = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    load0 = os.getloadavg()[0]
    gens = [subprocess.Popen(
        [macro.PY, "-m", "bench._loadgen", "--config", ",".join(map(str, cl.configs)),
         "--size", str(size), "--concurrency", str(c), "--conns", str(k),
         "--duration", str(duration), "--proc", str(i), "--start-at", str(start_at), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=macro.REPO,
        env={**os.environ, "PYTHONPATH": macro.REPO}, start_new_session=True)
        for i, (c, k) in enumerate(zip(per, per_conns, strict=True))]
    results = []
    with CpuSampler(cl) as cpu:
        try:
            for g in gens:
                out, err = g.communicate(timeout=4 * duration + 90)
                if g.returncode != 0:
                    raise RuntimeError(f"load generator failed:\n{err.decode()[-3000:]}")
                results.append(json.loads(out))
        finally:
            macro._stop(gens)
    row: dict[str, Any] = {"load_before": load0, "load_after": os.getloadavg()[0]}
    direct = [r["direct"] for r in results if "direct" in r]
    if direct:
        row["direct"] = {k: sum(d[k] for d in direct) for k in direct[0]}
    for op in ("put", "get"):
        phases = [r[op] for r in results if op in r]
        if not phases:
            continue
        t0 = min(p["start"] for p in phases)
        t1 = max(p["start"] + p["wall"] for p in phases)
        s = macro._summarise(phases, size)
        ops = max(1, s["ops"])
        s["server_ms_op"] = (cpu.at(t1) - cpu.at(t0)) * 1e3 / ops
        s["client_ms_op"] = sum(p["cpu"] for p in phases) * 1e3 / ops
        row[op] = s
    return row


def _fmt(label: str, row: dict[str, Any], size: int) -> str:
    parts = [f"{label:<24}"]
    for op in ("put", "get"):
        if op in row:
            f = row[op]
            rate = f"{f['mib_s']:7.1f} MiB/s" if size >= MIB else f"{f['ops_s']:7.0f} ops/s"
            parts.append(f"{op} {rate} p50 {f['p50_ms']:6.1f} p99 {f['p99_ms']:6.1f} ms "
                         f"srv {f['server_ms_op']:6.2f} cli {f['client_ms_op']:5.2f} ms/op "
                         f"err {f['errors']}")
    if "direct" in row:
        d = row["direct"]
        parts.append(f"direct put/get {d['puts']}/{d['gets']} fallbacks "
                     f"{d['put_fallbacks']}/{d['get_fallbacks']}")
    parts.append(f"load {row['load_before']:.1f}->{row['load_after']:.1f}")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (see module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.direct", description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--parts", default="direct,group")
    p.add_argument("--conc", type=int, default=8, help="concurrency of the 1 MiB runs")
    p.add_argument("--rounds", default="0,2",
                   help="group_commit_rounds values compared (0: off), one cluster each")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    base = tempfile.gettempdir()
    rows: list[dict[str, Any]] = []

    def record(part: str, mode: str, rep: int, size: int, conc: int, row: dict[str, Any]) -> None:
        row |= {"part": part, "mode": mode, "rep": rep, "size": size, "concurrency": conc}
        rows.append(row)
        print(_fmt(f"{part} {mode} c{conc} #{rep}", row, size), flush=True)

    rounds = [int(r) for r in args.rounds.split(",")]
    with ExitStack() as stack:
        clusters = {r: stack.enter_context(cluster(base, f"group_commit_rounds = {r}\n"))
                    for r in dict.fromkeys([DEFAULT_ROUNDS, *rounds])}
        time.sleep(3)  # each node's admin key reaches the others (the direct path needs it)
        run(clusters[DEFAULT_ROUNDS], MIB, 2, 2, 1, 0.5, [])  # warm-up
        for rep in range(1, args.reps + 1):
            if "direct" in parts:
                for mode, flags in (("direct", []), ("via-node", ["--no-direct"])):
                    record("1MiB", mode, rep, MIB, args.conc,
                           run(clusters[DEFAULT_ROUNDS], MIB, args.conc, min(args.conc, 4), 1,
                               args.duration, flags))
            if "group" in parts:
                for conc in (8, 64):
                    for r in rounds:
                        record("4KiB-put", f"rounds={r}", rep, 4 * KIB, conc,
                               run(clusters[r], 4 * KIB, conc, conc, 2, args.duration,
                                   ["--no-get"]))
    print("\nmedians over reps:")
    keys = sorted({(r["part"], r["mode"], r["concurrency"]) for r in rows})
    for part, mode, conc in keys:
        sel = [r for r in rows if (r["part"], r["mode"], r["concurrency"]) == (part, mode, conc)]
        line = [f"{part} {mode} c{conc}:"]
        for op in ("put", "get"):
            if op in sel[0]:
                key = "mib_s" if sel[0]["size"] >= MIB else "ops_s"
                line.append(f"{op} {statistics.median(r[op][key] for r in sel):.1f} "
                            f"{'MiB/s' if key == 'mib_s' else 'ops/s'}, server "
                            f"{statistics.median(r[op]['server_ms_op'] for r in sel):.2f} ms/op, "
                            f"client {statistics.median(r[op]['client_ms_op'] for r in sel):.2f} ms/op")
        print(" ".join(line))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
