"""Sans-io handshake and session encryption; nodes and client keys (issue 10)."""

from __future__ import annotations

import os

import pytest

from blocknode.errors import AuthenticationError, ProtocolError
from blocknode.rpc.handshake import (
    ROLE_CLIENT,
    ClientHandshake,
    ClientKey,
    HandshakeBusy,
    Peer,
    ServerHandshake,
)
from blocknode.rpc.session import Session
from blocknode.rpc.wire import MSG_REQUEST, NEED_DATA, OutgoingMessage, encode_head
from tests.fakes import SECRET

OTHER = bytes(range(1, 33))


def run_handshake(client: ClientHandshake, server: ServerHandshake) -> None:
    """Shuttle bytes until both are done; errors propagate."""
    for _ in range(4):
        server.receive_data(client.data_to_send())
        server.process()
        client.receive_data(server.data_to_send())
        client.process()
        if client.done and server.done:
            return
        if client.done:
            server.receive_data(client.data_to_send())
            server.process()
            return


def test_handshake_success_gives_matching_directional_keys() -> None:
    c, s = ClientHandshake("client-1", SECRET), ServerHandshake("node-a", SECRET)
    run_handshake(c, s)
    assert c.done and s.done
    assert c.keys.peer_id == "node-a" and s.keys.peer_id == "client-1"
    assert c.keys.send_key == s.keys.recv_key and c.keys.recv_key == s.keys.send_key
    assert c.keys.send_key != c.keys.recv_key
    c2, s2 = ClientHandshake("client-1", SECRET), ServerHandshake("node-a", SECRET)
    run_handshake(c2, s2)
    assert c2.keys.send_key != c.keys.send_key  # fresh nonces, fresh keys


def test_handshake_byte_by_byte() -> None:
    c, s = ClientHandshake("a", SECRET), ServerHandshake("b", SECRET)
    for byte in c.data_to_send():
        s.receive_data(bytes([byte]))
        s.process()
    for byte in s.data_to_send():
        c.receive_data(bytes([byte]))
        c.process()
    assert c.done
    for byte in c.data_to_send():
        s.receive_data(bytes([byte]))
        s.process()
    assert s.done


def test_client_with_wrong_secret_refused_and_server_told() -> None:
    c, s = ClientHandshake("a", OTHER), ServerHandshake("b", SECRET)
    s.receive_data(c.data_to_send())
    s.process()
    c.receive_data(s.data_to_send())
    with pytest.raises(AuthenticationError, match="cluster secret"):
        c.process()
    s.receive_data(c.data_to_send())  # the client's reject
    with pytest.raises(AuthenticationError, match="secrets differ"):
        s.process()
    assert not s.done


def test_server_with_wrong_secret_refused() -> None:
    c, s = ClientHandshake("a", SECRET), ServerHandshake("b", OTHER)
    s.receive_data(c.data_to_send())
    s.process()
    c.receive_data(s.data_to_send())
    with pytest.raises(AuthenticationError, match="'b' could not prove"):
        c.process()


def test_forged_client_finish_refused() -> None:
    c, s = ClientHandshake("a", SECRET), ServerHandshake("b", SECRET)
    s.receive_data(c.data_to_send())
    s.process()
    c.receive_data(s.data_to_send())
    c.process()
    finish = bytearray(c.data_to_send())
    finish[-1] ^= 1
    s.receive_data(bytes(finish))
    with pytest.raises(AuthenticationError, match="failed to prove"):
        s.process()


def test_replayed_client_handshake_refused() -> None:
    c, s = ClientHandshake("a", SECRET), ServerHandshake("b", SECRET)
    hello = c.data_to_send()
    s.receive_data(hello)
    s.process()
    c.receive_data(s.data_to_send())
    c.process()
    finish = c.data_to_send()
    s.receive_data(finish)
    s.process()
    assert s.done
    # An eavesdropper replays both client frames to a new server session.
    s2 = ServerHandshake("b", SECRET)
    s2.receive_data(hello)
    s2.process()
    s2.receive_data(finish)
    with pytest.raises(AuthenticationError):
        s2.process()


def test_version_mismatch_names_both_versions_on_both_sides() -> None:
    c, s = ClientHandshake("a", SECRET, version=2), ServerHandshake("b", SECRET, version=1)
    s.receive_data(c.data_to_send())
    with pytest.raises(ProtocolError, match="peer speaks version 2, we speak version 1"):
        s.process()
    c.receive_data(s.data_to_send())
    with pytest.raises(ProtocolError, match="peer speaks version 1, we speak version 2"):
        c.process()


def test_expected_peer_id_mismatch() -> None:
    c, s = ClientHandshake("a", SECRET, expected_peer_id="node-x"), ServerHandshake("b", SECRET)
    s.receive_data(c.data_to_send())
    s.process()
    c.receive_data(s.data_to_send())
    with pytest.raises(ProtocolError, match="expected 'node-x'"):
        c.process()


