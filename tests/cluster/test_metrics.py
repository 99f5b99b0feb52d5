"""Issue 13 part 1: `/metrics` (Prometheus, per-node registry) and `/health` on the admin listener."""

from __future__ import annotations

import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from blocknode.config import config_from_dict
from tests.cluster.harness import in_process_cluster

TOKEN = "s3cret-token"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _http(addr: str, path: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://{addr}{path}")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - a local test URL
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _raw(addr: str, request: bytes) -> int:
    """Send raw bytes; the status code of the answer."""
    host, _, port = addr.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        head = sock.recv(4096)
    return int(head.split(b" ", 2)[1])


async def http(addr: str, path: str, token: str | None = None) -> tuple[int, str]:
    return await trio.to_thread.run_sync(_http, addr, path, token)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got: dict, name: str, **labels: str) -> float:
    return got.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_series_move_under_load_and_need_the_token(tmp_path):
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 3, admin_api_bind_addr="127.0.0.1:0",
                                      metrics_token=TOKEN) as cl:
            node = cl.nodes["node1"]
            assert node.admin_addr is not None
            status, body = await http(node.admin_addr, "/metrics")
            assert status == 401 and "bearer" in body.lower()
            status, body = await http(node.admin_addr, "/metrics", token="wrong")
            assert status == 401
            status, before_text = await http(node.admin_addr, "/metrics", TOKEN)
            assert status == 200
            before = samples(before_text)

            datas = [os.urandom(100_000) for _ in range(3)] + [b"small %d" % i for i in range(5)]
            async with cl.client("node1") as c:
                hashes = [await c.put(d, "obj") for d in datas]
                for h, d in zip(hashes, datas, strict=True):
                    assert await c.get(h) == d
                node.scrub.st["tranquility"] = 0
                await node.scrub.start()
                await node.scrub.run_to_completion()
                await node.anti_entropy.run_round()

            status, text = await http(node.admin_addr, "/metrics", TOKEN)
            assert status == 200
            after = samples(text)
            client_ok = sum(v for (n, lb), v in after.items()
                            if n == "blocknode_requests_total" and ("source", "client") in lb
                            and ("outcome", "ok") in lb)
            assert client_ok >= len(datas) * 2
            assert value(after, "blocknode_requests_total", source="node", kind="put_block",
                         outcome="ok") >= 0  # node-to-node series exist on the replicas
            assert value(after, "blocknode_put_duration_seconds_count") > \
                value(before, "blocknode_put_duration_seconds_count")
            assert value(after, "blocknode_get_duration_seconds_count") >= 3
            assert value(after, "blocknode_request_received_bytes_total", source="client") >= 300_000
            assert value(after, "blocknode_reply_sent_bytes_total", source="client") >= 300_000
            assert value(after, "blocknode_blocks") >= len(datas)
            assert value(after, "blocknode_inline_blocks") >= 5
            assert value(after, "blocknode_scrub_blocks_checked") >= len(datas)
            assert value(after, "blocknode_scrub_checked_bytes_total") >= 300_000
            assert value(after, "blocknode_scrub_progress_ratio") == 1.0
            assert value(after, "blocknode_anti_entropy_rounds_total") >= 1
            assert value(after, "blocknode_peer_up", peer="node2") == 1
            assert value(after, "blocknode_peer_up", peer="node3") == 1
            assert value(after, "blocknode_lmdb_map_used_bytes") > 0
            assert value(after, "blocknode_lmdb_map_size_bytes") == 1 << 28
            assert value(after, "blocknode_ram_buffer_max_bytes", budget="send") > 0
            assert value(after, "blocknode_healthy") == 1
            assert ("blocknode_build_info", (("fast_path", node.status()["fast_path"]),
                                             ("node_id", "node1"),
                                             ("version", node.status()["version"]))) in after
            # every series the Grafana dashboard graphs exists
            dashboard = (DEPLOY / "grafana-dashboard.json").read_text()
            for name in set(re.findall(r"blocknode_[a-z_]+", dashboard)):
                assert re.sub(r"_(total|bucket)$", "", name) in text, name
            # each node has its own registry: node2 counts no client requests
            status, text2 = await http(cl.nodes["node2"].admin_addr, "/metrics", TOKEN)
            assert sum(v for (n, lb), v in samples(text2).items()
                       if n == "blocknode_requests_total" and ("source", "client") in lb) == 0


