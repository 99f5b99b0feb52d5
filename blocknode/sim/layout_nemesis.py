"""The layout nemesis of the simulation (`SimConfig.layout_changes`, ``--layout-changes``).

A mixin of `blocknode.sim.run.Sim`. With it, the cluster file lists every node but
the last (a *spare*, running but in no layout; none with 3 nodes), which starts
with only `bootstrap_peers` (it fetches the layout and shows as known), and, during
the chaos, 1–3 layout changes are made (the first 1–4 s in) through the admin RPCs the `layout` CLI
uses (`admin_layout_show`, `_assign`, `_remove`, `_apply`): add a node that is
not in the layout, remove one (never below rf nodes; it may be down: a dead node
removed), or change a capacity; after an apply, sometimes a node of the new
version crashes mid-migration (restarted 2–40 s later). Changes may pile up:
several versions live at once.

Heal (`settle_layout`): gossip, layout-sync and resync rounds until every node
has the same newest version and only it is live (the migration finished and the
old versions retired), then one more layout-sync step everywhere (a node drops
the partitions it left); the GC delay that follows collects their blocks.

Extra invariants (`check_layout`), on top of `Sim.check` (which takes the newest
layout's replicas as the required holders):

- migration stuck: the newest version did not retire everywhere within `SETTLE_BOUND`;
- misplaced: a node holds a reference, or a copy of a live block, of a partition
  the final layout does not give it (old copies not handed over and dropped).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any, Final

import trio

from blocknode.client.api import Client
from blocknode.config import NodeConfig
from blocknode.protocol import (
    ADMIN_LAYOUT_APPLY,
    ADMIN_LAYOUT_ASSIGN,
    ADMIN_LAYOUT_REMOVE,
    ADMIN_LAYOUT_SHOW,
)

__all__ = ["SETTLE_BOUND", "LayoutNemesis"]

SETTLE_BOUND: Final = 600.0
"""Simulated seconds the healed cluster has to finish every migration."""


class LayoutNemesis:
    """Layout changes during the chaos, their settling, their invariants (module docstring)."""

    # Provided by `Sim` (declared for the type checker).
    ids: list[str]
    addrs: dict[str, str]
    nodes: dict[str, Any]
    res: Any
    chaos: bool
    rng: random.Random
    spares: list[str]
    cfgs: dict[str, NodeConfig]

    def layout_init(self, cluster_file: str) -> None:
        """Rewrite the cluster file without the spare (the last node, with 4+ nodes); the
        spare has no cluster file but `bootstrap_peers` (two nodes of the layout): it
        joins as a new node of a real cluster does (`blocknode.bootstrap`)."""
        self.spares = self.ids[-1:] if len(self.ids) >= 4 else []
        for nid in self.spares:
            self.cfgs[nid] = replace(self.cfgs[nid], cluster_file=None, bootstrap_peers=tuple(
                self.addrs[n] for n in self.ids[:2]))
        lines = ["replication_factor = 3"]
        for i, nid in enumerate(self.ids):
            if nid not in self.spares:
                lines += ["[[nodes]]", f'id = "{nid}"', f'addr = "{self.addrs[nid]}"',
                          f'zone = "z{i % 3 + 1}"']
        with open(cluster_file, "w") as f:
            f.write("\n".join(lines) + "\n")

    async def layout_nemesis(self, nursery: trio.Nursery) -> None:
        """1–3 layout changes at random times during the chaos."""
        rng = random.Random(self.rng.getrandbits(64))
        await trio.sleep(rng.uniform(1, 4))
        for i in range(rng.randint(1, 3)):
            if not self.chaos and i:  # the first one even after a short chaos (before settling)
                return
            await self.layout_change(rng, nursery)
            await trio.sleep(rng.expovariate(1 / 10))

    async def _admin(self, nid: str, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        async with self.client(nid) as conn:  # type: ignore[attr-defined]
            reply, _ = await Client(conn, block_size=8192, timeout=10.0).call(kind, fields)
            return reply

    async def layout_change(self, rng: random.Random, nursery: trio.Nursery) -> None:
        """One change: show, stage (add, remove or capacity), apply; maybe a crash after."""
        up = [n for n in self.ids if n in self.nodes and self.nodes[n].layout.has_node(n)]
        if not up:
            return
        nid = rng.choice(up)
        try:
            with trio.fail_after(30):
                show = await self._admin(nid, ADMIN_LAYOUT_SHOW, {})
                current = {n["id"]: n for n in show["nodes"]}
                rf = show["replication_factor"]
                outside = [n for n in self.ids if n not in current]
                choices = ["capacity"] + (["add"] if outside else []) + \
                    (["remove"] if len(current) > rf else [])
                what = rng.choice(choices)
                if what == "add":
                    new = rng.choice(outside)
                    fields: dict[str, Any] = {"node": new, "zone": f"z{self.ids.index(new) % 3 + 1}",
                                              "capacity": rng.randint(1, 3),
                                              "addr": self.addrs[new]}
                    await self._admin(nid, ADMIN_LAYOUT_ASSIGN, fields)
                elif what == "remove":
                    fields = {"node": rng.choice(sorted(current))}
                    await self._admin(nid, ADMIN_LAYOUT_REMOVE, fields)
                else:
                    node = current[rng.choice(sorted(current))]
                    fields = {"node": node["id"], "zone": node["zone"],
                              "capacity": rng.choice([c for c in (1, 2, 3, 4)
                                                      if c != node["capacity"]])}
                    await self._admin(nid, ADMIN_LAYOUT_ASSIGN, fields)
                version = show["version"] + 1
                await self._admin(nid, ADMIN_LAYOUT_APPLY, {"version": version})
        except Exception as exc:  # noqa: BLE001 - a change may fail under faults
            self.res.faults["layout_fail"] += 1
            self.event(f"layout change via {nid} failed: {type(exc).__name__}: {exc}"[:200])  # type: ignore[attr-defined]
            return
        self.res.faults[f"layout_{what}"] += 1
        self.event(f"layout v{version} via {nid}: {what} {fields}")  # type: ignore[attr-defined]
        alive = [n for n in self.ids if n in self.nodes]
        # (no crash once the faults have stopped: a change begun in the chaos may end in the heal)
        if (self.cfg.faults and rng.random() < 0.4 and len(alive) > len(self.ids) - 2  # type: ignore[attr-defined]
                and self.chaos):  # type: ignore[attr-defined]
            victim = rng.choice([n for n in alive if n in current or n == fields["node"]])
            await self.crash(victim)  # type: ignore[attr-defined]
            self.res.faults["layout_crash"] += 1
            nursery.start_soon(self.restart_later, nursery, victim,  # type: ignore[attr-defined]
                               rng.uniform(2, 40), None)

    async def settle_layout(self) -> None:
        """Heal: drive gossip, layout sync and resync until one version is live everywhere."""
        t0 = trio.current_time()
        each = self.each  # type: ignore[attr-defined]
        while True:
            states = [self.nodes[n].layouts.state for n in self.ids]
            top = max(s.current for s in states)
            if all(s.current == top and s.live == [top] for s in states):
                break
            if trio.current_time() - t0 > SETTLE_BOUND:
                self.violation(  # type: ignore[attr-defined]
                    "migration stuck: " + "; ".join(
                        f"{n}: v{s.current} live {s.live} pending {s.pending_sync()}"
                        for n, s in zip(self.ids, states, strict=True)))
                return
            await each("layout gossip", lambda node: node.layouts.sync_round())
            await each("layout sync", lambda node: node.layout_sync.run_once())
            await each("resync", lambda node: node.resync.run_once())
            await trio.sleep(5)
        await each("layout drop", lambda node: node.layout_sync.run_once())
        self.event(f"layout v{top} settled everywhere after "  # type: ignore[attr-defined]
                   f"{trio.current_time() - t0:.1f}s")

    async def check_layout(self) -> None:
        """Every reference and every copy of a live block is on a node of its partition."""
        layout = self.nodes[self.ids[0]].layout
        if layout.migrating:
            return  # reported as "migration stuck"
        live = {h for (h, _r), s in self.pairs.items() if s == "live"}  # type: ignore[attr-defined]
        for nid in self.ids:
            node = self.nodes[nid]
            stray = sorted({r.hash[0] for r in node.meta.iter_refs()
                            if nid not in layout.nodes_of(r.hash)})
            if stray:
                self.violation(f"misplaced: {nid} keeps references of partitions {stray} "  # type: ignore[attr-defined]
                               f"it does not hold in v{layout.version}")
            for h in sorted(live):
                if nid not in layout.nodes_of(h) and node.blocks.exists(h):
                    self.violation(f"misplaced: {nid} keeps a copy of {h.hex()[:16]} "  # type: ignore[attr-defined]
                                   f"(replicas {list(layout.nodes_of(h))} in v{layout.version})")
