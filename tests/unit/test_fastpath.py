"""The fast path: known answers, pure/compiled parity, and the implementation selector.

Both implementations are imported directly, whatever `blocknode.fastpath` picked.
When the compiled module is missing, tests of the compiled side are skipped, unless
``BLOCKNODE_REQUIRE_FAST=1``, where they fail.
"""

from __future__ import annotations

import array
import hashlib
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from blocknode import _purepath as pure
from blocknode import fastpath
from blocknode.errors import BlocknodeError, CorruptEntry, InvalidHash


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


REQUIRE_FAST = _truthy("BLOCKNODE_REQUIRE_FAST")
try:
    from blocknode import _fastpath as compiled_or_none
except ImportError as exc:
    compiled_or_none = None
    _MISSING = f"compiled blocknode._fastpath not built ({exc})"
else:
    _MISSING = ""


def _need_compiled() -> ModuleType:
    if compiled_or_none is None:
        if REQUIRE_FAST:
            pytest.fail(f"BLOCKNODE_REQUIRE_FAST=1 but {_MISSING}")
        pytest.skip(f"{_MISSING}: parity checks only the pure side")
    return compiled_or_none


@pytest.fixture
def compiled() -> ModuleType:
    return _need_compiled()


@pytest.fixture(params=["pure", "compiled"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return pure if request.param == "pure" else _need_compiled()


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """The result of a call, or its error type (plus message for our own errors)."""
    try:
        return ("ok", fn(*args))
    except BlocknodeError as exc:
        return ("error", type(exc), str(exc))
    except Exception as exc:  # noqa: BLE001 - parity compares any error type
        return ("error", type(exc))


def same(name: str, *args: Any) -> tuple[str, Any]:
    """Call `name` on both twins and assert identical results or error types.

    Without the compiled module (and without BLOCKNODE_REQUIRE_FAST) only the pure
    side runs, so the properties each test checks still hold for it;
    `test_compiled_module_available` reports the skipped side.
    """
    want = outcome(getattr(pure, name), *args)
    if compiled_or_none is None and not REQUIRE_FAST:
        return want
    mod = _need_compiled()
    got = outcome(getattr(mod, name), *args)
    assert got == want, f"{name}{args!r}: compiled {got!r} != pure {want!r}"
    if want[0] == "ok" and want[1] is not None:
        assert type(got[1]) is type(want[1])
    return want


def test_compiled_module_available() -> None:
    """Skipped (failed under BLOCKNODE_REQUIRE_FAST=1) when parity has no compiled side."""
    assert _need_compiled().IMPLEMENTATION == "compiled"


def ref_hash(data: bytes) -> bytes:
    return hashlib.blake2b(data).digest()[:32]


# ---------------------------------------------------------------- strategies

HASH = st.binary(min_size=32, max_size=32)
BUFFERS = st.one_of(
    st.binary(max_size=600),
    st.binary(max_size=5000).map(bytearray),
    st.binary(max_size=300).map(memoryview),
)
NOT_BUFFERS = st.sampled_from([None, 1, 1.5, "x" * 32, [0] * 32, object()])
HASH_ARGS = st.one_of(
    HASH,
    HASH.map(bytearray),
    HASH.map(memoryview),
    st.binary(min_size=64, max_size=64).map(lambda b: memoryview(b)[::2]),  # non-contiguous
    HASH.map(lambda b: array.array("I", b)),
    st.binary(max_size=40),
    NOT_BUFFERS,
)
HEX_CHARS = "0123456789abcdefABCDEF"
ODD_CHARS = " \t\n+-_xXgG\u0660\u00e9\uff10\u0130\u212a\x00"
HEX_ARGS = st.one_of(
    HASH.map(bytes.hex),
    HASH.map(lambda b: b.hex().upper()),
    st.text(alphabet=HEX_CHARS + ODD_CHARS, min_size=62, max_size=66),
    st.text(max_size=70),
    HASH.map(lambda b: b.hex().encode()),  # bytes, not str
    NOT_BUFFERS,
)
DATA_DIRS = st.one_of(
    st.text(max_size=20),
    st.text(max_size=20).map(pathlib.PurePosixPath),
    st.sampled_from([b"/data", None, 3]),
)
U64ISH = st.one_of(
    st.integers(min_value=0, max_value=2**64 - 1),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2**63, 2**64 - 1, 2**64, -1, True, False]),
    st.sampled_from([1.0, "1", None, 2.5]),
)
STATES = st.one_of(st.integers(min_value=-1, max_value=4), st.sampled_from([1.0, True, "1", None]))
RAW_ENTRIES = st.one_of(
    st.none(),
    st.binary(max_size=20),
    st.binary(max_size=20).map(bytearray),
    st.binary(max_size=20).map(memoryview),
    NOT_BUFFERS,
)