def test_peer_closing_mid_handshake() -> None:
    s = ServerHandshake("b", SECRET)
    s.receive_data(b"\x00\x00")
    s.receive_data(b"")
    with pytest.raises(ProtocolError):
        s.process()


def sessions() -> tuple[Session, Session]:
    c, s = ClientHandshake("a", SECRET), ServerHandshake("b", SECRET)
    run_handshake(c, s)
    return Session(c.keys), Session(s.keys, decoder=s.decoder)


def encrypted_frames(sender: Session, n: int) -> list[bytes]:
    out = []
    for sid in range(1, n + 1):
        head = encode_head(MSG_REQUEST, "k", {"i": sid}, True)
        sender.queue(OutgoingMessage(sid, False, head, memoryview(os.urandom(100))))
        view, _ = sender.data_to_send()
        out.append(bytes(view))
    return out


def test_encrypted_round_trip() -> None:
    a, b = sessions()
    for f in encrypted_frames(a, 3):
        b.receive_data(f)
    got = []
    while (m := b.next_message()) is not NEED_DATA:
        got.append(m[2].fields["i"])
    assert got == [1, 2, 3]


@pytest.mark.parametrize("where", [0, 5, 20, -1])
def test_tampered_frame_fails_authentication(where: int) -> None:
    a, b = sessions()
    (frame,) = encrypted_frames(a, 1)
    bad = bytearray(frame)
    bad[4 + where if where >= 0 else where] ^= 0x40
    b.receive_data(bytes(bad))
    with pytest.raises(AuthenticationError):
        b.next_message()


def test_replayed_frame_fails_authentication() -> None:
    a, b = sessions()
    (frame,) = encrypted_frames(a, 1)
    b.receive_data(frame)
    assert b.next_message() is not NEED_DATA
    b.receive_data(frame)
    with pytest.raises(AuthenticationError):
        b.next_message()


def test_reordered_frames_fail_authentication() -> None:
    a, b = sessions()
    f1, f2 = encrypted_frames(a, 2)
    b.receive_data(f2 + f1)
    with pytest.raises(AuthenticationError):
        b.next_message()


def test_truncated_stream_fails_authentication() -> None:
    a, b = sessions()
    (frame,) = encrypted_frames(a, 1)
    b.receive_data(frame[:-3])
    assert b.next_message() is NEED_DATA
    b.receive_data(b"")
    with pytest.raises(AuthenticationError):
        b.next_message()


def test_shortened_frame_fails_authentication() -> None:
    a, b = sessions()
    (frame,) = encrypted_frames(a, 1)
    n = int.from_bytes(frame[:4], "big") - 1
    b.receive_data(n.to_bytes(4, "big") + frame[4 : 4 + n])
    with pytest.raises(AuthenticationError):
        b.next_message()


# ---------------------------------------------------------------- client keys (issue 10)

KEY = ClientKey.generate()
KEYS = {KEY.id: KEY.verifier}


def key_server(**kw: object) -> ServerHandshake:
    return ServerHandshake("node-a", SECRET, members={"node-a", "node-b"}, lookup_key=KEYS.get,
                           **kw)  # type: ignore[arg-type]


def test_client_key_handshake_proves_the_client_role() -> None:
    c, s = ClientHandshake.for_key(KEY), key_server()
    run_handshake(c, s)
    assert c.done and s.done
    assert s.keys.peer == Peer.client(KEY.id) and not s.keys.peer.is_node
    assert c.keys.peer == Peer.node("node-a")
    assert c.keys.send_key == s.keys.recv_key and c.keys.recv_key == s.keys.send_key


@pytest.mark.parametrize("key", [ClientKey(KEY.id, OTHER), ClientKey.generate()],
                         ids=["wrong-secret", "unknown-id"])
def test_a_wrong_or_unknown_key_is_refused_alike(key: ClientKey) -> None:
    c, s = ClientHandshake.for_key(key), key_server()
    s.receive_data(c.data_to_send())
    s.process()
    c.receive_data(s.data_to_send())
    with pytest.raises(AuthenticationError, match=f"does not know client key {key.id}"):
        c.process()
    s.receive_data(c.data_to_send())  # the client's reject
    with pytest.raises(AuthenticationError, match="its key is unknown here"):
        s.process()
    assert not s.done


def _fixed(nonce: bytes):  # an rng giving this nonce: replays a handshake's numbers
    return lambda n: nonce


