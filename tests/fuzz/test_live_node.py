"""Fuzzing a live node: hypothesis drives a real `python -m blocknode serve` over TCP.

One node process (a one-node cluster, module-scoped) takes random and mutated
input from two kinds of peer:

- an **unauthenticated** peer: random bytes, valid handshake hellos mutated
  (truncated, bit-flipped, oversized length prefixes, wrong versions, roles,
  ids, nonces) and partial frames sent slowly;
- an **authenticated** peer (the node's admin client key, or the node role
  with the cluster secret): a real session whose messages are then mutated —
  unknown kinds, wrong field types, huge declared sizes, bad hashes, malformed
  msgpack heads, bad payload lengths, raw chunk headers with duplicate stream
  ids, bad flags and lengths.

After every example: the process is alive, a separate normal client puts and
gets (byte-exact) within a few seconds, nothing was written (block, ref and RC
counts and the data dir's files unchanged) unless a writing request was
acknowledged, and the node logged no traceback (an input the node does not
expect must be refused with our error, never crash a handler).

Generators draw small structures (few messages, short byte strings, small
integers next to the boundary values), so a failure shrinks to a short example.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import blocknode
from blocknode import fastpath
from blocknode.auth import read_key_file
from blocknode.config import load_config, load_or_create_secret
from blocknode.errors import ProtocolError
from blocknode.protocol import ALL_KINDS, max_message_size
from blocknode.rpc.handshake import (
    PROTOCOL_VERSION,
    ROLE_CLIENT,
    ROLE_NODE,
    TAG_SIZE,
    ClientHandshake,
    SessionCipher,
)
from blocknode.rpc.session import Session
from blocknode.rpc.wire import (
    CHUNK_HEADER,
    CHUNK_SIZE,
    FLAG_FIRST,
    FLAG_LAST,
    MSG_ERROR,
    MSG_REQUEST,
    NEED_DATA,
    pack_frame_prefix,
)
from tests.cluster.harness import ServeProcesses, write_cluster

FUZZ = settings(max_examples=int(os.environ.get("LIVE_FUZZ_EXAMPLES", "40")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

READ_KINDS = frozenset({"get_block", "need_block", "client_get", "status", "ae_digests",
                        "key_sync", "admin_block_info", "admin_block_errors", "admin_key_list",
                        "admin_layout_show", "admin_layout_history", "admin_worker_get",
                        "admin_worker_list"})
"""Kinds whose success writes nothing: any other acknowledged request may write."""


@dataclass
class LiveNode:
    """The node under fuzz: its address, secrets, files and a normal client."""

    procs: ServeProcesses
    config: Path
    addr: tuple[str, int]
    secret: bytes
    client_id: str
    client_secret: bytes
    data_dir: Path
    log: Path
    checker: Any  # blocknode.SyncClient
    log_pos: int = 0
    checks: int = 0


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    root = tmp_path_factory.mktemp("livefuzz")
    (config,) = write_cluster(root, 1, rf=1, rpc_timeout=3.0, inline_threshold=1024)
    procs = ServeProcesses([config])
    try:
        procs.start_all()
        cfg = load_config(config)
        deadline = time.monotonic() + 10
        while not Path(cfg.admin_key_path).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        key = read_key_file(cfg.admin_key_path)
        host, _, port = cfg.rpc_bind_addr.rpartition(":")
        checker = blocknode.connect(str(config), timeout=10)
        try:
            yield LiveNode(procs, config, (host, int(port)), load_or_create_secret(cfg, create=False),
                           key.id, key.secret, Path(cfg.data_dir), config.parent / "serve.log",
                           checker)
        finally:
            checker.close()
    finally:
        procs.close()


# ---- the oracle -------------------------------------------------------------------


def snapshot(n: LiveNode) -> tuple[Any, ...]:
    """What a rejected message must not change: counts and the data dir's files."""
    st_ = n.checker.status()
    files = sorted(str(p.relative_to(n.data_dir)) for p in n.data_dir.rglob("*")
                   if p.is_file() and "tmp" not in p.parts)
    return (st_["blocks"], st_["inline_blocks"], st_["rc_entries"], st_["refs"], tuple(files))


def connections_released(n: LiveNode, timeout: float = 5.0) -> None:
    """Once the fuzzing peer closed, only the checker's connection is left (nothing leaks)."""
    deadline = time.monotonic() + timeout
    while True:
        conns = n.checker.status()["connections"]
        if conns["incoming"] == 1 and conns["handshaking"] == 0:
            return
        assert time.monotonic() < deadline, f"connections left open after the peer closed: {conns}"
        time.sleep(0.02)


