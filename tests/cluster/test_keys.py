"""Who may do what (issue 10 parts 1 and 4): client keys, their permissions, their
revocation on every node, and nodes apart from clients. Three nodes in this process.

Each node made its own admin key on first start (`nodeK/admin_key`, every
permission); the keys below are made with it through the key commands' RPCs.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from blocknode import fastpath
from blocknode.auth import load_client_key, required_permission
from blocknode.client import Client, open_client
from blocknode.errors import (
    AuthenticationError,
    ConfigError,
    Forbidden,
    NodeUnreachable,
    RemoteError,
)
from blocknode.protocol import (
    ADMIN_BLOCK_INFO,
    ADMIN_BLOCK_PURGE,
    ADMIN_KEY_CREATE,
    ADMIN_KEY_DELETE,
    ADMIN_KEY_LIST,
    ADMIN_REPAIR,
    ADMIN_SCRUB,
    ADMIN_WORKER_SET,
    REPLICA_KINDS,
)
from blocknode.rpc.connect import open_client as open_rpc_client
from blocknode.rpc.connect import open_connection
from blocknode.rpc.handshake import ClientKey
from tests.cluster.harness import InProcessCluster, in_process_cluster


async def make_key(cl: InProcessCluster, name: str, *perms: str, via: str = "node1") -> ClientKey:
    key = ClientKey.generate()
    async with cl.client(via) as admin:
        reply, _ = await admin.call(ADMIN_KEY_CREATE, {"name": name, "id": key.id,
                                                       "permissions": list(perms),
                                                       "verifier": key.verifier})
    assert reply["nodes"] == reply["of"] == len(cl.nodes)
    return key


@asynccontextmanager
async def as_key(cl: InProcessCluster, node_id: str, key: ClientKey) -> AsyncIterator[Client]:
    async with open_client(cl.cfg(node_id), key=key, timeout=10) as c:
        yield c


async def refs(cl: InProcessCluster, h: bytes) -> dict[str, list[tuple[str, bool]]]:
    """Each node's references of `h` (ref id, deleted), as its admin sees them."""
    out = {}
    for nid in cl.nodes:
        async with cl.client(nid) as admin:
            info, _ = await admin.call(ADMIN_BLOCK_INFO, {"hash": h})
        out[nid] = sorted((r["ref_id"], r["deleted"]) for r in info["refs"])
    return out


async def test_each_permission_allows_its_commands_and_nothing_else(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 3) as cl:
            reader = await make_key(cl, "reader", "read")
            writer = await make_key(cl, "writer", "write")
            operator = await make_key(cl, "operator", "admin")
            data = b"written by the writer"
            h = fastpath.block_hash(data)

            # without write: no put, no ref, no unref, and nothing written anywhere
            async with as_key(cl, "node2", reader) as c:
                for attempt in (c.put(b"a reader's block", "r"), c.put(os.urandom(300_000), "r")):
                    with pytest.raises(Forbidden, match="lacks the 'write' permission") as info:
                        await attempt
                    assert info.value.permission == "write"  # type: ignore[attr-defined]
            async with as_key(cl, "node2", writer) as c:
                assert await c.put(data, "doc") == h.hex()
                with pytest.raises(Forbidden, match="'read'"):  # a writer cannot read
                    await c.get(h.hex())
            async with as_key(cl, "node3", reader) as c:
                assert await c.get(h.hex()) == data
                with pytest.raises(Forbidden, match="'write'"):
                    await c.unref(h.hex(), "doc")
                with pytest.raises(Forbidden, match="'write'"):
                    await c.ref(h.hex(), "other")
                assert (await c.status())["node_id"] == "node3"  # any key may ask
            assert await refs(cl, fastpath.block_hash(b"a reader's block")) == {n: [] for n in cl.nodes}

            # without admin: no scrub, no purge, no repair, no worker or key management
            for key in (reader, writer):
                async with as_key(cl, "node1", key) as c:
                    for kind, fields in [(ADMIN_SCRUB, {"action": "start"}),
                                         (ADMIN_BLOCK_PURGE, {"hash": h}),
                                         (ADMIN_REPAIR, {"action": "start"}),
                                         (ADMIN_WORKER_SET, {"name": "resync-workers", "value": 2}),
                                         (ADMIN_KEY_LIST, {}),
                                         (ADMIN_KEY_DELETE, {"name": "reader"})]:
                        with pytest.raises(Forbidden, match="lacks the 'admin' permission"):
                            await c.call(kind, fields)
            assert {n: r for n, r in (await refs(cl, h)).items()} == {
                n: [("doc", False)] for n in cl.nodes}  # the purge did not happen
            assert cl.nodes["node1"].scrub.status()["state"] != "running"

            # admin alone: the admin commands, but no data
            async with as_key(cl, "node1", operator) as c:
                st, _ = await c.call(ADMIN_SCRUB, {"action": "status"})
                assert "state" in st
                listed, _ = await c.call(ADMIN_KEY_LIST, {})
                assert {"reader", "writer", "operator"} <= {k["name"] for k in listed["keys"]}
                assert all(set(k) == {"id", "name", "permissions", "created"} for k in listed["keys"])
                with pytest.raises(Forbidden, match="'write'"):
                    await c.put(b"x", "r")
                with pytest.raises(Forbidden, match="'read'"):
                    await c.get(h.hex())


