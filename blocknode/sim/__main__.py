"""``python -m blocknode.sim``: run seeded simulations and print what they found.

    python -m blocknode.sim --seeds 1000 --nodes 5      # seeds 0..999, a summary table
    python -m blocknode.sim --seed 1234 --trace         # replay one seed, its event trace
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from blocknode.sim.run import Result, SimConfig, run_seed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m blocknode.sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=10, help="how many seeds to run (from --first)")
    p.add_argument("--first", type=int, default=0, help="first seed of a --seeds run")
    p.add_argument("--seed", type=int, help="run this one seed")
    p.add_argument("--nodes", type=int, default=5, choices=range(3, 8), metavar="3..7")
    p.add_argument("--ops", type=int, default=40, help="client operations per seed")
    p.add_argument("--workers", type=int, default=3, help="concurrent client tasks")
    p.add_argument("--hot-refs", type=int, default=0,
                   help="one burst of this many references to one block")
    p.add_argument("--layout-changes", action="store_true",
                   help="layout changes during the chaos: add, remove, capacity, crash "
                        "mid-migration (blocknode/sim/layout_nemesis.py)")
    p.add_argument("--no-faults", action="store_true", help="the workload alone")
    p.add_argument("--shrink", action="store_true",
                   help="on a violation, look for a smaller run of the same seed that fails too")
    p.add_argument("--trace", action="store_true", help="print the event trace as it happens")
    p.add_argument("--verbose", "-v", action="store_true", help="one line per seed")
    args = p.parse_args(argv)

    seeds = [args.seed] if args.seed is not None else list(range(args.first, args.first + args.seeds))
    ops: Counter = Counter()
    faults: Counter = Counter()
    failed: list[Result] = []
    beyond = 0
    sim_s = 0.0
    t0 = time.perf_counter()
    for seed in seeds:
        r = run_seed(SimConfig(seed=seed, nodes=args.nodes, ops=args.ops, workers=args.workers, hot_refs=args.hot_refs,
                               faults=not args.no_faults,
                               trace=args.trace, layout_changes=args.layout_changes))
        ops.update(r.ops)
        faults.update(r.faults)
        sim_s += r.sim_s
        beyond += len(r.beyond_budget)
        if args.verbose or args.seed is not None:
            print(f"sim seed={seed} nodes={args.nodes} sim_s={r.sim_s:.0f} wall_s={r.wall_s:.2f} "
                  f"trace={r.digest} acked={r.acked} faults={dict(sorted(r.faults.items()))} "
                  f"-> {'FAIL' if r.violations else 'PASS'}")
        if r.violations:
            failed.append(r)
            print(f"seed {seed}: {len(r.violations)} violation(s):", file=sys.stderr)
            for v in r.violations:
                print(f"  {v}", file=sys.stderr)
            if not args.trace:
                print("  trace (last 60 events):", file=sys.stderr)
                for line in r.trace[-60:]:
                    print(f"    {line}", file=sys.stderr)
            print(f"  REPLAY: python -m blocknode.sim --seed {seed} --nodes {args.nodes} "
                  f"--ops {args.ops} --workers {args.workers} --hot-refs {args.hot_refs} --trace"
                  f"{' --layout-changes' if args.layout_changes else ''}", file=sys.stderr)
            if args.shrink:
                shrink(seed, args)
    wall = time.perf_counter() - t0
    kinds = sorted({k.split(":")[0] for k in ops if ":" in k})
    print()
    print(f"{'seeds run':<24}{len(seeds)}  ({len(seeds) / wall:.2f} seeds/s, wall {wall:.1f}s)")
    print(f"{'simulated hours':<24}{sim_s / 3600:.2f}")
    print(f"{'ops acknowledged':<24}{sum(v for k, v in ops.items() if k.endswith(':ok'))}"
          f"  (failed/ambiguous {sum(v for k, v in ops.items() if k.endswith(':fail'))})")
    for k in kinds:
        print(f"  {k:<22}ok {ops[k + ':ok']:>6}  fail {ops[k + ':fail']:>6}")
    print(f"{'faults injected':<24}{sum(faults.values())}")
    for k, v in sorted(faults.items()):
        print(f"  {k:<22}{v}")
    print(f"{'under-replicated':<24}{ops['under_replicated']}  (live blocks on >= wq but < rf "
          f"nodes after healing)")
    print(f"{'beyond fault budget':<24}{beyond}")
    print(f"{'invariant violations':<24}{sum(len(r.violations) for r in failed)}"
          f"  in {len(failed)} seed(s){': ' + ' '.join(str(r.seed) for r in failed) if failed else ''}")
    return 1 if failed else 0


def shrink(seed: int, args: argparse.Namespace) -> None:
    """Crude shrinking: the same seed with fewer operations, fewer clients, no faults.

    Every choice comes from the one seeded RNG, so a smaller run is a different
    schedule; the smallest one that still fails is printed (a shorter trace to read).
    """
    best = (args.ops, args.workers, True)
    for ops, workers, faults in [(max(1, args.ops // d), w, f) for d in (8, 4, 2)
                                 for w in (1, args.workers) for f in (False, True)]:
        if (ops, workers) >= best[:2]:
            continue
        r = run_seed(SimConfig(seed=seed, nodes=args.nodes, ops=ops, workers=workers,
                               faults=faults, hot_refs=args.hot_refs))
        if r.violations:
            best = (ops, workers, faults)
            print(f"  shrunk: --ops {ops} --workers {workers}{'' if faults else ' --no-faults'} "
                  f"fails too ({r.violations[0][:100]}); {len(r.trace)} events", file=sys.stderr)
    print(f"  SMALLEST: python -m blocknode.sim --seed {seed} --nodes {args.nodes} --ops {best[0]} "
          f"--workers {best[1]}{'' if best[2] else ' --no-faults'} --hot-refs {args.hot_refs} "
          f"--trace", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
