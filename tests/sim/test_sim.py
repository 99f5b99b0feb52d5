"""The deterministic simulation (`blocknode.sim`): determinism, the checker, many seeds.

`BLOCKNODE_SIM_SEEDS` sets how many seeds `test_seeds_hold_the_invariants` runs
(default: what fits in about a minute on the 2-core CI machine; see README,
"Simulation").
"""

from __future__ import annotations

import os
import time

import pytest

from blocknode.sim.run import Sim, SimConfig, run_seed

SEEDS = int(os.environ.get("BLOCKNODE_SIM_SEEDS", "40"))


def test_same_seed_same_run_event_for_event() -> None:
    a = run_seed(SimConfig(seed=11, ops=25))
    b = run_seed(SimConfig(seed=11, ops=25))
    assert a.trace == b.trace
    assert a.digest == b.digest
    assert a.acked > 0
    c = run_seed(SimConfig(seed=12, ops=25))
    assert c.digest != a.digest


class _LosesABlock(Sim):
    """A deliberately broken cluster: before the check, a live block vanishes everywhere."""

    async def heal(self, nursery):  # type: ignore[no-untyped-def]
        await super().heal(nursery)
        h = sorted(h for h in self.protected
                   if any(s == "live" for (hh, _), s in self.pairs.items() if hh == h))[0]
        self.lost = h
        for node in self.nodes.values():
            await node.meta.env.submit(lambda txn, node=node: node.meta.inline.tx_delete(txn, h))
            for c in node.files.copies(h):
                os.unlink(c.path)


class _BreaksRc(Sim):
    """A deliberately broken cluster: one RC entry is off by one before the check."""

    async def heal(self, nursery):  # type: ignore[no-untyped-def]
        await super().heal(nursery)
        node = self.nodes[self.ids[0]]
        h, _ = next(iter(node.meta.refs.iter_rc()))
        await node.meta.env.submit(lambda txn: node.meta.refs.tx_incref(txn, h, check_later=False))


def test_the_checker_sees_a_lost_block() -> None:
    r = run_seed(SimConfig(seed=3, ops=15, faults=False), _LosesABlock)
    assert any(v.startswith("LOST") for v in r.violations), r.violations


def test_the_checker_sees_an_rc_mismatch() -> None:
    r = run_seed(SimConfig(seed=3, ops=15, faults=False), _BreaksRc)
    assert any("rc mismatch" in v for v in r.violations), r.violations


@pytest.mark.timeout(600)
def test_seeds_hold_the_invariants() -> None:
    t0 = time.perf_counter()
    bad = {}
    for seed in range(SEEDS):
        r = run_seed(SimConfig(seed=seed))
        if r.violations:
            bad[seed] = r.violations
    rate = SEEDS / (time.perf_counter() - t0)
    print(f"{SEEDS} seeds, {rate:.2f} seeds/s")
    assert not bad, f"replay with: python -m blocknode.sim --seed N --trace: {bad}"