# ---------------------------------------------------------------- known answers


KNOWN = {
    b"": "786a02f742015903c6c6fd852552d272912f4740e15847618a86e217f71f5419",
    b"abc": "ba80a53f981c4d0d6a2797b69f12f6e94c212f14685ac4b74b12bb6fdbffa2d1",
}


@pytest.mark.parametrize("data", sorted(KNOWN))
def test_known_hashes(impl: ModuleType, data: bytes) -> None:
    assert impl.block_hash(data).hex() == KNOWN[data] == ref_hash(data).hex()


@pytest.mark.parametrize(
    "size",
    [0, 1, 63, 64, 127, 128, 129, 255, 256, 257, 2047, 2048, 2049, 4096, 1 << 20, (1 << 20) + 1],
)
def test_hash_matches_hashlib_at_block_boundaries(impl: ModuleType, size: int) -> None:
    data = bytes((i * 7 + size) & 0xFF for i in range(size)) if size < 5000 else os.urandom(size)
    want = ref_hash(data)
    assert want != hashlib.blake2b(data, digest_size=32).digest()  # not the 256-bit variant
    for arg in (data, bytearray(data), memoryview(data), array.array("B", data)):
        assert impl.block_hash(arg) == want
        assert impl.verify(arg, want) is True
    assert impl.verify(data, bytes(32)) is False


def test_rc_layout(impl: ModuleType) -> None:
    assert impl.rc_encode(impl.RC_PRESENT, 1) == b"\x00" * 7 + b"\x01"
    assert impl.rc_encode(impl.RC_PRESENT, 2**64 - 1) == b"\xff" * 8
    assert impl.rc_encode(impl.RC_DELETABLE, 1000) == b"\x00" * 8 + (1000).to_bytes(8, "big")
    assert impl.rc_encode(impl.RC_ABSENT, 0) is None
    assert impl.rc_decode(None) == (impl.RC_ABSENT, 0)
    assert impl.rc_decode(b"\x00" * 7 + b"\x05") == (impl.RC_PRESENT, 5)
    assert impl.rc_decode(b"\x00" * 8 + (1000).to_bytes(8, "big")) == (impl.RC_DELETABLE, 1000)
    with pytest.raises(CorruptEntry, match="corrupted"):
        impl.rc_decode(b"\x00" * 3)
    for bad in (0, -1, 2**64):
        with pytest.raises(CorruptEntry):
            impl.rc_encode(impl.RC_PRESENT, bad)
    for bad in (-1, 2**64):
        with pytest.raises(CorruptEntry):
            impl.rc_encode(impl.RC_DELETABLE, bad)
    with pytest.raises(CorruptEntry):
        impl.rc_encode(7, 1)


def test_path_and_queue_layout(impl: ModuleType) -> None:
    h = bytes.fromhex("abcd" + "01" * 30)
    hx = h.hex()
    assert impl.hash_to_hex(h) == hx
    assert impl.block_dir("/data", h) == "/data/ab/cd"
    assert impl.block_path("/data", h) == f"/data/ab/cd/{hx}"
    assert impl.block_path(pathlib.Path("/data"), h) == f"/data/ab/cd/{hx}"
    assert impl.block_path("/dåta", h) == f"/dåta/ab/cd/{hx}"
    assert impl.queue_key_encode(1000, h) == (1000).to_bytes(8, "big") + h
    assert impl.queue_key_decode((1000).to_bytes(8, "big") + h) == (1000, h)
    with pytest.raises(CorruptEntry):
        impl.queue_key_decode(b"\x00" * 39)
    with pytest.raises(InvalidHash):
        impl.block_path("/data", h[:31])


@pytest.mark.parametrize(
    "name",
    [
        "ab" * 31 + "a",  # 63
        "ab" * 32 + "a",  # 65
        "ab" * 31 + " a",  # fromhex would accept the space
        " " + "ab" * 31 + "a",
        "ab" * 31 + "+1",
        "ab" * 31 + "-1",
        "0x" + "ab" * 31,
        "ab" * 31 + "\u0660\u0661",  # Arabic-Indic digits
        "ab" * 31 + "\uff10\uff11",  # full-width digits
        "ab" * 31 + "g0",
        "",
    ],
)
def test_hex_is_strict(impl: ModuleType, name: str) -> None:
    with pytest.raises(InvalidHash):
        impl.hex_to_hash(name)


