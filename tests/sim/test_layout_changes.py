"""The simulation with layout changes (`SimConfig.layout_changes`, `--layout-changes`).

Adds, removes, capacity changes and crashes mid-migration through the admin RPCs
(`blocknode/sim/layout_nemesis.py`); after healing, one version is live everywhere
and every reference and copy is on the nodes of the newest layout. Runs as many
seeds as fit in `BLOCKNODE_SIM_LAYOUT_SECONDS` (default 60) per node count, at
least `BLOCKNODE_SIM_MIN_SEEDS` (3 here); `BLOCKNODE_SIM_LAYOUT_SEEDS` fixes the count.
"""

from __future__ import annotations

import os
import time

import pytest

from blocknode.sim.run import Sim, SimConfig, run_seed


def test_layout_mode_is_deterministic_and_changes_the_layout() -> None:
    a = run_seed(SimConfig(seed=3, ops=15, layout_changes=True))
    b = run_seed(SimConfig(seed=3, ops=15, layout_changes=True))
    assert a.trace == b.trace
    assert any(k.startswith("layout_") and k != "layout_fail" for k in a.faults), a.faults
    assert any(" settled everywhere after " in line for line in a.trace)


class _KeepsAStrayCopy(Sim):
    """A deliberately broken cluster: a node outside a live block's replicas keeps a copy."""

    async def heal(self, nursery):  # type: ignore[no-untyped-def]
        await super().heal(nursery)
        layout = self.nodes[self.ids[0]].layout
        h = sorted(h for (h, _), s in self.pairs.items() if s == "live"
                   and len(self.data.get(h, b"")) > 1024)[0]
        outsider = next(n for n in self.ids if n not in layout.nodes_of(h))
        from blocknode.block import hashed
        await self.nodes[outsider].blocks.write(hashed(self.data[h]))


def test_the_checker_sees_a_misplaced_copy() -> None:
    r = run_seed(SimConfig(seed=3, ops=15, faults=False, layout_changes=True), _KeepsAStrayCopy)
    assert any(v.startswith("misplaced") for v in r.violations), r.violations


@pytest.mark.timeout(900)
@pytest.mark.parametrize("nodes", [5, 4])
def test_layout_seeds_hold_the_invariants(nodes: int) -> None:
    fixed = os.environ.get("BLOCKNODE_SIM_LAYOUT_SEEDS")
    budget = float(os.environ.get("BLOCKNODE_SIM_LAYOUT_SECONDS", "60"))
    least = int(os.environ.get("BLOCKNODE_SIM_MIN_SEEDS", "3"))
    t0 = time.perf_counter()
    bad = {}
    changes = 0
    seed = 0
    while (seed < int(fixed)) if fixed else (seed < least or time.perf_counter() - t0 < budget):
        r = run_seed(SimConfig(seed=seed, nodes=nodes, layout_changes=True))
        changes += sum(v for k, v in r.faults.items() if k in ("layout_add", "layout_remove",
                                                               "layout_capacity"))
        if r.violations:
            bad[seed] = r.violations
        seed += 1
    rate = seed / (time.perf_counter() - t0)
    print(f"layout nodes={nodes}: {seed} seeds, {changes} layout changes, {rate:.2f} seeds/s")
    assert changes > 0
    assert not bad, (f"replay with: python -m blocknode.sim --layout-changes --nodes {nodes} "
                     f"--seed N --trace: {bad}")
