"""Issue 13 part 3: cluster-wide admin (`-a` / `--all-nodes`), Garage's setting names, the
cluster overview of `status`. The CLI runs as a process against in-process nodes."""

from __future__ import annotations

import json
import sys

import trio

from tests.cluster.harness import in_process_cluster


async def cli(*args: str, config) -> tuple[int, str, str]:
    r = await trio.run_process([sys.executable, "-m", "blocknode", *args, "--config", str(config)],
                               capture_stdout=True, capture_stderr=True, check=False)
    return r.returncode, r.stdout.decode(), r.stderr.decode()


async def until_keys_replicated(cl) -> None:
    """The admin key node1 made reaches the other nodes (key anti-entropy, run now)."""
    for node in cl.nodes.values():
        await node.keys.sync_round()


async def test_worker_set_all_nodes_reaches_every_node(tmp_path):
    with trio.fail_after(90):
        async with in_process_cluster(tmp_path, 3) as cl:
            cfg = tmp_path / "node1" / "config.toml"
            await until_keys_replicated(cl)
            code, out, err = await cli("worker", "set", "-a", "resync-tranquility", "7", config=cfg)
            assert code == 0, err
            for nid in ("node1", "node2", "node3"):
                assert cl.nodes[nid].resync.tranquility == 7
                assert f"{nid}" in out
            # Garage's name for resync-workers, on every node
            code, out, err = await cli("worker", "set", "--all-nodes", "resync-worker-count", "3",
                                       config=cfg)
            assert code == 0, err
            assert all(n.resync.workers == 3 for n in cl.nodes.values())
            code, out, err = await cli("worker", "get", "-a", "resync-worker-count", "--json",
                                       config=cfg)
            assert code == 0, err
            got = json.loads(out)
            assert set(got) == {"node1", "node2", "node3"}
            assert all(v[0]["name"] == "resync-workers" and v[0]["value"] == 3 for v in got.values())
            code, out, err = await cli("worker", "list", "-a", config=cfg)
            assert code == 0, err
            assert out.count("== node") == 3
            code, out, err = await cli("block", "list-errors", "-a", "--json", config=cfg)
            assert code == 0 and json.loads(out) == {"node1": [], "node2": [], "node3": []}, err
            code, out, err = await cli("scrub", "set-tranquility", "0", "-a", config=cfg)
            assert code == 0, err
            assert all(n.scrub.st["tranquility"] == 0 for n in cl.nodes.values())

            # the overview: one row per node, with a header
            code, out, err = await cli("status", config=cfg)
            assert code == 0, err
            lines = out.splitlines()
            assert lines[0].split()[:5] == ["NODE", "ZONE", "CAPACITY", "ADDRESS", "UP"]
            assert all(any(ln.startswith(nid) for ln in lines) for nid in ("node1", "node2", "node3"))
            assert "None" not in out

            # a node down: reported, the others still done, exit 1
            await cl.stop("node3")
            code, out, err = await cli("worker", "set", "-a", "scrub-tranquility", "2", config=cfg)
            assert code == 1 and "node3: error" in err
            assert cl.nodes["node1"].scrub.st["tranquility"] == 2
            assert cl.nodes["node2"].scrub.st["tranquility"] == 2
            code, out, err = await cli("status", config=cfg)
            assert code == 0, err
            row3 = next(ln for ln in out.splitlines() if ln.startswith("node3"))
            assert "no" in row3.split()