def test_hex_accepts_both_cases(impl: ModuleType) -> None:
    h = bytes(range(32))
    assert impl.hex_to_hash(h.hex()) == h
    assert impl.hex_to_hash(h.hex().upper()) == h
    with pytest.raises(TypeError):
        impl.hex_to_hash(h.hex().encode())


def test_same_public_surface(compiled: ModuleType) -> None:
    for name in fastpath.__all__:
        assert hasattr(pure, name) and hasattr(compiled, name), name
    for name in ("HASH_LEN", "RC_ABSENT", "RC_PRESENT", "RC_DELETABLE"):
        assert getattr(pure, name) == getattr(compiled, name)
    assert (pure.IMPLEMENTATION, compiled.IMPLEMENTATION) == ("pure", "compiled")


def test_new_buffer_is_a_writable_bytearray_of_the_size(impl: ModuleType) -> None:
    for n in (0, 1, 4096, 1 << 20):
        buf = impl.new_buffer(n)
        assert type(buf) is bytearray and len(buf) == n
        buf[:] = b"\x5a" * n
        assert buf == b"\x5a" * n
    with pytest.raises(ValueError):
        impl.new_buffer(-1)
    with pytest.raises(TypeError):
        impl.new_buffer(1.5)


# ---------------------------------------------------------------- parity (hypothesis)


@given(BUFFERS)
@example(b"x" * 128)
@example(memoryview(b"abcdef")[::2])
@example("text")
def test_parity_block_hash(data: Any) -> None:
    result = same("block_hash", data)
    if result[0] == "ok":
        assert result[1] == ref_hash(bytes(data))


@given(st.one_of(BUFFERS, NOT_BUFFERS), HASH_ARGS)
def test_parity_verify(data: Any, hash: Any) -> None:
    same("verify", data, hash)
    if isinstance(data, bytes):
        assert same("verify", data, ref_hash(data)) == ("ok", True)


@given(HASH_ARGS)
def test_parity_hash_to_hex(hash: Any) -> None:
    result = same("hash_to_hex", hash)
    if result[0] == "ok":
        assert same("hex_to_hash", result[1]) == ("ok", bytes(memoryview(hash)))


@given(HEX_ARGS)
@example("ab" * 31 + " a")
@example("ab" * 31 + "\u0130")
def test_parity_hex_to_hash(name: Any) -> None:
    same("hex_to_hash", name)


@given(DATA_DIRS, HASH_ARGS)
def test_parity_paths(data_dir: Any, hash: Any) -> None:
    same("block_dir", data_dir, hash)
    same("block_path", data_dir, hash)


@given(STATES, U64ISH)
def test_parity_rc_encode(state: Any, value: Any) -> None:
    result = same("rc_encode", state, value)
    if result[0] == "ok" and result[1] is not None:
        assert same("rc_decode", result[1]) == ("ok", (int(state), int(value)))


@given(RAW_ENTRIES)
def test_parity_rc_decode(raw: Any) -> None:
    same("rc_decode", raw)


@given(U64ISH, HASH_ARGS)
def test_parity_queue_key_encode(due_ms: Any, hash: Any) -> None:
    result = same("queue_key_encode", due_ms, hash)
    if result[0] == "ok":
        assert same("queue_key_decode", result[1]) == ("ok", (int(due_ms), bytes(memoryview(hash))))


@given(
    st.one_of(
        st.binary(min_size=38, max_size=42),
        RAW_ENTRIES,
        st.binary(min_size=40, max_size=40).map(bytearray),
    )
)
def test_parity_queue_key_decode(key: Any) -> None:
    same("queue_key_decode", key)


# ---------------------------------------------------------------- selector


def _selector(**env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKNODE_")}
    return subprocess.run(
        [sys.executable, "-c", "import blocknode.fastpath as f; print(f.IMPLEMENTATION)"],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_selector_pure_forced() -> None:
    proc = _selector(BLOCKNODE_PURE="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "pure"


def test_selector_contradiction_errors() -> None:
    proc = _selector(BLOCKNODE_PURE="1", BLOCKNODE_REQUIRE_FAST="1")
    assert proc.returncode != 0
    assert "contradict" in proc.stderr


def test_selector_require_fast(compiled: ModuleType) -> None:
    proc = _selector(BLOCKNODE_REQUIRE_FAST="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "compiled"


def test_selector_matches_environment() -> None:
    if _truthy("BLOCKNODE_PURE"):
        assert fastpath.IMPLEMENTATION == "pure"
    elif REQUIRE_FAST:
        assert fastpath.IMPLEMENTATION == "compiled"
    chosen = pure if fastpath.IMPLEMENTATION == "pure" else compiled_or_none
    assert chosen is not None and fastpath.block_hash is chosen.block_hash
