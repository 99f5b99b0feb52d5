"""The error vocabulary: one base class, protocol errors split by blame."""

from __future__ import annotations

import inspect

import pytest
import trio

from blocknode import errors
from blocknode.cluster_config import ClusterConfig, ClusterNode
from blocknode.errors import (
    AuthenticationError,
    BlocknodeError,
    CliError,
    ConfigError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StreamTruncated,
    UnknownNode,
)
from blocknode.layout import Layout
from blocknode.manager import BlockManager
from blocknode.rpc.errors import error_reply
from blocknode.rpc.handshake import ClientHandshake, ServerHandshake
from blocknode.rpc.session import Session
from blocknode.rpc.wire import (
    MSG_REQUEST,
    NEED_DATA,
    FrameDecoder,
    MessageAssembler,
    OutgoingMessage,
    decode_message,
    encode_head,
    pack_frame_prefix,
)
from tests.fakes import SECRET


def test_every_error_class_is_a_blocknode_error() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, BaseException) and c.__module__ == errors.__name__]
    assert CliError in classes and UnknownNode in classes
    for cls in classes:
        assert issubclass(cls, BlocknodeError), cls
    assert set(errors.__all__) == {c.__name__ for c in classes} | {"single_error"}


def test_protocol_errors_split_by_blame_under_one_base() -> None:
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert issubclass(AuthenticationError, RemoteProtocolError)  # the peer failed to prove itself
    assert issubclass(StreamTruncated, RemoteProtocolError)


def test_both_blames_are_bad_request_on_the_wire() -> None:
    assert error_reply(RemoteProtocolError("x"))["code"] == "bad_request"
    assert error_reply(LocalProtocolError("x"))["code"] == "bad_request"


def test_unknown_node_is_a_config_error_and_a_key_error() -> None:
    cluster = ClusterConfig(nodes=(ClusterNode("a", "127.0.0.1:1"),), replication_factor=1)
    with pytest.raises(UnknownNode) as info:
        cluster.node("zz")
    exc = info.value
    assert isinstance(exc, ConfigError) and isinstance(exc, KeyError)
    assert exc.node_id == "zz" and str(exc) == "no node 'zz' in the cluster"
    with pytest.raises(UnknownNode, match="no node 'zz'"):
        Layout(cluster).node("zz")


def test_cli_error_carries_its_exit_status() -> None:
    assert CliError("boom").status == 1
    assert CliError("usage", 2).status == 2
    from blocknode.cli import base

    assert base.CliError is CliError
    assert base.fail("x", base.EXIT_USAGE).status == base.EXIT_USAGE


# ---------------------------------------------------------------- the peer sent garbage


def test_malformed_frames_blame_the_peer() -> None:
    dec = FrameDecoder(16)
    dec.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        dec.next_frame()
    with pytest.raises(RemoteProtocolError):
        decode_message(b"\x00\x00\x00\x01\xc1")
    asm = MessageAssembler(1000)
    with pytest.raises(RemoteProtocolError, match="unknown chunk flags"):
        asm.parse_header(b"\xf0" + b"\x00" * 8)
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        asm.begin_chunk(0x01, 1, 5000, 10)


def test_a_stream_cut_mid_frame_is_stream_truncated() -> None:
    dec = FrameDecoder(1024)
    dec.receive_data(pack_frame_prefix(10) + b"abc")
    assert dec.next_frame() is NEED_DATA
    dec.receive_data(b"")
    with pytest.raises(StreamTruncated):
        dec.next_frame()
    plain = Session(None)
    plain.receive_data(pack_frame_prefix(10) + b"abc")
    plain.receive_data(b"")
    with pytest.raises(StreamTruncated):
        plain.next_message()


def _session_pair() -> tuple[Session, Session]:
    c, s = ClientHandshake("a", SECRET), ServerHandshake("b", SECRET)
    s.receive_data(c.data_to_send())
    s.process()
    c.receive_data(s.data_to_send())
    c.process()
    s.receive_data(c.data_to_send())
    s.process()
    return Session(c.keys), Session(s.keys)


