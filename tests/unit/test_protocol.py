"""`blocknode.protocol`: request field parsers, their bounds, the message kinds and limits."""

from __future__ import annotations

import pytest

from blocknode import protocol
from blocknode.errors import LocalProtocolError, RemoteProtocolError
from blocknode.protocol import (
    ALL_KINDS,
    DEFAULT_BLOCK_SIZE,
    HEAD_MAX,
    MAX_BATCH_ROWS,
    MAX_REF_ID_BYTES,
    MAX_TS,
    get_data,
    get_hash,
    get_int,
    get_opt_int,
    get_ref,
    get_str,
    max_message_size,
    parse_batch_items,
)
from blocknode.rpc.wire import DEFAULT_MAX_MESSAGE_SIZE, MSG_REQUEST, decode_message, encode_head

H = bytes(range(32))


# ---------------------------------------------------------------- get_hash


@pytest.mark.parametrize("value", [None, "", b"", b"\x00" * 31, b"\x00" * 33, H.hex(), list(H), 7])
def test_get_hash_refuses_anything_but_32_bytes(value: object) -> None:
    with pytest.raises(RemoteProtocolError, match="'hash'"):
        get_hash({"hash": value})


def test_get_hash_takes_32_bytes_under_any_field_name() -> None:
    assert get_hash({"hash": H}) == H
    assert get_hash({"other": H}, "other") == H
    with pytest.raises(RemoteProtocolError, match="'other'"):
        get_hash({}, "other")


# ---------------------------------------------------------------- get_str and ref ids


def test_ref_id_limit_is_255_utf8_bytes() -> None:
    assert MAX_REF_ID_BYTES == 255
    assert get_str({"ref_id": "a" * 255}, "ref_id") == "a" * 255
    assert get_str({"ref_id": "é" * 127 + "a"}, "ref_id")  # 255 bytes, 128 characters
    with pytest.raises(RemoteProtocolError, match="1 to 255 bytes"):
        get_str({"ref_id": "a" * 256}, "ref_id")
    with pytest.raises(RemoteProtocolError):
        get_str({"ref_id": "é" * 128}, "ref_id")  # 128 characters but 256 bytes


@pytest.mark.parametrize("value", [None, "", b"ref", 5, True, ["r"]])
def test_get_str_refuses_non_strings_and_the_empty_string(value: object) -> None:
    with pytest.raises(RemoteProtocolError, match="'ref_id'"):
        get_str({"ref_id": value}, "ref_id")


def test_get_str_takes_another_bound() -> None:
    assert get_str({"s": "abc"}, "s", max_bytes=3) == "abc"
    with pytest.raises(RemoteProtocolError, match="1 to 2 bytes"):
        get_str({"s": "abc"}, "s", max_bytes=2)


# ---------------------------------------------------------------- get_int and timestamps


def test_timestamps_go_up_to_2_63_minus_1() -> None:
    assert MAX_TS == 2**63 - 1
    assert get_int({"ts": 0}, "ts") == 0
    assert get_int({"ts": 2**63 - 1}, "ts") == 2**63 - 1
    with pytest.raises(RemoteProtocolError, match="'ts'"):
        get_int({"ts": 2**63}, "ts")


@pytest.mark.parametrize("value", [None, -1, True, False, 1.0, "5", b"5", [5]])
def test_get_int_refuses_negatives_bools_and_non_integers(value: object) -> None:
    with pytest.raises(RemoteProtocolError, match="non-negative integer"):
        get_int({"ts": value}, "ts")


def test_get_opt_int_is_none_when_absent_else_strict() -> None:
    assert get_opt_int({}, "ts") is None
    assert get_opt_int({"ts": None}, "ts") is None
    assert get_opt_int({"ts": 42}, "ts") == 42
    for bad in (-1, True, "42", 2**63):
        with pytest.raises(RemoteProtocolError):
            get_opt_int({"ts": bad}, "ts")


def test_get_ref_is_ref_id_and_ts() -> None:
    assert get_ref({"ref_id": "r", "ts": 9}) == ("r", 9)
    with pytest.raises(RemoteProtocolError, match="'ts'"):
        get_ref({"ref_id": "r"})
    with pytest.raises(RemoteProtocolError, match="'ref_id'"):
        get_ref({"ts": 9})


# ---------------------------------------------------------------- get_data


def test_get_data_needs_data_within_block_size() -> None:
    assert get_data(b"abc", "put_block", block_size=3) == b"abc"
    assert get_data(b"", "put_block", block_size=3) == b""
    with pytest.raises(RemoteProtocolError, match="put_block carries no data"):
        get_data(None, "put_block", block_size=3)
    with pytest.raises(RemoteProtocolError, match="block of 4 bytes exceeds block_size 3"):
        get_data(b"abcd", "put_block", block_size=3)


# ---------------------------------------------------------------- batch rows


def test_batch_rows_split_the_payload() -> None:
    items = parse_batch_items({"items": [[H, "a", 1, 2], [H, "b", 2, 0], [H, "c", 3, 3]]},
                              b"xxyyy", with_hash=True)
    assert [tuple(i) for i in items] == [(H, "a", 1, b"xx"), (H, "b", 2, b""), (H, "c", 3, b"yyy")]
    client = parse_batch_items({"items": [["a", 2]]}, b"xx", with_hash=False)
    assert client[0].hash == b"" and client[0].data == b"xx" and client[0].ref_id == "a"
    assert client[0].ts == 0  # the coordinator sets the time


