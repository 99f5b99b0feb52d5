"""The deterministic simulation (`blocknode.sim`): determinism, the checker, many seeds.

`test_seeds_hold_the_invariants` runs as many seeds as fit in
`BLOCKNODE_SIM_SECONDS` per mode (see README, "Simulation").
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

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


@pytest.mark.timeout(900)
@pytest.mark.parametrize("nodes", [5, 3])
def test_seeds_hold_the_invariants(nodes: int) -> None:
    """As many seeds as fit in `BLOCKNODE_SIM_SECONDS` (default 20 s) per mode, at least
    `BLOCKNODE_SIM_MIN_SEEDS` (10); `BLOCKNODE_SIM_SEEDS` fixes the count instead."""
    fixed = os.environ.get("BLOCKNODE_SIM_SEEDS")
    budget = float(os.environ.get("BLOCKNODE_SIM_SECONDS", "20"))
    least = int(os.environ.get("BLOCKNODE_SIM_MIN_SEEDS", "10"))
    t0 = time.perf_counter()
    bad = {}
    seed = 0
    while (seed < int(fixed)) if fixed else (seed < least or time.perf_counter() - t0 < budget):
        r = run_seed(SimConfig(seed=seed, nodes=nodes))
        if r.violations:
            bad[seed] = r.violations
        seed += 1
    rate = seed / (time.perf_counter() - t0)
    print(f"nodes={nodes}: {seed} seeds, {rate:.2f} seeds/s")
    assert not bad, (f"replay with: python -m blocknode.sim --nodes {nodes} --seed N --trace: "
                     f"{bad}")


def test_replay_in_another_process_gives_the_same_trace() -> None:
    """Another process (another string-hash seed) replays a seed event for event."""
    here = run_seed(SimConfig(seed=5, ops=15))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-m", "blocknode.sim", "--seed", "5", "--ops", "15"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert f"trace={here.digest}" in out.stdout, out.stdout + out.stderr


def test_shrink_finds_a_smaller_failing_run(monkeypatch, capsys) -> None:
    import blocknode.sim.__main__ as cli
    from blocknode.sim.run import Result

    def fake(cfg: SimConfig, sim_class: object = None) -> Result:
        r = Result(cfg.seed, trace=["e"] * cfg.ops)
        if cfg.ops >= 10 and cfg.workers == 1 or cfg.ops >= 40:
            r.violations.append("LOST something")
        return r

    monkeypatch.setattr(cli, "run_seed", fake)
    assert cli.main(["--seed", "9", "--ops", "80", "--shrink"]) == 1
    err = capsys.readouterr().err
    assert "SMALLEST: python -m blocknode.sim --seed 9 --nodes 5 --ops 10 --workers 1" in err
