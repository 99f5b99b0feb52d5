"""Many seeds: run them (in parallel processes when asked) and sum them up in one table.

`run_many(configs, jobs)` yields each seed's `Result` in seed order; with ``jobs > 1``
the seeds run in worker processes (forked where the platform allows: the workers share
the loaded code and need no import path), a passing seed's trace is dropped in the
worker (its digest is kept), and a failing seed comes back whole. `Summary` adds them
up and `Summary.table()` is the report of ``python -m blocknode.sim``.
"""

from __future__ import annotations

import itertools
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from blocknode.sim.run import Result, SimConfig, run_seed

__all__ = ["Summary", "run_many"]

BATCH_PER_JOB = 4
"""Seeds handed to the pool per worker at a time (`run_many` checks `stop` between batches)."""


def _run_slim(cfg: SimConfig) -> Result:
    r = run_seed(cfg)
    if not r.violations:
        r.trace_digest = r.digest
        r.trace = []
    return r


def run_many(configs: Iterable[SimConfig], jobs: int = 1,
             stop: Callable[[], bool] | None = None) -> Iterator[Result]:
    """Run every config (in order); `stop()` is asked between batches (e.g. enough
    simulated hours). ``jobs > 1``: that many worker processes."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    it = iter(configs)
    if jobs == 1:
        for cfg in it:
            if stop is not None and stop():
                return
            yield run_seed(cfg)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(jobs, maxtasksperchild=200) as pool:
        while stop is None or not stop():
            batch = list(itertools.islice(it, jobs * BATCH_PER_JOB))
            if not batch:
                return
            yield from pool.imap(_run_slim, batch)


@dataclass
class Summary:
    """The sum of many seeds' results (the report table)."""

    nodes: int | str  # the node count, or a description ("3-5")
    seeds: int = 0
    sim_s: float = 0.0
    ops: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    peaks: dict[str, int] = field(default_factory=dict)
    failed: list[Result] = field(default_factory=list)
    beyond: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, r: Result) -> None:
        self.seeds += 1
        self.sim_s += r.sim_s
        self.ops.update(r.ops)
        self.faults.update(r.faults)
        self.beyond += len(r.beyond_budget)
        for k, v in r.peaks.items():
            self.peaks[k] = max(self.peaks.get(k, 0), v)
        if r.violations:
            self.failed.append(r)

    @property
    def violations(self) -> int:
        return sum(len(r.violations) for r in self.failed)

    @property
    def acked(self) -> int:
        return sum(v for k, v in self.ops.items() if k.endswith(":ok"))

    def table(self, jobs: int = 1) -> str:
        wall = time.perf_counter() - self.t0
        ops = self.ops
        lines = [
            f"{'seeds run':<24}{self.seeds}  ({self.nodes} nodes; {self.seeds / wall:.2f} seeds/s, "
            f"wall {wall:.1f}s, {jobs} job(s))",
            f"{'simulated hours':<24}{self.sim_s / 3600:.2f}",
            f"{'ops acknowledged':<24}{self.acked}  (failed/ambiguous "
            f"{sum(v for k, v in ops.items() if k.endswith(':fail'))})",
        ]
        for k in sorted({k.split(":")[0] for k in ops if ":" in k}):
            lines.append(f"  {k:<22}ok {ops[k + ':ok']:>7}  fail {ops[k + ':fail']:>7}")
        lines.append(f"{'GC deletions checked':<24}{ops['gc_deleted']}  (each checked against "
                     f"the client's live references as it happened)")
        lines.append(f"{'faults injected':<24}{sum(self.faults.values())}")
        for k, v in sorted(self.faults.items()):
            lines.append(f"  {k:<22}{v}")
        lines.append(f"{'under-replicated':<24}{ops['under_replicated']}  (live blocks on >= wq "
                     f"but < rf nodes after healing)")
        if self.peaks:
            lines.append(f"{'bounded structures':<24}peak over all nodes and samples")
            for k, v in sorted(self.peaks.items()):
                lines.append(f"  {k.removeprefix('peak:'):<40}{v}")
        lines.append(f"{'beyond fault budget':<24}{self.beyond}")
        seeds = " ".join(str(r.seed) for r in self.failed[:20])
        lines.append(f"{'invariant violations':<24}{self.violations}  in {len(self.failed)} "
                     f"seed(s){': ' + seeds if seeds else ''}")
        return "\n".join(lines)