def test_an_encrypted_stream_cut_mid_frame_fails_authentication() -> None:
    a, b = _session_pair()
    a.queue(OutgoingMessage(1, False, encode_head(MSG_REQUEST, "k", {}, True), memoryview(b"x" * 100)))
    wire = bytes(a.data_to_send()[0])
    b.receive_data(wire[:-5])
    assert b.next_message() is NEED_DATA
    b.receive_data(b"")
    with pytest.raises(AuthenticationError, match="truncated"):
        b.next_message()


def test_handshake_garbage_and_mismatches_blame_the_peer() -> None:
    s = ServerHandshake("b", SECRET)
    s.receive_data(pack_frame_prefix(3) + b"\xc1\xc1\xc1")
    with pytest.raises(RemoteProtocolError, match="undecodable"):
        s.process()
    c, s = ClientHandshake("a", SECRET, version=99), ServerHandshake("b", SECRET)
    s.receive_data(c.data_to_send())
    with pytest.raises(RemoteProtocolError, match="version"):
        s.process()
    c, s = ClientHandshake("a", SECRET, expected_peer_id="x"), ServerHandshake("b", SECRET)
    s.receive_data(c.data_to_send())
    s.process()
    c.receive_data(s.data_to_send())
    with pytest.raises(RemoteProtocolError, match="expected 'x'"):
        c.process()
    s = ServerHandshake("b", SECRET)
    s.receive_data(pack_frame_prefix(10) + b"abc")
    s.receive_data(b"")
    with pytest.raises(StreamTruncated, match="handshake"):
        s.process()


# ---------------------------------------------------------------- we misused the API


def test_misusing_the_wire_api_is_local() -> None:
    with pytest.raises(LocalProtocolError, match="msgpack"):
        encode_head(MSG_REQUEST, "k", {"o": object()}, False)
    with pytest.raises(LocalProtocolError, match="priority"):
        encode_head(MSG_REQUEST, "k", {}, False, priority=9)
    with pytest.raises(LocalProtocolError, match="message type"):
        encode_head(99, "k", {}, False)
    dec = FrameDecoder(16)
    dec.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after end of stream"):
        dec.receive_data(b"more")


def test_misusing_a_handshake_is_local() -> None:
    with pytest.raises(LocalProtocolError, match="local id"):
        ClientHandshake("", SECRET)
    s = ServerHandshake("b", SECRET)
    s.receive_data(pack_frame_prefix(1) + b"\xc1")
    with pytest.raises(RemoteProtocolError):
        s.process()
    with pytest.raises(LocalProtocolError, match="already failed"):
        s.process()


def test_an_oversized_block_is_local_misuse_from_the_api_and_remote_from_a_request() -> None:
    layout = Layout(ClusterConfig(nodes=(ClusterNode("n1", "127.0.0.1:1"),), replication_factor=1))
    mgr = BlockManager(node_id="n1", layout=layout, net=None, blocks=None, meta=None,  # type: ignore[arg-type]
                       block_size=10)

    async def main() -> None:
        with pytest.raises(LocalProtocolError, match="exceeds block_size 10"):
            await mgr.put(b"x" * 11, "r")
        with pytest.raises(LocalProtocolError, match="exceeds block_size 10"):
            await mgr.put_many([(b"x" * 11, "r")])
        with pytest.raises(RemoteProtocolError, match="exceeds block_size 10"):
            await mgr.handle_client_put("peer", {"ref_id": "r"}, b"x" * 11)
        with pytest.raises(RemoteProtocolError, match="exceeds block_size 10"):
            await mgr.handle_client_put_many("peer", {"items": [["r", 11]]}, b"x" * 11)
        with pytest.raises(RemoteProtocolError, match="exceeds block_size 10"):
            await mgr.handle_put_block("peer", {"hash": b"\x00" * 32}, b"x" * 11)
        with pytest.raises(RemoteProtocolError, match="carries no data"):
            await mgr.handle_put_block("peer", {"hash": b"\x00" * 32}, None)

    trio.run(main)