def check_node(n: LiveNode, before: tuple[Any, ...], wrote: bool, *, peer_closed: bool = True) -> None:
    """Alive, still serving a normal client byte-exact, nothing written, no traceback,
    and (once the fuzzing peer closed) its connection released."""
    proc = n.procs.procs[0]
    assert proc.poll() is None, f"node exited with {proc.returncode}: {n.log.read_text()[-3000:]}"
    if peer_closed:
        connections_released(n)
    if not wrote:
        assert snapshot(n) == before, "a rejected message changed what the node stores"
    n.checks += 1
    data = os.urandom(100 + n.checks % 3000)
    t0 = time.monotonic()
    h = n.checker.put(data, ref=f"check-{n.checks}")
    assert n.checker.get(h) == data
    assert time.monotonic() - t0 < 5, "a normal client was not served promptly"
    with open(n.log, "rb") as f:
        f.seek(n.log_pos)
        new = f.read().decode(errors="replace")
        n.log_pos = f.tell()
    assert "Traceback" not in new, f"the node logged a traceback:\n{new[-4000:]}"


# ---- raw peers -------------------------------------------------------------------


def connect(n: LiveNode) -> socket.socket:
    s = socket.create_connection(n.addr, timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def send_quietly(s: socket.socket, data: bytes) -> bool:
    """Send; False if the node already closed the connection (a fine answer)."""
    try:
        s.sendall(data)
        return True
    except OSError:
        return False


def drain(s: socket.socket, idle: float = 0.2, total: float = 3.0) -> bytes:
    """Read what the node sends until it closes, goes quiet for `idle` s, or `total` s."""
    out = bytearray()
    s.settimeout(idle)
    end = time.monotonic() + total
    while time.monotonic() < end:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


class Peer:
    """An authenticated raw session: we seal chunks ourselves, a `Session` reads replies."""

    def __init__(self, n: LiveNode, role: str) -> None:
        self.sock = connect(n)
        if role == ROLE_CLIENT:
            hs = ClientHandshake(n.client_id, n.client_secret, role=ROLE_CLIENT)
        else:
            hs = ClientHandshake("node1", n.secret, role=ROLE_NODE)
        self.sock.sendall(hs.data_to_send())
        while not hs.done:
            data = self.sock.recv(4096)
            assert data, "the node closed a valid handshake"
            hs.receive_data(data)
            hs.process()
            out = hs.data_to_send()
            if out:
                self.sock.sendall(out)
        self.cipher = SessionCipher(hs.keys.send_key)
        self.session = Session(hs.keys, decoder=hs.decoder,
                               max_message_size=max_message_size(1 << 20))
        self.alive = True

    def chunk(self, flags: int, sid: int, total: int, body: bytes) -> None:
        """One sealed chunk frame, header as given (whatever it claims)."""
        header = CHUNK_HEADER.pack(flags, sid, total)
        out = bytearray(len(body) + TAG_SIZE)
        self.cipher.seal_into(header, body, memoryview(out))
        frame = header + bytes(out)
        self.alive = self.alive and send_quietly(self.sock, pack_frame_prefix(len(frame)) + frame)

    def message(self, sid: int, body: bytes) -> None:
        """A whole message body (head length + head + data) cut into proper chunks."""
        total = len(body)
        for off in range(0, max(total, 1), CHUNK_SIZE):
            piece = body[off:off + CHUNK_SIZE]
            flags = (FLAG_FIRST if off == 0 else 0) | (FLAG_LAST if off + CHUNK_SIZE >= total else 0)
            self.chunk(flags, sid, total, piece)

    def replies(self, want: int, total: float = 5.0) -> list[tuple[int, int, str]]:
        """(stream id, message type, error code) of replies, until `want` came or quiet."""
        got: list[tuple[int, int, str]] = []
        self.sock.settimeout(0.3 if want == 0 else 1.0)
        end = time.monotonic() + total
        while time.monotonic() < end and (want == 0 or len(got) < want):
            try:
                data = self.sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            try:
                self.session.receive_data(data)
                while (m := self.session.next_message()) is not NEED_DATA:
                    _, sid, msg = m  # type: ignore[misc]
                    code = msg.fields.get("code", "") if msg is not None else "busy"
                    got.append((sid, msg.type if msg is not None else MSG_ERROR, str(code)))
            except ProtocolError as exc:
                raise AssertionError(f"the node sent us something malformed: {exc}") from None
        return got

    def close(self) -> None:
        self.sock.close()


# ---- unauthenticated: handshake-level fuzzing -------------------------------------

nonce = st.binary(min_size=16, max_size=16)
hello_fields = st.fixed_dictionaries({
    "t": st.sampled_from(["hello", "finish", "reject", "x", ""]),
    "v": st.sampled_from([PROTOCOL_VERSION, 1, 3, 0, -1, 2**40, "2", None]),
    "role": st.sampled_from([ROLE_NODE, ROLE_CLIENT, "admin", "", None, 7]),
    "id": st.sampled_from(["node1", "node9", "", "x" * 300, None, 5])
    | st.text(max_size=12),
    "nonce": nonce | st.binary(max_size=40) | st.none(),
}, optional={"mac": st.binary(max_size=40), "extra": st.integers(-(2**63), 2**64 - 1)})


def hello_frame(fields: dict[str, Any]) -> bytes:
    body = msgpack.packb({k: v for k, v in fields.items() if v is not None}, use_bin_type=True)
    return pack_frame_prefix(len(body)) + body


@st.composite
def unauth_inputs(draw: st.DrawFn) -> tuple[str, bytes, list[int]]:
    """(mode, bytes to send, split points) — a mutated or random handshake."""
    mode = draw(st.sampled_from(["random", "hello", "truncate", "flip", "prefix"]))
    if mode == "random":
        data = draw(st.binary(max_size=300))
    else:
        data = hello_frame(draw(hello_fields))
        if mode == "truncate":
            data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
        elif mode == "flip":
            b = bytearray(data)
            for pos, mask in draw(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)),
                                           min_size=1, max_size=3)):
                b[pos % len(b)] ^= mask
            data = bytes(b)
        elif mode == "prefix":  # a declared length that does not match the body
            n = draw(st.sampled_from([0, 1, 3, 4095, 4096, 4097, 65536, 2**31, 2**32 - 1])
                     | st.integers(0, 2**32 - 1))
            data = struct.pack(">I", n) + data[4:]
    cuts = draw(st.lists(st.integers(0, 400), max_size=3))
    return mode, data, cuts


