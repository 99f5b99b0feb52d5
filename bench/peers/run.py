"""``python -m bench peers [--quick]``: blocknode beside OpenStack Swift, one run.

1. the machine's limits (`bench.limits`: durable 1 MiB / 4 KiB file writes —
   tmp, write, fsync, rename, fsync dir, queue depth 1 — reads, read + BLAKE2b);
2. blocknode, one node, then three nodes (replication 3, write quorum 2): real
   ``blocknode serve`` processes, each in its own session (their process groups'
   CPU is measured), stopped and deleted afterwards;
3. Swift 2.30 (Debian packages, installed by `swift/setup.sh` if apt can reach
   its mirror; we must be root): 3 object servers driven directly, quorum 2;
   stopped by `swift/stop.sh` (the recorded process groups only) and its object
   data deleted, also on errors and Ctrl-C. Without Swift, blocknode runs alone
   and the report says why;
4. the same load generator (`bench.peers.loadgen`) at c=1 and c=8, 4 KiB and
   1 MiB, against each; the table goes to stdout and into `bench/RESULTS.md`
   (its marked section is replaced) unless ``--no-write``.

Everything listens on 127.0.0.1; phases are bounded in count and time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import limits as limits_mod
from bench import macro
from bench.peers import report, sysstat

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "RESULTS.md"
PY = sys.executable
SWIFT_BASE = "/srv/bench-peers-swift"
MIB, KIB = 1 << 20, 1 << 10


def workloads(quick: bool) -> dict[int, str]:
    """Concurrency -> the loadgen workload (size:count,...) of one rep."""
    if quick:
        return {8: f"{4 * KIB}:600,{MIB}:120", 1: f"{4 * KIB}:200,{MIB}:40"}
    return {8: f"{4 * KIB}:3000,{MIB}:500", 1: f"{4 * KIB}:800,{MIB}:150"}


def _loadgen(backend: str, opts: dict[str, str], conc: int, workload: str, *, reps: int,
             max_s: float, pgids: list[int], quiet_wait: float, log: Any) -> list[dict[str, Any]]:
    """One loadgen process; its phases, each tagged with the concurrency. Killed on any exit."""
    cmd = [PY, "-m", "bench.peers.loadgen", "--backend", backend, "-c", str(conc), "--workload", workload,
           "--reps", str(reps), "--get-rounds", "2", "--max-seconds", str(max_s),
           "--pgids", ",".join(map(str, pgids)), "--quiet-wait", str(quiet_wait)]
    for k, v in opts.items():
        cmd += ["--opt", f"{k}={v}"]
    n_phases = reps * 2 * (workload.count(",") + 1)
    timeout = n_phases * (max_s + quiet_wait + 30) + 120
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(HERE.parent.parent),
                            env={**os.environ, "PYTHONPATH": str(HERE.parent.parent)},
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for line in err.decode(errors="replace").splitlines():
        if line.startswith("#"):
            log(f"  {backend}: {line[1:].strip()}")
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen {backend} c{conc} failed ({proc.returncode}):\n"
                           f"{err.decode(errors='replace')[-3000:]}")
    doc = json.loads(out)
    for ph in doc["runs"]:
        ph["concurrency"] = conc
    return doc["runs"]


def _blocknode(base: str, nodes: int, quick: bool, reps: int, max_s: float, quiet: float,
               log: Any) -> list[dict[str, Any]]:
    phases: list[dict[str, Any]] = []
    with macro.running_cluster(base, nodes, nodes, pure=False) as cluster:
        pgids = [p.pid for p in cluster.procs]  # start_new_session: group id = pid
        opts = {"configs": ",".join(map(str, cluster.configs)), "conns": "3"}
        for conc, wl in workloads(quick).items():
            log(f"blocknode {nodes} node(s), c{conc}, {wl}")
            phases += _loadgen("blocknode", opts, conc, wl, reps=reps, max_s=max_s, pgids=pgids,
                               quiet_wait=quiet, log=log)
    return phases


def _swift_pgids(base: str) -> list[int]:
    out = []
    run_dir = Path(base) / "run"
    for f in sorted(run_dir.glob("*.pid")):
        out.append(int(f.read_text().split()[0]))
    return out


def _swift(base: str, quick: bool, reps: int, max_s: float, quiet: float,
           log: Any) -> tuple[str, list[dict[str, Any]]]:
    """(status, phases): Swift set up, measured and stopped; status says what happened."""
    if os.geteuid() != 0:
        return "not run (installing and starting Swift needs root)", []
    env = {**os.environ, "SWIFT_PEER_BASE": base}
    phases: list[dict[str, Any]] = []
    try:
        log(f"swift: setup (install if needed, fresh start under {base})")
        r = subprocess.run(["bash", str(HERE / "swift" / "setup.sh"), "--fresh"], env=env,
                           capture_output=True, timeout=900)
        if r.returncode != 0:
            tail = r.stderr.decode(errors="replace").strip().splitlines()[-3:]
            return f"not run: setup failed ({' / '.join(tail) or 'no output'})", []
        version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "swift"], capture_output=True,
                                 text=True).stdout.strip() or "?"
        pgids = _swift_pgids(base)
        opts = {"peer": str(Path(base) / "etc" / "peer.json")}
        for conc, wl in workloads(quick).items():
            log(f"swift-direct c{conc}, {wl}")
            phases += _loadgen("swift-direct", opts, conc, wl, reps=reps, max_s=max_s, pgids=pgids,
                               quiet_wait=quiet, log=log)
        return f"Swift {version} (Debian), 3 object servers direct, quorum 2", phases
    except subprocess.TimeoutExpired:
        return "not run: setup timed out (apt or the servers)", phases
    finally:
        subprocess.run(["bash", str(HERE / "swift" / "stop.sh")], env=env, capture_output=True, timeout=60)
        shutil.rmtree(Path(base) / "node", ignore_errors=True)


def run(quick: bool, *, base_dir: str | None = None, swift: bool = True, swift_base: str = SWIFT_BASE,
        reps: int | None = None, log: Any = print) -> dict[str, Any]:
    """Every measurement; the document `report.render` formats."""
    import blocknode.fastpath as fp

    base = base_dir or tempfile.gettempdir()
    reps = reps if reps is not None else 1 if quick else 3
    if not 1 <= reps <= 10:
        raise ValueError(f"reps must be 1..10, not {reps}")
    max_s = 8.0 if quick else 20.0
    quiet = 3.0 if quick else 10.0
    t0 = time.monotonic()
    doc: dict[str, Any] = {"date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "quick": quick,
                           "reps": reps, "fastpath": fp.IMPLEMENTATION, "loadavg_before": sysstat.loadavg(),
                           "systems": {}}
    log("limits")
    doc["limits"] = [r for r in limits_mod.run(quick, base) if r["name"].startswith(("raw", "blake2b"))]
    doc["systems"][report.ONE] = _blocknode(base, 1, quick, reps, max_s, quiet, log)
    doc["systems"][report.THREE] = _blocknode(base, 3, quick, reps, max_s, quiet, log)
    if swift:
        doc["swift_status"], doc["systems"][report.SWIFT] = _swift(swift_base, quick, reps, max_s, quiet, log)
    else:
        doc["swift_status"] = "not run (--no-swift)"
    doc["loadavg_after"] = sysstat.loadavg()
    doc["elapsed_s"] = time.monotonic() - t0
    return doc


def _sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry."""
    p = argparse.ArgumentParser(prog="python -m bench peers", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 rep, fewer blocks (≈ 4 minutes)")
    p.add_argument("--reps", type=int, help="repetitions of each cell (default 1 with --quick, else 3)")
    p.add_argument("--no-swift", action="store_true", help="blocknode and the limits only")
    p.add_argument("--no-write", action="store_true", help="do not rewrite bench/RESULTS.md")
    p.add_argument("--dir", help="where blocknode and the limits write (default: the temp dir)")
    p.add_argument("--swift-dir", default=SWIFT_BASE, help="Swift's configs, logs and data")
    p.add_argument("--json", metavar="PATH", help="also write the raw document")
    p.add_argument("--render", metavar="JSON", help="print the tables of an earlier --json, run nothing")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(report.render(json.load(f)))
        return 0
    signal.signal(signal.SIGTERM, _sigterm)
    doc = run(args.quick, base_dir=args.dir, swift=not args.no_swift, swift_base=args.swift_dir,
              reps=args.reps, log=lambda s: print(s, flush=True))
    md = report.render(doc)
    print("\n" + md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f)
    if not args.no_write:
        report.replace_section(str(RESULTS), md)
        print(f"written into {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
