"""``python -m blocknode.sim``: run seeded simulations and print what they found.

    python -m blocknode.sim --seeds 1000 --nodes 5 --jobs 2   # seeds 0..999, one summary table
    python -m blocknode.sim --seed 1234 --trace               # replay one seed, its event trace
    python -m blocknode.sim --hours 10 --jobs 2               # seeds until 10 simulated hours (soak)
    python -m blocknode.sim --seeds 100 --schedule full       # the longer schedule

The default is the short schedule CI runs (`blocknode.sim.run.SHORT`); ``--ops``,
``--workers`` etc. override it. A failing seed prints its violations, its trace (the
last events) and a replay command; ``--shrink`` also looks for the smallest failing run.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

from blocknode.defects import DEFECTS
from blocknode.sim.batch import Summary, run_many
from blocknode.sim.run import Result, SimConfig, invariant_of, run_seed


def _config(args: argparse.Namespace, seed: int, **over: Any) -> SimConfig:
    kw: dict[str, Any] = {"nodes": args.nodes, "hot_refs": args.hot_refs,
                          "faults": not args.no_faults, "trace": args.trace,
                          "tracemalloc": args.tracemalloc, "hot_down": args.hot_down,
                          "worker_bug": args.worker_bug, "defects": tuple(args.defect),
                          "layout_changes": args.layout_changes}
    for name in ("ops", "workers", "max_faults"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    kw.update(over)
    if args.schedule == "short":
        return SimConfig.short(seed, **kw)
    return SimConfig(seed=seed, **kw)


def _flags(cfg: SimConfig, schedule: str) -> str:
    return (f"--schedule {schedule} --nodes {cfg.nodes} --ops {cfg.ops} --workers {cfg.workers}"
            f"{'' if cfg.faults else ' --no-faults'}"
            f"{f' --max-faults {cfg.max_faults}' if cfg.max_faults is not None else ''}"
            f"{f' --hot-refs {cfg.hot_refs}' if cfg.hot_refs else ''}"
            f"{' --hot-down' if cfg.hot_down else ''}{' --worker-bug' if cfg.worker_bug else ''}"
            + "".join(f" --defect {d}" for d in cfg.defects)
            + (" --layout-changes" if cfg.layout_changes else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m blocknode.sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=10, help="how many seeds to run (from --first)")
    p.add_argument("--first", type=int, default=0, help="first seed of a --seeds/--hours run")
    p.add_argument("--seed", type=int, help="run this one seed")
    p.add_argument("--hours", type=float,
                   help="run seeds (from --first) until this many simulated hours (a soak)")
    p.add_argument("--jobs", "-j", type=int, default=1, help="worker processes (seeds in parallel)")
    p.add_argument("--schedule", choices=("short", "full"), default="short",
                   help="short: what CI runs a thousand of; full: the longer SimConfig defaults")
    p.add_argument("--nodes", type=int, default=5, choices=range(3, 8), metavar="3..7")
    p.add_argument("--ops", type=int, help="client operations per seed")
    p.add_argument("--workers", type=int, help="concurrent client tasks")
    p.add_argument("--max-faults", type=int, help="the nemesis stops after this many faults")
    p.add_argument("--hot-refs", type=int, default=0,
                   help="one burst of this many references to one block")
    p.add_argument("--hot-down", action="store_true",
                   help="with --hot-refs: one replica of the popular block is down during the burst")
    p.add_argument("--worker-bug", action="store_true",
                   help="each node's scrub worker raises once in its first step (supervision)")
    p.add_argument("--defect", action="append", default=[], choices=sorted(DEFECTS), metavar="NAME",
                   help="re-introduce a fixed defect (repeatable; see blocknode/defects.py): "
                        + ", ".join(sorted(DEFECTS)))
    p.add_argument("--layout-changes", action="store_true",
                   help="layout changes during the chaos: add, remove, capacity, crash "
                        "mid-migration (blocknode/sim/layout_nemesis.py)")
    p.add_argument("--no-faults", action="store_true", help="the workload alone")
    p.add_argument("--tracemalloc", action="store_true",
                   help="measure each seed's heap peak against run.HEAP_BUDGET (slow)")
    p.add_argument("--shrink", action="store_true",
                   help="on a violation, look for the smallest run of the same seed that fails")
    p.add_argument("--trace", action="store_true", help="print the event trace as it happens")
    p.add_argument("--verbose", "-v", action="store_true", help="one line per seed")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.hours is not None and args.hours <= 0:
        p.error(f"--hours must be > 0, got {args.hours}")

    summary = Summary(args.nodes)
    if args.seed is not None:
        seeds: Iterator[int] = iter([args.seed])
    elif args.hours is not None:
        seeds = itertools.count(args.first)
    else:
        seeds = iter(range(args.first, args.first + args.seeds))
    stop = (lambda: summary.sim_s >= args.hours * 3600) if args.hours is not None else None
    jobs = 1 if args.seed is not None or args.trace else args.jobs
    for r in run_many((_config(args, s) for s in seeds), jobs, stop):
        summary.add(r)
        cfg = _config(args, r.seed)
        if args.verbose or args.seed is not None:
            print(f"sim seed={r.seed} nodes={args.nodes} sim_s={r.sim_s:.0f} wall_s={r.wall_s:.2f} "
                  f"trace={r.digest} acked={r.acked} faults={dict(sorted(r.faults.items()))} "
                  f"-> {'FAIL' if r.violations else 'PASS'}", flush=True)
        if r.violations:
            report_failure(r, cfg, args)
            if args.shrink:
                shrink(cfg, args.schedule)
    print()
    print(summary.table(jobs))
    if args.defect:
        print(f"{'defects re-introduced':<24}{' '.join(args.defect)}")
        fired = Counter(k for r in summary.failed for k in {invariant_of(v) for v in r.violations})
        print(f"{'invariants that fired':<24}{dict(fired.most_common())}  (seeds)")
    return 1 if summary.failed else 0


def report_failure(r: Result, cfg: SimConfig, args: argparse.Namespace) -> None:
    print(f"seed {r.seed}: {len(r.violations)} violation(s):", file=sys.stderr)
    for v in r.violations:
        print(f"  {v}", file=sys.stderr)
    if not args.trace:
        print("  trace (last 60 events):", file=sys.stderr)
        for line in r.trace[-60:]:
            print(f"    {line}", file=sys.stderr)
    print(f"  REPLAY: python -m blocknode.sim --seed {r.seed} {_flags(cfg, args.schedule)} --trace",
          file=sys.stderr)


def shrink(cfg: SimConfig, schedule: str, budget: int = 24) -> SimConfig:
    """The smallest run of the same seed that still fails: greedy, fewest faults first
    (none, then halving and stepping `max_faults` down from what the run injected), then
    fewest operations (halving, then stepping down) and clients. At most `budget` runs.

    Every choice comes from the one seeded RNG, so a smaller run is a different
    schedule; each candidate is run and kept only if it fails too. Printed, and returned.
    """
    from dataclasses import replace

    runs = 0

    def fails(c: SimConfig) -> Result | None:
        nonlocal runs
        runs += 1
        r = run_seed(replace(c, trace=False))
        return r if r.violations else None

    best = cfg
    first = run_seed(replace(cfg, trace=False))
    if not first.violations:
        print("  shrink: the run does not fail again (not deterministic?)", file=sys.stderr)
        return cfg
    injected = sum(first.faults.values())
    best = replace(best, max_faults=injected) if best.faults else best

    def steps(n: int) -> list[int]:
        out, x = [], n // 2
        while x >= 1 and len(out) < 4:
            out.append(x)
            x //= 2
        return out + [n - 1] if n - 1 not in out and n > 1 else out

    def tries() -> Iterator[SimConfig]:
        if best.faults:
            yield replace(best, faults=False, max_faults=None)
        if best.faults and best.max_faults:
            for m in [0, *steps(best.max_faults)]:
                yield replace(best, max_faults=m)
        for o in steps(best.ops):
            yield replace(best, ops=o)
        if best.workers > 1:
            yield replace(best, workers=1)

    progress = True
    while progress and runs < budget:
        progress = False
        for c in tries():
            if runs >= budget:
                break
            if (c.faults, c.max_faults or 0, c.ops, c.workers) >= (best.faults, best.max_faults or 0,
                                                                      best.ops, best.workers):
                continue
            r = fails(c)
            if r is not None:
                best = c
                print(f"  shrunk: {_flags(c, schedule)} fails too ({r.violations[0][:100]}); "
                      f"{len(r.trace)} events, {sum(r.faults.values())} faults", file=sys.stderr)
                progress = True
                break
    print(f"  SMALLEST: python -m blocknode.sim --seed {cfg.seed} {_flags(best, schedule)} --trace",
          file=sys.stderr)
    return best


if __name__ == "__main__":
    sys.exit(main())
