"""Batched put messages: any malformed `items`/payload is a clean RemoteProtocolError."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from blocknode.errors import RemoteProtocolError
from blocknode.protocol import parse_batch_items

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**70), st.text(max_size=5),
                    st.binary(max_size=40))
rows = st.lists(st.one_of(scalars, st.lists(scalars, max_size=5)), max_size=6)


@given(rows, st.binary(max_size=64), st.booleans())
def test_arbitrary_items_parse_or_protocol_error(items, payload, with_hash):
    try:
        out = parse_batch_items({"items": items}, payload, with_hash=with_hash)
    except RemoteProtocolError:
        return
    assert b"".join(chunk for *_, chunk in out) == payload


@given(st.lists(st.binary(max_size=50), min_size=1, max_size=8))
def test_well_formed_items_round_trip(chunks):
    items = [["ref", len(c)] for c in chunks]
    out = parse_batch_items({"items": items}, b"".join(chunks), with_hash=False)
    assert [c for *_, c in out] == chunks
    assert all(r == "ref" and ts == 0 for _, r, ts, _ in out)
    rows = [[b"\x01" * 32, "ref", 5, len(c)] for c in chunks]
    out = parse_batch_items({"items": rows}, b"".join(chunks), with_hash=True)
    assert [c for *_, c in out] == chunks and all(ts == 5 for _, _, ts, _ in out)