@FUZZ
@given(unauth_inputs(), st.booleans())
def test_unauthenticated_peer(node: LiveNode, inp: tuple[str, bytes, list[int]], slow: bool) -> None:
    _, data, cuts = inp
    before = snapshot(node)
    s = connect(node)
    try:
        points = sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]
        last = 0
        for p in points:
            if not send_quietly(s, data[last:p]):
                break
            last = p
            if slow:
                time.sleep(0.05)
        drain(s)
    finally:
        s.close()
    check_node(node, before, wrote=False)


def test_slow_partial_hello_does_not_hold_other_clients(node: LiveNode) -> None:
    """A peer that sends half a hello and then waits: the others are served meanwhile."""
    before = snapshot(node)
    frame = hello_frame({"t": "hello", "v": PROTOCOL_VERSION, "role": ROLE_CLIENT,
                         "id": node.client_id, "nonce": b"\0" * 16})
    socks = [connect(node) for _ in range(8)]
    try:
        for s in socks:
            s.sendall(frame[:len(frame) // 2])
        check_node(node, before, wrote=False, peer_closed=False)
    finally:
        for s in socks:
            s.close()


# ---- authenticated: message-level fuzzing ----------------------------------------

hashes = (st.binary(min_size=32, max_size=32) | st.binary(max_size=40)
          | st.text(max_size=70) | st.integers(-(2**63), 2**64 - 1) | st.none())
ints = st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63 - 1, 2**64 - 1, -(2**63)]) | st.integers(-5, 5)
scalars = st.none() | st.booleans() | ints | st.text(max_size=10) | st.binary(max_size=10) \
    | st.floats(allow_nan=True)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=10)
field_values = {
    "hash": hashes, "ref_id": st.text(max_size=20) | st.binary(max_size=8) | ints | st.none(),
    "ts": ints | st.floats() | st.text(max_size=4), "deleted": st.booleans() | ints | st.none(),
    "z": st.booleans() | st.lists(st.booleans(), max_size=3) | ints,
    "items": st.lists(st.lists(hashes | ints | st.text(max_size=8), max_size=5), max_size=4)
    | values,
    "keys": st.lists(values, max_size=3) | values, "action": st.text(max_size=8),
    "name": st.text(max_size=12), "digest": st.binary(max_size=40) | values,
    "state": values, "cursor": values, "limit": ints,
}
fields_st = st.dictionaries(st.sampled_from(sorted(field_values)), st.none(), max_size=5).flatmap(
    lambda ks: st.fixed_dictionaries({k: field_values[k] for k in ks}))
