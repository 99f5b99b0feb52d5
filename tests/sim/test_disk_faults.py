"""A node whose disk is full or read-only (`blocknode.sim.disk`), in a simulated cluster:
a put fails with an error naming the cause, gets keep being served, and puts work again
once the disk does — no restart, nothing lost."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from blocknode.sim.run import Sim, SimConfig, run_seed


class _FaultyDisks(Sim):
    """Puts a block, fails the disk of `faulty` nodes, puts and gets, heals the disks."""

    code = errno.ENOSPC
    faulty = 3
    seen: dict

    async def main(self) -> None:
        self.seen = {}
        async with trio.open_nursery() as nursery:
            for nid in self.ids:
                await self.start(nursery, nid)
            await trio.sleep(1)
            old = os.urandom(3000)  # above the inline threshold: a block file
            h_old = await self.with_client(lambda c: c.put_block(old, "r0"))
            for nid in self.ids[:self.faulty]:
                self.disks[nid].set_fault(self.code)
            try:
                await self.with_client(lambda c: c.put_block(os.urandom(3000), "r1"))
                self.seen["put"] = "ok"
            except Exception as exc:  # noqa: BLE001 - what the client sees is the finding
                self.seen["put"] = str(exc)
            self.seen["get"] = await self.with_client(lambda c: c.get_block(h_old)) == old
            self.seen["in_service"] = all(d.in_service for n in self.nodes.values()
                                          for d in n.files.dirs)
            for nid in self.ids:
                self.disks[nid].set_fault(None)
            new = os.urandom(3000)
            h_new = await self.with_client(lambda c: c.put_block(new, "r2"))
            self.seen["after"] = await self.with_client(lambda c: c.get_block(h_new)) == new
            self.seen["running"] = all(not self.done[nid].is_set() for nid in self.ids)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("code", "named"), [(errno.ENOSPC, "the disk is full"),
                                             (errno.EROFS, "read-only disk")])
def test_a_put_to_full_or_read_only_disks_fails_by_name_and_gets_go_on(code, named) -> None:
    sim = type("S", (_FaultyDisks,), {"code": code, "faulty": 3})
    holder: list[_FaultyDisks] = []

    def make(cfg, root, result):  # type: ignore[no-untyped-def]
        holder.append(sim(cfg, root, result))
        return holder[0]

    r = run_seed(SimConfig(seed=1, nodes=3, faults=False), make)  # type: ignore[arg-type]
    seen = holder[0].seen
    assert "quorum not reached" in seen["put"] and named in seen["put"], seen["put"]
    assert seen["get"] is True  # its blocks are still served from the faulty disks
    assert seen["in_service"] is True  # full / read-only: not a failed disk
    assert seen["after"] is True  # the disks work again: so do puts, no restart
    assert seen["running"] is True and not r.violations, r.violations


def test_one_full_disk_does_not_fail_a_put() -> None:
    holder: list[_FaultyDisks] = []

    def make(cfg, root, result):  # type: ignore[no-untyped-def]
        holder.append(type("S", (_FaultyDisks,), {"faulty": 1})(cfg, root, result))
        return holder[0]

    run_seed(SimConfig(seed=1, nodes=3, faults=False), make)  # type: ignore[arg-type]
    assert holder[0].seen["put"] == "ok"  # the other two replicas make the quorum


def test_the_foundations_check_looks_through_the_disk_seam(tmp_path) -> None:
    """`Node.foundations_problem` (asked after a worker failure) used ``os.path.isdir`` on
    `cfg.data_dir`: a simulated node's data dir is not on the OS, so its first worker
    failure would have stopped it; a tuple `data_dir` (several disks) raised TypeError."""
    import dataclasses
    import shutil

    from blocknode.config import DataDir, load_config
    from blocknode.node import Node
    from tests.cluster.harness import write_cluster

    holder: list[Sim] = []

    class _Check(Sim):
        async def main(self) -> None:
            async with trio.open_nursery() as nursery:
                await self.start(nursery, self.ids[0])
                holder.append(self)
                self.problem = self.nodes[self.ids[0]].foundations_problem()
                nursery.cancel_scope.cancel()

    run_seed(SimConfig(seed=1, nodes=3, faults=False), _Check)
    assert holder[0].problem is None  # type: ignore[attr-defined]

    cfg = load_config(write_cluster(tmp_path, 1, rf=1)[0])
    a, b = tmp_path / "d1", tmp_path / "d2"
    cfg = dataclasses.replace(cfg, data_dir=(DataDir(str(a)), DataDir(str(b))))
    a.mkdir()
    b.mkdir()
    node = Node(cfg)
    try:
        assert node.foundations_problem() is None
        shutil.rmtree(a)
        assert node.foundations_problem() is None  # one disk of two left: the node runs on
        shutil.rmtree(b)
        problem = node.foundations_problem()
        assert problem is not None and str(a) in problem and "is gone" in problem
    finally:
        node.meta.close()