def test_an_unknown_key_id_cannot_finish_even_ignoring_the_server_proof() -> None:
    # An attacker ignores the (random) proof it got and sends the finish an honest
    # client of that key would send to a node that knew the key: refused.
    stranger = ClientKey.generate()
    nc, ns = os.urandom(32), os.urandom(32)
    c, s = ClientHandshake.for_key(stranger, rng=_fixed(nc)), key_server(rng=_fixed(ns))
    s.receive_data(c.data_to_send())
    s.process()
    assert s.data_to_send()  # a hello with a proof from a random verifier
    c2 = ClientHandshake.for_key(stranger, rng=_fixed(nc))
    knows = ServerHandshake("node-a", SECRET, lookup_key={stranger.id: stranger.verifier}.get,
                            rng=_fixed(ns))
    knows.receive_data(c2.data_to_send())
    knows.process()
    c2.receive_data(knows.data_to_send())
    c2.process()
    s.receive_data(c2.data_to_send())
    with pytest.raises(AuthenticationError, match="unknown or revoked key"):
        s.process()


def test_a_stolen_verifier_does_not_authenticate() -> None:
    # The keys table holds verifiers; one leaked is not a key.
    c, s = ClientHandshake.for_key(ClientKey(KEY.id, KEY.verifier)), key_server()
    s.receive_data(c.data_to_send())
    s.process()
    c.receive_data(s.data_to_send())
    with pytest.raises(AuthenticationError):
        c.process()


def test_a_client_cannot_claim_to_be_a_node() -> None:
    # With its key's secret as if it were the cluster secret, under a member's id.
    c, s = ClientHandshake("node-b", KEY.secret), key_server()
    s.receive_data(c.data_to_send())
    s.process()
    c.receive_data(s.data_to_send())
    with pytest.raises(AuthenticationError, match="cluster secret"):
        c.process()
    # ... and when it ignores the node's proof and sends a valid client proof made
    # with the same nonces, as if it were a node's.
    nc, ns = os.urandom(32), os.urandom(32)
    c, s = ClientHandshake("node-b", KEY.secret, rng=_fixed(nc)), key_server(rng=_fixed(ns))
    s.receive_data(c.data_to_send())
    s.process()
    s.receive_data(honest_finish(nc, ns))
    with pytest.raises(AuthenticationError, match="failed to prove it holds the cluster secret"):
        s.process()


def honest_finish(nc: bytes, ns: bytes) -> bytes:
    """The finish frame KEY's holder sends in a client handshake with these nonces."""
    c, s = ClientHandshake.for_key(KEY, rng=_fixed(nc)), key_server(rng=_fixed(ns))
    s.receive_data(c.data_to_send())
    s.process()
    c.receive_data(s.data_to_send())
    c.process()
    return c.data_to_send()


def test_a_node_id_outside_the_cluster_is_refused_at_the_hello() -> None:
    c, s = ClientHandshake("node-z", SECRET), key_server()
    s.receive_data(c.data_to_send())
    with pytest.raises(AuthenticationError, match="not a node of this cluster"):
        s.process()
    c.receive_data(s.data_to_send())
    with pytest.raises(AuthenticationError, match="'node-z' is not a node of its cluster"):
        c.process()


def test_a_key_id_equal_to_a_node_id_is_still_a_client() -> None:
    c = ClientHandshake("node-b", KEY.secret, role=ROLE_CLIENT)
    s = ServerHandshake("node-a", SECRET, lookup_key={"node-b": KEY.verifier}.get)
    run_handshake(c, s)
    assert s.keys.peer == Peer.client("node-b") and not s.keys.peer.is_node


def test_refusals_at_the_hello_are_named() -> None:
    c, s = ClientHandshake.for_key(KEY), ServerHandshake("node-a", SECRET)  # takes no keys
    s.receive_data(c.data_to_send())
    with pytest.raises(ProtocolError, match="takes none"):
        s.process()
    c.receive_data(s.data_to_send())
    with pytest.raises(ProtocolError, match="accepts no client keys"):
        c.process()
    c, s = ClientHandshake.for_key(KEY), key_server(admit=lambda role, pid: "at its cap")
    s.receive_data(c.data_to_send())
    with pytest.raises(HandshakeBusy):
        s.process()
    c.receive_data(s.data_to_send())
    with pytest.raises(HandshakeBusy, match="refused the connection: at its cap"):
        c.process()


def test_the_key_string_round_trips_and_never_shows_the_secret() -> None:
    text = str(KEY)
    assert text == f"{KEY.id}:{KEY.secret.hex()}" and ClientKey.parse(text + "\n") == KEY
    assert KEY.secret.hex() not in repr(KEY)
    for bad in ["", KEY.id, f"{KEY.id}:", f"{KEY.id}:{'zz' * 32}", f"XX{KEY.id[2:]}:{'00' * 32}",
                f"{KEY.id}:{KEY.secret.hex()[:-2]}"]:
        with pytest.raises(ValueError) as info:
            ClientKey.parse(bad)
        assert KEY.secret.hex()[:16] not in str(info.value)
