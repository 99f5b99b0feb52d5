"""Macro-benchmark: real `python -m blocknode serve` clusters on loopback, driven by clients.

    python -m bench.macro [--quick] [--duration S] [--json PATH]

For each fast-path implementation (compiled, then ``BLOCKNODE_PURE=1`` in the
servers' environment) and each cluster (1 node; 3 nodes, replication 3,
write quorum 2), the servers are started as separate processes (own process
group, killed at the end whatever happens), and for every block size
(4 KiB, 64 KiB, 1 MiB) and concurrency (1, 8, 64) load generator processes
(`bench._loadgen`) put distinct blocks for `duration` seconds, then read them
back for `duration` seconds. Figures per cell: ops/s and MiB/s (median of
`WINDOWS` equal time windows of the phase, with their spread), latency p50 and
p99 over every op, the client processes' CPU share, and each node's peak RSS
(VmHWM) so far.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

MIB = 1 << 20
KIB = 1 << 10
SIZES = (4 * KIB, 64 * KIB, MIB)
CONCURRENCY = (1, 8, 64)
WINDOWS = 5
PY = sys.executable
REPO = str(Path(__file__).resolve().parent.parent)


def size_label(size: int) -> str:
    """'4 KiB', '1 MiB'."""
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_cluster(root: Path, nodes: int, rf: int) -> list[Path]:
    """Configs for `nodes` local nodes on free ports (like `init-cluster`)."""
    ports = _free_ports(nodes)
    lines = [f"replication_factor = {rf}", ""]
    for i, port in enumerate(ports, 1):
        lines += ["[[nodes]]", f'id = "node{i}"', f'addr = "127.0.0.1:{port}"',
                  f'zone = "zone{i}"', "capacity = 1", ""]
    (root / "cluster.toml").write_text("\n".join(lines))
    fd = os.open(root / "rpc_secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    paths = []
    for i, port in enumerate(ports, 1):
        d = root / f"node{i}"
        d.mkdir()
        cfg = d / "config.toml"
        cfg.write_text(
            f'node_id = "node{i}"\ndata_dir = "data"\nmetadata_dir = "meta"\n'
            f'rpc_bind_addr = "127.0.0.1:{port}"\ncluster_file = "../cluster.toml"\n'
            f'rpc_secret_file = "../rpc_secret"\nzone = "zone{i}"\n'
        )
        paths.append(cfg)
    return paths


@dataclass
class Cluster:
    """Running server processes of one benchmark cluster."""

    root: Path
    configs: list[Path]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def reset_peak_rss(self) -> None:
        """Reset every server's VmHWM to its current RSS (Linux `clear_refs` 5), so each
        cell reports its own peak rather than the highest of every cell before it."""
        for p in self.procs:
            try:
                with open(f"/proc/{p.pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def peak_rss_mib(self) -> list[float | None]:
        """VmHWM of every server process since the last `reset_peak_rss`, MiB."""
        out: list[float | None] = []
        for p in self.procs:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
                out.append(kb / 1024)
            except (OSError, StopIteration):
                out.append(None)
        return out

    def rss_anon_mib(self) -> list[float | None]:
        """Current RssAnon (the process's own memory, without mapped LMDB file pages), MiB."""
        out: list[float | None] = []
        for p in self.procs:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    kb = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
                out.append(kb / 1024)
            except (OSError, StopIteration):
                out.append(None)
        return out

    def cpu_seconds(self) -> list[float]:
        """User+system CPU seconds of every server process so far."""
        tick = os.sysconf("SC_CLK_TCK")
        out = []
        for p in self.procs:
            try:
                with open(f"/proc/{p.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out.append((int(fields[11]) + int(fields[12])) / tick)
            except OSError:
                out.append(0.0)
        return out

    def log_tail(self) -> str:
        """The end of every server's log."""
        parts = []
        for i in range(len(self.configs)):
            log = self.root / f"node{i + 1}.log"
            if log.exists():
                parts.append(f"--- node{i + 1}\n" + log.read_text()[-2000:])
        return "\n".join(parts)


async def _wait_ready(cluster: Cluster, timeout: float) -> None:
    from blocknode.client import open_client
    from blocknode.config import load_config

    deadline = time.monotonic() + timeout
    for cfg_path, proc in zip(cluster.configs, cluster.procs, strict=True):
        cfg = load_config(cfg_path)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server {cfg_path} exited ({proc.returncode}):\n{cluster.log_tail()}")
            try:
                async with open_client(cfg, timeout=5) as c:
                    st = await c.status()
                    if all(p.get("up", True) for p in st.get("peers", [])):
                        break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {cfg_path} not ready in {timeout}s:\n{cluster.log_tail()}")
            await trio.sleep(0.1)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 8
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


@contextmanager
def running_cluster(base_dir: str, nodes: int, rf: int, *, pure: bool):  # type: ignore[no-untyped-def]
    """Start a cluster of real server processes; always stop them and delete their data."""
    root = Path(tempfile.mkdtemp(prefix=f"bench-{nodes}n-", dir=base_dir))
    cluster = Cluster(root, write_cluster(root, nodes, rf))
    env = dict(os.environ)
    env.pop("BLOCKNODE_REQUIRE_FAST", None)
    env["BLOCKNODE_PURE"] = "1" if pure else "0"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    try:
        for i, cfg in enumerate(cluster.configs, 1):
            log = open(root / f"node{i}.log", "wb")  # noqa: SIM115 - the child holds it
            try:
                cluster.procs.append(subprocess.Popen(
                    [PY, "-m", "blocknode", "serve", "--config", str(cfg)],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(root),
                    start_new_session=True,
                ))
            finally:
                log.close()
        trio.run(_wait_ready, cluster, 30.0)
        yield cluster
    finally:
        _stop(cluster.procs)
        shutil.rmtree(root, ignore_errors=True)


def _pct(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def _summarise(phases: list[dict[str, Any]], size: int) -> dict[str, Any]:
    """Merge the load generators' results of one phase into the cell's figures."""
    duration = phases[0]["duration"]
    done = sorted(t for ph in phases for t in ph["done"])
    lat = sorted(x for ph in phases for x in ph["lat"])
    width = duration / WINDOWS
    counts = [0] * WINDOWS
    for t in done:
        k = int(t / width)
        if k < WINDOWS:
            counts[k] += 1
    rates = sorted(c / width for c in counts)
    med = statistics.median(rates)
    wall = max(ph["wall"] for ph in phases)
    return {
        "ops_s": med,
        "mib_s": med * size / MIB,
        "spread": (rates[-1] - rates[0]) / med if med else None,
        "ops": len(done),
        "p50_ms": (_pct(lat, 0.50) or 0) * 1e3,
        "p99_ms": (_pct(lat, 0.99) or 0) * 1e3,
        "errors": sum(ph["n_errors"] for ph in phases),
        "error_samples": [e for ph in phases for e in ph["errors"]][:3],
        "client_cpu": [ph["cpu"] / ph["wall"] for ph in phases],
        "wall_s": wall,
    }


def run_cell(cluster: Cluster, size: int, concurrency: int, duration: float,
             clients: int) -> dict[str, Any]:
    """One (size, concurrency) cell: puts then gets, with `clients` load generator processes."""
    per = [concurrency // clients + (1 if i < concurrency % clients else 0) for i in range(clients)]
    per = [c for c in per if c]
    start_at = time.time() + 0.7 + 0.2 * len(per)
    cluster.reset_peak_rss()
    cpu0 = cluster.cpu_seconds()
    procs = []
    for i, conc in enumerate(per):
        conns = max(1, min(conc, 4))
        procs.append(subprocess.Popen(
            [PY, "-m", "bench._loadgen", "--config", ",".join(map(str, cluster.configs)),
             "--size", str(size), "--concurrency", str(conc), "--conns", str(conns),
             "--duration", str(duration), "--proc", str(i), "--start-at", str(start_at)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
            env={**os.environ, "PYTHONPATH": REPO}, start_new_session=True,
        ))
    results = []
    anon_peak: list[float | None] = [None] * len(cluster.procs)
    sampling = threading.Event()

    def sample_anon() -> None:
        # The servers' own (anonymous) memory, polled: VmHWM also counts the LMDB map's
        # file pages, which earlier cells' inline blocks leave resident.
        while not sampling.wait(0.02):
            for i, v in enumerate(cluster.rss_anon_mib()):
                if v is not None and (anon_peak[i] is None or v > anon_peak[i]):
                    anon_peak[i] = v

    sampler = threading.Thread(target=sample_anon, daemon=True)
    sampler.start()
    try:
        for p in procs:
            out, err = p.communicate(timeout=4 * duration + 60)
            if p.returncode != 0:
                raise RuntimeError(f"load generator failed ({p.returncode}):\n{err.decode()[-3000:]}")
            results.append(json.loads(out))
    finally:
        _stop(procs)
        sampling.set()
        sampler.join()
    cpu1 = cluster.cpu_seconds()
    cell: dict[str, Any] = {"size": size, "concurrency": concurrency, "clients": len(per)}
    for op in ("put", "get"):
        phases = [r[op] for r in results if op in r]
        if phases:
            cell[op] = _summarise(phases, size)
    total_wall = sum(cell[op]["wall_s"] for op in ("put", "get") if op in cell)
    cell["server_cpu"] = [(b - a) / total_wall for a, b in zip(cpu0, cpu1, strict=True)]
    cell["peak_rss_mib"] = cluster.peak_rss_mib()
    cell["peak_anon_mib"] = anon_peak
    return cell


def run(quick: bool = False, *, duration: float | None = None, base_dir: str | None = None,
        sizes: tuple[int, ...] = SIZES, concurrency: tuple[int, ...] = CONCURRENCY,
        clusters: tuple[tuple[int, int], ...] = ((1, 1), (3, 3)),
        impls: tuple[str, ...] = ("compiled", "pure"), log: Any = None) -> list[dict[str, Any]]:
    """Every cell; rows carry impl, nodes, rf, size, concurrency and the put/get figures."""
    dur = duration if duration is not None else (0.6 if quick else 3.0)
    base = base_dir or tempfile.gettempdir()
    rows = []
    for impl in impls:
        for nodes, rf in clusters:
            with running_cluster(base, nodes, rf, pure=impl == "pure") as cluster:
                for size in sizes:
                    for conc in concurrency:
                        # A second load generator process where one would saturate its core.
                        clients = 2 if conc >= 8 and size <= 64 * KIB else 1
                        cell = run_cell(cluster, size, conc, dur, clients)
                        cell |= {"impl": impl, "nodes": nodes, "rf": rf}
                        rows.append(cell)
                        if log:
                            log(_line(cell))
    return rows


def _line(c: dict[str, Any]) -> str:
    parts = [f"{c['impl']:<8} {c['nodes']}n {size_label(c['size']):>6} c{c['concurrency']:<3}"]
    for op in ("put", "get"):
        if op in c:
            f = c[op]
            parts.append(f"{op} {f['ops_s']:8,.0f}/s {f['mib_s']:7,.1f} MiB/s p50 {f['p50_ms']:6.2f} "
                         f"p99 {f['p99_ms']:7.2f} ms err {f['errors']} cli {max(f['client_cpu']):.0%}")
    parts.append("rss " + "/".join(f"{x:.0f}" if x else "?" for x in c["peak_rss_mib"]))
    if c.get("peak_anon_mib"):
        parts.append("anon " + "/".join(f"{x:.0f}" if x else "?" for x in c["peak_anon_mib"]))
    return " | ".join(parts)


def cell_options(sizes: str | None, concurrency: str | None, nodes: str | None) -> dict[str, Any]:
    """`run` keyword arguments from comma-separated command-line lists (None: the default)."""
    kw: dict[str, Any] = {}
    if sizes:
        kw["sizes"] = tuple(int(x) for x in sizes.split(","))
    if concurrency:
        kw["concurrency"] = tuple(int(x) for x in concurrency.split(","))
    if nodes:
        kw["clusters"] = tuple((int(x), min(3, int(x))) for x in nodes.split(","))
    return kw


def main(argv: list[str] | None = None) -> int:
    """Command-line entry."""
    p = argparse.ArgumentParser(prog="python -m bench.macro", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--duration", type=float)
    p.add_argument("--sizes", help="comma-separated bytes")
    p.add_argument("--concurrency", help="comma-separated")
    p.add_argument("--nodes", help="comma-separated cluster sizes (1 -> rf 1, 3 -> rf 3)")
    p.add_argument("--impls", default="compiled,pure")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    kw = cell_options(args.sizes, args.concurrency, args.nodes)
    rows = run(args.quick, duration=args.duration, impls=tuple(args.impls.split(",")),
               log=lambda s: print(s, flush=True), **kw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
