"""The deterministic simulation (`blocknode.sim`): determinism, the checker, many seeds.

`test_a_thousand_seeds_hold_the_invariants` runs 1000 seeds of the short schedule per
mode (`BLOCKNODE_SIM_SEEDS` changes the count; see README, "Simulation").
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio

from blocknode.sim.batch import Summary, run_many
from blocknode.sim.run import Sim, SimConfig, run_seed


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
                node.files.fs.unlink(c.path)


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


@pytest.mark.timeout(1800)
def test_a_thousand_seeds_hold_the_invariants() -> None:
    """`BLOCKNODE_SIM_SEEDS` (default 1000) seeds of the short schedule, 3, 4 and 5 nodes in
    turn, in `BLOCKNODE_SIM_JOBS` worker processes (default: one per core, at most 2);
    prints the summary table; no seed may violate an invariant."""
    count = int(os.environ.get("BLOCKNODE_SIM_SEEDS", "1000"))
    jobs = int(os.environ.get("BLOCKNODE_SIM_JOBS", str(min(2, os.cpu_count() or 1))))
    summary = Summary("3-5")
    for r in run_many((SimConfig.short(seed, 3 + seed % 3) for seed in range(count)), jobs):
        summary.add(r)
    print()
    print(summary.table(jobs))
    assert summary.seeds == count
    assert summary.acked > count  # the workload ran (an op or more acknowledged per seed)
    assert sum(summary.faults.values()) > count  # and the nemesis too
    for kind in ("crash", "partition", "oneway", "bitflip"):
        assert summary.faults[kind] > 0, (kind, summary.faults)
    if count >= 200:  # rarer: a crash of the victim that loses its disk (~1 seed in 10)
        assert summary.faults["data_loss"] + summary.faults["meta_loss"] > 0, summary.faults
    bad = {r.seed: r.violations for r in summary.failed}
    assert not bad, ("replay with: python -m blocknode.sim --nodes N --seed S --trace "
                     f"(N = 3 + S % 3): {bad}")


def test_replay_in_another_process_gives_the_same_trace() -> None:
    """Another process (another string-hash seed) replays a seed event for event."""
    here = run_seed(SimConfig(seed=5, ops=15))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-m", "blocknode.sim", "--seed", "5", "--ops", "15",
                          "--schedule", "full"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert f"trace={here.digest}" in out.stdout, out.stdout + out.stderr


def test_shrink_minimises_faults_then_operations(monkeypatch, capsys) -> None:
    import blocknode.sim.__main__ as cli
    import blocknode.sim.batch as batch
    from blocknode.sim.run import Result

    calls = []

    def fake(cfg: SimConfig, sim_class: object = None) -> Result:
        calls.append(cfg)
        r = Result(cfg.seed, trace=["e"] * cfg.ops)
        faults = 5 if cfg.max_faults is None else min(5, cfg.max_faults)
        if cfg.faults:
            r.faults["crash"] = faults
        if cfg.faults and faults >= 2 and cfg.ops >= 10:
            r.violations.append("LOST something")
        return r

    monkeypatch.setattr(cli, "run_seed", fake)
    monkeypatch.setattr(batch, "run_seed", fake)
    assert cli.main(["--seed", "9", "--ops", "80", "--shrink"]) == 1
    err = capsys.readouterr().err
    assert ("SMALLEST: python -m blocknode.sim --seed 9 --schedule short --nodes 5 --ops 10 "
            "--workers 1 --max-faults 2 --trace") in err, err
    assert len(calls) <= 2 + 24  # the run, the shrink's re-run, its budget


def test_hours_runs_seeds_until_enough_simulated_time(monkeypatch, capsys) -> None:
    import blocknode.sim.__main__ as cli
    import blocknode.sim.batch as batch
    from blocknode.sim.run import Result

    def fake(cfg: SimConfig, sim_class: object = None) -> Result:
        return Result(cfg.seed, sim_s=100.0)

    monkeypatch.setattr(batch, "run_seed", fake)
    assert cli.main(["--hours", "0.1"]) == 0  # 360 s: four seeds of 100 s
    out = capsys.readouterr().out
    assert "seeds run               4 " in out, out
    assert "simulated hours         0.11" in out, out


class _GcIgnoresRc(Sim):
    """A deliberately broken node: its GC deletes a block whatever its references."""

    def watch_gc(self, nid, node):  # type: ignore[no-untyped-def]
        async def delete_anyway(h: bytes) -> bool:
            deleted = await node.files.adelete(h)
            return deleted or await node.meta.env.submit(
                lambda txn: node.meta.inline.tx_delete(txn, h))

        node.blocks.delete_if_deletable = delete_anyway
        super().watch_gc(nid, node)

    async def heal(self, nursery):  # type: ignore[no-untyped-def]
        await super().heal(nursery)
        h = sorted(h for h in self.protected if self.live_refs(h))[0]
        nid = self.nodes[self.ids[0]].layout.nodes_of(h)[0]
        await self.nodes[nid].blocks.delete_if_deletable(h)  # what a broken GC would do


def test_the_checker_sees_a_gc_deleting_a_live_block_as_it_happens() -> None:
    r = run_seed(SimConfig(seed=3, ops=15, faults=False), _GcIgnoresRc)
    assert any(v.startswith("S3: GC on") and "while live acked" in v for v in r.violations), \
        r.violations


class _LeaksBudget(Sim):
    """A deliberately broken node: its RPC byte budget is overdrawn for a while."""

    async def heal(self, nursery):  # type: ignore[no-untyped-def]
        budget = self.nodes[self.ids[1]].net.budget
        budget.used += budget.max_bytes + 1
        await trio.sleep(2 * self.cfg.bounds_every)
        budget.used -= budget.max_bytes + 1
        await super().heal(nursery)


def test_the_checker_samples_the_memory_bounds() -> None:
    r = run_seed(SimConfig.short(3, 3, faults=False), _LeaksBudget)
    assert any("memory budget" in v and "rpc.budget.used" in v for v in r.violations), \
        r.violations
    clean = run_seed(SimConfig.short(3, 3, faults=False))
    assert not clean.violations
    assert clean.peaks["peak:rpc.peers"] == 2