async def test_a_client_key_cannot_call_any_node_internal_kind(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 3) as cl:
            async with cl.client("node1") as admin:  # every permission
                known = bytes.fromhex(await admin.put(b"a block with one reference", "r"))
            new = os.urandom(2000)
            new_h = fastpath.block_hash(new)
            row = [[known, "evil", True, 2**62]]
            attempts: dict[str, tuple[dict[str, Any], bytes | None]] = {
                "put_block": ({"hash": new_h, "ref_id": "evil", "ts": 1}, new),
                "put_blocks": ({"items": [[new_h, "evil", 1, len(new)]]}, new),
                "get_block": ({"hash": known}, None),
                "need_block": ({"hash": known}, None),
                "add_ref": ({"hash": new_h, "ref_id": "evil", "ts": 1}, None),
                "del_ref": ({"hash": known, "ref_id": "r", "ts": 2**62}, None),
                "ae_digests": ({"prefixes": [known[:1]]}, None),
                "ae_exchange": ({"prefix": known[:1], "refs": row}, None),
                "key_put": ({"keys": [[ClientKey.generate().id, 1, False, "mine", ["admin"],
                                       os.urandom(32), 1]]}, None),
                "key_sync": ({"digest": b"", "after": ""}, None),
                "layout_sync": ({"state": {}, "digest": b""}, None),
            }
            assert set(attempts) == REPLICA_KINDS  # every node-internal kind is tried
            for nid in cl.nodes:
                async with cl.client(nid) as c:
                    for kind, (fields, data) in attempts.items():
                        assert required_permission(kind) == "node"
                        with pytest.raises(Forbidden, match="node-internal") as info:
                            await c.call(kind, fields, data)
                        assert info.value.permission == "node", kind  # type: ignore[attr-defined]
            for nid, node in cl.nodes.items():
                assert not await node.blocks.aexists(new_h), nid
                assert "mine" not in {k.name for k in node.keys.live_keys()}, nid
            assert await refs(cl, new_h) == {n: [] for n in cl.nodes}
            assert await refs(cl, known) == {n: [("r", False)] for n in cl.nodes}


async def test_a_revoked_key_stops_working_on_every_node(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 3) as cl:
            key = await make_key(cl, "app", "read", "write", via="node1")
            async with as_key(cl, "node2", key) as c2, as_key(cl, "node3", key) as c3:
                h = await c2.put(b"before the revocation", "app")
                assert await c3.get(h) == b"before the revocation"

                async with cl.client("node1") as admin:
                    reply, _ = await admin.call(ADMIN_KEY_DELETE, {"name": "app"})
                assert reply["deleted"] == [{"id": key.id, "name": "app"}]
                assert reply["nodes"] == reply["of"] == 3

                # the connections open with the key were closed, on every node; the
                # client's reconnect is refused: the key is unknown now
                for c in (c2, c3):
                    with pytest.raises(AuthenticationError, match=f"does not know client key {key.id}"):
                        await c.get(h)
            for nid, node in cl.nodes.items():
                assert node.keys.permissions(key.id) is None, nid
                with pytest.raises(AuthenticationError, match=f"does not know client key {key.id}"):
                    async with as_key(cl, nid, key) as c:
                        await c.status()
            async with cl.client("node2") as admin:
                listed, _ = await admin.call(ADMIN_KEY_LIST, {})
            assert key.id not in {k["id"] for k in listed["keys"]}