known_kinds = st.sampled_from(sorted(ALL_KINDS))
kinds = st.one_of(known_kinds, known_kinds, known_kinds, st.text(max_size=12))


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes]:
    """(kind, message body): a well-framed message with mutated fields, or a broken head."""
    kind = draw(kinds)
    shape = draw(st.sampled_from(["fields", "fields", "fields", "badhead", "headlen", "type"]))
    data = draw(st.none() | st.binary(max_size=64) | st.sampled_from([b"\0" * 4096]))
    fields: Any = draw(fields_st | values) if shape == "type" else draw(fields_st)
    if isinstance(fields, dict) and "hash" in fields and data is not None and draw(st.booleans()):
        fields["hash"] = fastpath.block_hash(data)  # the right hash: the handler goes deeper
    if shape == "badhead":
        head = draw(st.binary(max_size=40))
    else:
        mtype = draw(st.sampled_from([MSG_REQUEST, MSG_REQUEST, 1, 2, 9])) if shape == "type" \
            else MSG_REQUEST
        prio = draw(st.sampled_from([0, 1, 2, 5])) if shape == "type" else 1
        has_data = data is not None if shape != "type" else draw(st.booleans())
        head = msgpack.packb([mtype, kind, fields, has_data, prio], use_bin_type=True)
    hl = len(head)
    if shape == "headlen":
        hl = draw(st.sampled_from([0, hl - 1, hl + 1, 2**32 - 1]) | st.integers(0, 2**32 - 1))
        hl = max(0, min(hl, 2**32 - 1))
    return kind, struct.pack(">I", hl) + head + (data or b"")


chunk_ops = st.tuples(
    st.integers(0, 15),                                   # flags (all bits, incl. unknown)
    st.sampled_from([1, 1, 2, 0, 2**32 - 1]),            # stream ids, often duplicated
    st.sampled_from([0, 1, 10, 100, CHUNK_SIZE, 1 << 20, 2**32 - 1]) | st.integers(0, 2**32 - 1),
    st.binary(max_size=120),
)


@FUZZ
@given(st.sampled_from([ROLE_CLIENT, ROLE_NODE]), st.lists(messages(), min_size=1, max_size=4))
def test_authenticated_peer_messages(node: LiveNode, role: str, msgs: list[tuple[str, bytes]]) -> None:
    before = snapshot(node)
    peer = Peer(node, role)
    try:
        for sid, (_, body) in enumerate(msgs, 1):
            peer.message(sid, body)
        got = peer.replies(len(msgs))
    finally:
        peer.close()
    by_sid = {sid: (t, code) for sid, t, code in got}
    for _, t, code in got:
        event(f"reply type {t} {code}")
    wrote = any(by_sid.get(sid, (MSG_ERROR, ""))[0] != MSG_ERROR and kind not in READ_KINDS
                for sid, (kind, _) in enumerate(msgs, 1))
    codes = {code for _, t, code in got if t == MSG_ERROR}
    assert "internal" not in codes, f"a malformed request crashed its handler: {got}"
    check_node(node, before, wrote=wrote)


@FUZZ
@given(st.sampled_from([ROLE_CLIENT, ROLE_NODE]), st.lists(chunk_ops, min_size=1, max_size=6))
def test_authenticated_peer_raw_chunks(node: LiveNode, role: str,
                                       chunks: list[tuple[int, int, int, bytes]]) -> None:
    before = snapshot(node)
    peer = Peer(node, role)
    try:
        for flags, sid, total, body in chunks:
            peer.chunk(flags, sid, total, body)
        got = peer.replies(0)
    finally:
        peer.close()
    event(f"{len(got)} replies")
    codes = {code for _, t, code in got if t == MSG_ERROR}
    assert "internal" not in codes, f"a malformed request crashed its handler: {got}"
    check_node(node, before, wrote=any(t != MSG_ERROR for _, t, _ in got))


def test_huge_declared_message_is_refused_without_writing(node: LiveNode) -> None:
    """A first chunk declaring 4 GiB: refused at once; the node stays fine."""
    before = snapshot(node)
    peer = Peer(node, ROLE_CLIENT)
    try:
        peer.chunk(FLAG_FIRST, 1, 2**32 - 1, b"\0" * 100)
        assert peer.replies(0) == []
        assert drain(peer.sock) == b""  # the node closed the connection
    finally:
        peer.close()
    check_node(node, before, wrote=False)


def test_valid_put_from_raw_peer_is_acknowledged_and_stored(node: LiveNode) -> None:
    """The raw peer itself is right: a valid client_put is acknowledged and readable."""
    before = snapshot(node)
    data = os.urandom(2000)
    head = msgpack.packb([MSG_REQUEST, "client_put", {"ref_id": "raw-peer"}, True, 1],
                         use_bin_type=True)
    peer = Peer(node, ROLE_CLIENT)
    try:
        peer.message(1, struct.pack(">I", len(head)) + head + data)
        assert [(sid, t) for sid, t, _ in peer.replies(1)] == [(1, 1)]
    finally:
        peer.close()
    assert snapshot(node) != before  # the oracle sees a write when there is one
    check_node(node, snapshot(node), wrote=False)