async def test_health_flips_to_503_when_quorum_is_lost(tmp_path):
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 3, admin_api_bind_addr="127.0.0.1:0",
                                      metrics_token=TOKEN) as cl:
            addr = cl.nodes["node1"].admin_addr
            assert await http(addr, "/health") == (200, "ok\n")  # no token needed
            await cl.stop("node3")
            assert (await http(addr, "/health"))[0] == 200  # 2 of 3: the write quorum
            await cl.stop("node2")
            while True:
                status, body = await http(addr, "/health")
                if status == 503:
                    break
                await cl.nodes["node1"].net.check_peers()
                await trio.sleep(0.1)
            assert "write_quorum=2" in body and "node2" in body and "node3" in body
            async with cl.client("node1") as c:
                for data in (b"tiny", os.urandom(100_000)):  # batched, then a single put
                    try:
                        await c.put(data, "r")
                    except Exception:  # noqa: BLE001, S110 - the quorum failure is the point
                        pass
            status, text = await http(addr, "/metrics", TOKEN)
            got = samples(text)
            assert value(got, "blocknode_healthy") == 0
            assert value(got, "blocknode_peer_up", peer="node2") == 0
            assert sum(v for (n, _), v in got.items() if n == "blocknode_quorum_failures_total") >= 2
            assert sum(v for (n, lb), v in got.items() if n == "blocknode_requests_total"
                       and ("outcome", "quorum_failed") in lb) >= 1  # the single put
            assert (await http(addr, "/nope"))[0] == 404
            assert await trio.to_thread.run_sync(_raw, addr, b"POST /health HTTP/1.1\r\nHost: x\r\n"
                                                 b"Content-Length: 0\r\n\r\n") == 405
            assert await trio.to_thread.run_sync(_raw, addr, b"GARBAGE\r\n\r\n") == 400
            await cl.start("node2")
            await cl.nodes["node1"].net.check_peers()
            with trio.fail_after(20):
                while (await http(addr, "/health"))[0] != 200:
                    await trio.sleep(0.1)


def test_admin_table_and_defaults():
    cfg = config_from_dict({"admin": {"api_bind_addr": "127.0.0.1:3903", "metrics_token": "tok-xyz"}},
                           source="x.toml")
    assert cfg.admin_api_bind_addr == "127.0.0.1:3903" and cfg.metrics_token == "tok-xyz"
    assert "tok-xyz" not in repr(cfg)
    assert config_from_dict({}, source="x.toml").admin_api_bind_addr is None  # off in a file
    from blocknode.config import NodeConfig
    assert NodeConfig().admin_api_bind_addr == "127.0.0.1:3903"  # on for the embedded default


async def test_resync_and_anti_entropy_series_move(tmp_path):
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 3, admin_api_bind_addr="127.0.0.1:0") as cl:
            await cl.stop("node3")
            data = os.urandom(200_000)
            async with cl.client("node1") as c:
                h = await c.put(data, "r")
            node3 = await cl.start("node3")
            await node3.anti_entropy.run_round()  # learns the reference (its resync is queued)
            await node3.resync.resync_block(bytes.fromhex(h))  # fetched from the others now
            got = samples((await http(node3.admin_addr, "/metrics"))[1])
            assert value(got, "blocknode_anti_entropy_refs_merged_total", direction="here") >= 1
            assert value(got, "blocknode_resync_bytes_total", direction="fetched") >= 100_000
            assert value(got, "blocknode_resync_queue_length") >= 1  # due later: still queued
            assert value(got, "blocknode_blocks") >= 1
            # a corrupt copy found by a scrub: counted and quarantined
            copy = node3.files.copies(bytes.fromhex(h))[0]
            with open(copy.path, "r+b") as f:
                f.write(b"\xff" * 16)
            node3.scrub.st["tranquility"] = 0
            await node3.scrub.start()
            await node3.scrub.run_to_completion()
            got = samples((await http(node3.admin_addr, "/metrics"))[1])
            assert value(got, "blocknode_scrub_corruptions") == 1
            assert value(got, "blocknode_blocks_quarantined_total") == 1