def test_a_client_batch_row_carrying_a_time_is_refused() -> None:
    # Issue 10 part 2: reference times are set by the cluster, never by a client.
    with pytest.raises(RemoteProtocolError, match="ts is refused"):
        parse_batch_items({"items": [["a", 1, 2]]}, b"xx", with_hash=False)


@pytest.mark.parametrize(
    "items, payload",
    [
        (None, b""),
        ([], b""),
        ("rows", b""),
        ([["a"]], b""),                         # short row
        ([["a", 1, 0, 0]], b""),                # long row (without hash)
        ([["a", 1, 0]], b""),                   # a row carrying a ts
        ([("a", 0)], b""),                      # a tuple is not a msgpack row
        ([["", 0]], b""),                       # empty ref id
        (["a" * 256, 0], b""),                  # not rows at all
        ([["a" * 256, 0]], b""),                # ref id over 255 bytes
        ([["a", -1]], b""),                     # negative length
        ([["a", True]], b"x"),                  # a bool length
        ([["a", 2]], b"x"),                     # lengths exceed the payload
        ([["a", 1]], b"xy"),                    # lengths do not cover the payload
    ],
)
def test_malformed_batches_are_remote_protocol_errors(items: object, payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_batch_items({"items": items}, payload, with_hash=False)


def test_batch_rows_need_a_hash_when_asked() -> None:
    with pytest.raises(RemoteProtocolError, match="'hash'"):
        parse_batch_items({"items": [[b"short", "a", 1, 0]]}, b"", with_hash=True)
    with pytest.raises(RemoteProtocolError, match="malformed row"):
        parse_batch_items({"items": [["a", 1, 0]]}, b"", with_hash=True)


def test_batch_row_count_is_bounded() -> None:
    rows = [["a", 0]] * MAX_BATCH_ROWS
    assert len(parse_batch_items({"items": rows}, b"", with_hash=False)) == MAX_BATCH_ROWS
    with pytest.raises(RemoteProtocolError, match=f"1 to {MAX_BATCH_ROWS} rows"):
        parse_batch_items({"items": rows + [["a", 0]]}, b"", with_hash=False)


def test_batch_block_size_bound() -> None:
    fields = {"items": [["a", 3], ["b", 4]]}
    assert len(parse_batch_items(fields, b"x" * 7, with_hash=False)) == 2
    assert len(parse_batch_items(fields, b"x" * 7, with_hash=False, block_size=4)) == 2
    with pytest.raises(RemoteProtocolError, match="block of 4 bytes exceeds block_size 3"):
        parse_batch_items(fields, b"x" * 7, with_hash=False, block_size=3)


# ---------------------------------------------------------------- limits and kinds


def test_message_limits_derive_from_block_size() -> None:
    assert max_message_size(4 << 20) == (4 << 20) + 4 + HEAD_MAX
    assert DEFAULT_MAX_MESSAGE_SIZE == max_message_size(DEFAULT_BLOCK_SIZE)


def test_head_max_is_enforced_both_ways() -> None:
    fits = encode_head(MSG_REQUEST, "k", {"b": b"x" * (HEAD_MAX - 100)}, False)
    assert decode_message(fits).fields["b"] == b"x" * (HEAD_MAX - 100)
    with pytest.raises(LocalProtocolError, match="exceeds"):
        encode_head(MSG_REQUEST, "k", {"b": b"x" * HEAD_MAX}, False)
    # A peer that claims a longer head is refused before it is decoded.
    with pytest.raises(RemoteProtocolError, match="head length"):
        decode_message((HEAD_MAX + 1).to_bytes(4, "big") + b"\x00" * (HEAD_MAX + 1))


def test_kind_constants_are_the_wire_strings() -> None:
    names = [n for n in protocol.__all__ if n.isupper() and isinstance(getattr(protocol, n), str)]
    kinds = {getattr(protocol, n) for n in names if getattr(protocol, n) in ALL_KINDS}
    assert kinds == ALL_KINDS
    assert all(getattr(protocol, n) == n.lower() for n in names if getattr(protocol, n) in ALL_KINDS)
    assert protocol.REPLICA_KINDS.isdisjoint(protocol.CLIENT_KINDS)
    assert protocol.CLIENT_KINDS.isdisjoint(protocol.ADMIN_KINDS)


def test_a_node_serves_exactly_the_protocol_kinds(tmp_path) -> None:
    from blocknode.config import NodeConfig
    from blocknode.node import Node

    cfg = NodeConfig(data_dir=str(tmp_path / "data"), metadata_dir=str(tmp_path / "meta"),
                     rpc_secret="00" * 32, lmdb_map_size=1 << 24, rpc_bind_addr="127.0.0.1:0")
    node = Node(cfg)
    try:
        assert set(node._handlers) == set(ALL_KINDS)
    finally:
        node.meta.close()


def test_protocol_imports_only_the_error_vocabulary_and_the_fast_path() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(protocol))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported == {"__future__", "collections.abc", "typing", "blocknode", "blocknode.errors"}