async def test_a_node_that_was_down_catches_up_by_key_sync(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 3) as cl:
            old = await make_key(cl, "old", "read")
            await cl.stop("node3")
            new = ClientKey.generate()
            async with cl.client("node1") as admin:
                reply, _ = await admin.call(ADMIN_KEY_CREATE, {
                    "name": "new", "id": new.id, "permissions": ["read"], "verifier": new.verifier})
                assert (reply["nodes"], reply["of"]) == (2, 3)
                await admin.call(ADMIN_KEY_DELETE, {"name": "old"})
            node3 = await cl.start("node3")
            assert node3.keys.permissions(old.id) is not None  # what it knew when it stopped
            while node3.keys.permissions(new.id) is None or node3.keys.permissions(old.id) is not None:
                await trio.sleep(0.1)  # its first key sync runs a second after start
            async with as_key(cl, "node3", new) as c:
                assert (await c.status())["node_id"] == "node3"
            digests = {n.keys.table.digest() for n in cl.nodes.values()}
            assert len(digests) == 1


async def test_a_client_cannot_authenticate_as_a_node(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 3) as cl:
            cfg = cl.cfg("node1")
            key = load_client_key(cfg)  # the admin key: every permission
            for claim in ("node2", "node1", key.id):  # members' ids, and its own
                with pytest.raises((AuthenticationError, NodeUnreachable)):
                    conn = await open_connection(cfg.public_addr, key.secret, local_id=claim,
                                                 connect_timeout=5, handshake_timeout=5)
                    await conn.aclose()
            # honestly authenticated, it is a client: budgets and caps of a client
            async with open_rpc_client(cfg.public_addr, key, timeout=5) as conn:
                await conn.call("status", {}, timeout=5)
                status = cl.nodes["node1"].net.connection_status()
                assert status["clients"] == 1 and status["nodes"] == 2
                (incoming,) = [c for c in cl.nodes["node1"].net._incoming if not c.peer.is_node]
                assert incoming.peer.id == key.id and incoming._request_budget is not None


async def test_key_commands_refuse_bad_input(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 1, rf=1) as cl:
            await make_key(cl, "dup", "read")
            other = ClientKey.generate()
            async with cl.client("node1") as admin:
                for fields in ({"name": "dup"}, {"name": ""}, {"name": "x", "permissions": []},
                               {"name": "x", "permissions": ["root"]}, {"name": "x", "id": "BK1"},
                               {"name": "x", "verifier": b"short"}):
                    full = {"name": "x", "id": other.id, "permissions": ["read"],
                            "verifier": other.verifier, **fields}
                    with pytest.raises(RemoteError) as info:
                        await admin.call(ADMIN_KEY_CREATE, full)
                    assert info.value.code == "bad_request", fields  # type: ignore[attr-defined]
                with pytest.raises(RemoteError, match="no key named 'nobody'"):
                    await admin.call(ADMIN_KEY_DELETE, {"name": "nobody"})
                listed, _ = await admin.call(ADMIN_KEY_LIST, {})
            assert sorted(k["name"] for k in listed["keys"]) == ["admin@node1", "dup"]


async def test_a_node_that_cannot_write_its_admin_key_runs_on_and_says_so(tmp_path: Path,
                                                                         caplog) -> None:
    # As under the systemd unit, where only data_dir and metadata_dir are writable.
    blocker = tmp_path / "read-only"
    blocker.write_text("a file where a directory would be")
    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 1, rf=1,
                                      admin_key_file=str(blocker / "admin_key")) as cl:
            assert cl.nodes["node1"].keys.live_keys() == []
            assert "cannot make the admin key file" in caplog.text
            with pytest.raises(ConfigError, match="no client key"):
                async with cl.client("node1"):
                    pass
            key = ClientKey.generate()
            (tmp_path / "admin_key").write_text(f"{key}\n")  # an operator-made key file
            (tmp_path / "admin_key").chmod(0o600)
    cfg = replace(cl.configs[0], admin_key_file=str(tmp_path / "admin_key"))
    async with trio.open_nursery() as nursery:
        cl2 = InProcessCluster([cfg], nursery)
        node = await cl2.start("node1")
        assert [k.name for k in node.keys.live_keys()] == ["admin"]  # added at start
        async with as_key(cl2, "node1", key) as c:
            await c.call(ADMIN_KEY_LIST, {})
        nursery.cancel_scope.cancel()
