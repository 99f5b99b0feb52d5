"""Server-side authentication, seen from outside: a running node over real loopback TCP.

A client with a wrong key is refused by its own side of the handshake (the
server's proof does not verify), so it never tests the server. The intruder
here does what an attacker would: it ignores the server's proof and sends a
proof it cannot make without the credential — claiming to be a node (a member's
id, without the cluster secret) or a client (a made-up key id, or a real one
without its secret) — followed at once by requests sealed with keys of its
own. The node must close the connection at the handshake, answer nothing, and
store nothing.

The handshake frames are built by hand from the wire format (a 4-byte
big-endian length, then a msgpack map; see `blocknode.rpc.handshake`).
"""

from __future__ import annotations

import os
from typing import Any

import msgpack
import pytest
import trio

from blocknode import fastpath
from blocknode.errors import AuthenticationError
from blocknode.protocol import ADMIN_BLOCK_INFO
from blocknode.rpc.connect import open_client as open_rpc_client
from blocknode.rpc.handshake import PROTOCOL_VERSION, ClientKey, SessionKeys
from blocknode.rpc.session import Session
from blocknode.rpc.wire import MSG_REQUEST, OutgoingMessage, encode_head
from tests.cluster.harness import InProcessCluster, in_process_cluster

CLOSE_WITHIN = 5.0
"""A refused handshake closes at once; a node that accepted it would wait for requests."""


def frame(obj: dict[str, Any]) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


async def read_frame(stream: trio.SocketStream) -> dict[str, Any]:
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
        chunk = await stream.receive_some(4096)
        assert chunk, "the node closed the connection before its hello"
        buf += chunk
    n = int.from_bytes(buf[:4], "big")
    assert len(buf) == 4 + n, "the node sent more than its hello before the client proof"
    return msgpack.unpackb(buf[4:], raw=False)


async def rest_until_closed(stream: trio.SocketStream) -> bytes:
    """Every byte the node sends until it closes (a reset counts as closed)."""
    got = b""
    with trio.move_on_after(CLOSE_WITHIN):
        while True:
            try:
                chunk = await stream.receive_some(4096)
            except trio.BrokenResourceError:
                return got
            if not chunk:
                return got
            got += chunk
    raise AssertionError(
        f"the node kept the connection open {CLOSE_WITHIN} s after a forged client proof "
        f"(it accepted the handshake); it sent {len(got)} bytes"
    )


def sealed_requests(requests: list[tuple[str, dict[str, Any], bytes | None]]) -> bytes:
    """Requests framed and sealed as on an established session, with keys made up
    by the intruder (it cannot derive the real ones without the secret)."""
    session = Session(SessionKeys("node1", os.urandom(32), os.urandom(32)))
    for sid, (kind, fields, data) in enumerate(requests, 1):
        head = encode_head(MSG_REQUEST, kind, fields, data is not None)
        session.queue(OutgoingMessage(sid, False, head, memoryview(data) if data is not None else None))
    out = b""
    while session.pending:
        view, _ = session.data_to_send()
        out += bytes(view)
    return out


async def intrude(addr: str, after_proof: bytes = b"", *, role: str = "node",
                  claim: str = "node2") -> bytes:
    """Handshake without the credential, claiming to be `claim` (a node id or a client
    key id); returns what the node sent after its hello."""
    host, _, port = addr.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        await stream.send_all(frame({"t": "hello", "v": PROTOCOL_VERSION, "role": role,
                                     "id": claim, "nonce": os.urandom(32)}))
        hello = await read_frame(stream)
        assert hello["t"] == "hello" and hello["id"] == "node1"
        # The server's proof is not checked (an attacker does not care); the client
        # proof is a guess, as it must be without the secret.
        await stream.send_all(frame({"t": "finish", "mac": os.urandom(32)}) + after_proof)
        return await rest_until_closed(stream)
    finally:
        await stream.aclose()


async def _info(cl: InProcessCluster, node_id: str, h: bytes) -> dict[str, Any]:
    async with cl.client(node_id) as c:
        reply, _ = await c.call(ADMIN_BLOCK_INFO, {"hash": h})
    return reply


async def test_wrong_secret_cannot_put_get_or_probe_a_running_node(tmp_path):
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 3) as cl:
            node = cl.nodes["node1"]
            addr = cl.cfg("node1").public_addr
            async with cl.client("node1") as c:
                known = bytes.fromhex(await c.put(b"a block the intruder would like to find", "r"))
            new = os.urandom(2000)
            new_h = fastpath.block_hash(new)
            before_failures = node.net.handshake_failures

            # 1. The forged proof alone: the node closes the connection at once, saying
            #    nothing more, and counts a refused handshake. (A node that accepted the
            #    proof would sit waiting for requests: `intrude` would time out.)
            assert await intrude(addr) == b""
            assert node.net.handshake_failures == before_failures + 1

            # 2. The forged proof followed by requests: put, get, "do you need/have it?".
            requests = [
                ("put_block", {"hash": new_h, "ref_id": "evil", "ts": 1}, new),
                ("put_blocks", {"items": [[new_h, "evil", 1, len(new)]]}, new),
                ("client_put", {"ref_id": "evil", "ts": 1}, new),
                ("add_ref", {"hash": known, "ref_id": "evil", "ts": 1}, None),
                ("del_ref", {"hash": known, "ref_id": "r", "ts": 2**62}, None),
                ("get_block", {"hash": known}, None),
                ("client_get", {"hash": known}, None),
                ("need_block", {"hash": known}, None),
                ("status", {}, None),
            ]
            assert await intrude(addr, sealed_requests(requests)) == b""
            assert node.net.handshake_failures == before_failures + 2

            # 3. The same as a client: a made-up key id, then the node's own admin key's
            #    id without its secret.
            admin_id = ClientKey.parse((tmp_path / "node1" / "admin_key").read_text()).id
            for claim in (ClientKey.generate().id, admin_id):
                assert await intrude(addr, sealed_requests(requests), role="client",
                                     claim=claim) == b""
            assert node.net.handshake_failures == before_failures + 4

            # 4. An honest client holding a wrong key is refused too.
            with pytest.raises(AuthenticationError):
                async with open_rpc_client(addr, ClientKey.generate(), timeout=5):
                    pass
            assert node.net.handshake_failures == before_failures + 5

            # Nothing was written anywhere; the known block kept exactly its reference.
            for nid in cl.nodes:
                info = await _info(cl, nid, new_h)
                assert not info["present"] and info["refs"] == [], (nid, info)
            info = await _info(cl, "node1", known)
            assert info["present"] and [(r["ref_id"], r["deleted"]) for r in info["refs"]] == [("r", False)]
