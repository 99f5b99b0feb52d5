"""The simulation catches the hardening defects (issue 11): each re-introduced behind its
test-only switch (`blocknode.defects`), a seed that catches it, and the invariant that fires.

The README's "caught by the sim" table gives, per defect, how many seeds of a run catch it;
here each keeps the first catching seed, run with the switch on (a violation of the named
invariant) and, for the cheap ones, with it off (clean).
"""

from __future__ import annotations

from typing import Any

import pytest

from blocknode import defects
from blocknode.sim.run import Sim, SimConfig, invariant_of, run_seed

# defect -> (seed, nodes, extra SimConfig fields, the invariant that fires)
CAUGHT: dict[str, tuple[int, int, dict[str, Any], str]] = {
    "e-put-one-replica": (0, 3, {}, "S1 at ack"),
    "e-gc-ignores-delay": (0, 3, {}, "S3 deleted"),
    "c13-scrub-stale-step": (0, 3, {}, "scrub coverage"),
    "a3-no-supervision": (0, 3, {"worker_bug": True}, "node died/stopped"),
    "c8-ae-unpaged": (0, 3, {"hot_refs": 1500, "hot_down": True}, "unconverged"),
    "c10-reput-unverified": (7, 3, {}, "S1 at ack"),
    "c9-absent-rc-deletable": (14, 3, {}, "S3 deleted"),
}


@pytest.mark.parametrize("name", sorted(CAUGHT))
def test_the_seed_catches_the_defect(name: str) -> None:
    seed, nodes, extra, invariant = CAUGHT[name]
    r = run_seed(SimConfig(seed=seed, nodes=nodes, defects=(name,), **extra))
    assert r.violations, f"seed {seed} no longer catches {name}"
    assert invariant in {invariant_of(v) for v in r.violations}, r.violations[:5]
    assert defects.ACTIVE == frozenset()  # restored after the run


@pytest.mark.parametrize("name", ["e-put-one-replica", "a3-no-supervision", "c10-reput-unverified",
                                  "c9-absent-rc-deletable"])
def test_the_same_seed_is_clean_without_the_defect(name: str) -> None:
    seed, nodes, extra, _ = CAUGHT[name]
    r = run_seed(SimConfig(seed=seed, nodes=nodes, **extra))
    assert r.acked > 0
    assert not r.violations, r.violations[:5]


def test_a_worker_bug_is_injected_and_survived() -> None:
    r = run_seed(SimConfig(seed=1, nodes=3, worker_bug=True))
    assert r.faults["worker_bug"] >= 3  # every node's scrub worker raised at least once
    assert not r.violations, r.violations[:5]


def test_no_defect_is_active_in_a_real_node_and_unknown_names_are_refused() -> None:
    assert defects.ACTIVE == frozenset()
    assert not defects.on("c10-reput-unverified")
    with defects.active(["c10-reput-unverified"]):
        assert defects.on("c10-reput-unverified")
        assert not defects.on("c9-absent-rc-deletable")
    assert defects.ACTIVE == frozenset()
    with pytest.raises(ValueError, match="unknown defect.*no-such-defect"):
        with defects.active(["no-such-defect"]):
            pass
    assert defects.ACTIVE == frozenset()


def test_violations_are_named_by_invariant() -> None:
    assert invariant_of("S1 at ack: put of ab acknowledged while ...") == "S1 at ack"
    assert invariant_of("LOST ab: live refs 1, on [] (< wq 2)") == "S1 lost"
    assert invariant_of("unconverged: live ref r1 of ab is missing on n1") == "unconverged"
    assert invariant_of("node n1 died: RuntimeError()") == "node died/stopped"
    assert invariant_of("something new: detail") == "something new"


class _SleepingResync(Sim):
    """A deliberately broken node: n1's resync workers never claim an entry, and one is due."""

    async def start(self, nursery, nid):  # type: ignore[no-untyped-def]
        await super().start(nursery, nid)
        if nid == "n1":
            node = self.nodes[nid]
            node.resync._claim = lambda: None  # every worker stays idle
            await node.meta.resync_put(bytes(32), 0)


def test_the_checker_sees_resync_workers_asleep_with_work_due() -> None:
    r = run_seed(SimConfig(seed=3, ops=15, faults=False), _SleepingResync)
    assert "S6 resync asleep" in {invariant_of(v) for v in r.violations}, r.violations[:5]
