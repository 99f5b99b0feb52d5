"""Pure-Python twin of `blocknode._fastpath`: the same functions, the same results.

Formats (byte-compatible with Garage's block manager, see ../shared/seed/block.rs):
- block hash: BLAKE2b-512 of the data, first 32 bytes (Garage's `blake2sum`);
- block path: ``<data_dir>/<hh>/<hh>/<64 hex>`` (first byte, second byte, full hash);
- RC entry: 8 bytes BE count = Present; 16 bytes (8 zero bytes + BE ms time) =
  Deletable at that time; ``None`` (absent key) = Absent;
- resync-queue key: 8 bytes BE due time in ms + the 32-byte hash.
"""

from __future__ import annotations

import hashlib
import os
import struct
from operator import index as _index

from blocknode.errors import CorruptEntry, InvalidHash

IMPLEMENTATION = "pure"

HASH_LEN = 32
_U64 = struct.Struct(">Q")
_U64x2 = struct.Struct(">QQ")
_U64_MAX = 2**64 - 1
_HEXDIGITS = frozenset("0123456789abcdefABCDEF")
_blake2b = hashlib.blake2b

#: RC states as returned by `rc_decode`: (state, value)
RC_ABSENT = 0
RC_PRESENT = 1
RC_DELETABLE = 2

Buffer = bytes | bytearray | memoryview
"""What data, hash and entry arguments accept: any C-contiguous bytes-like object."""

# Argument rules shared with the compiled twin (tests/unit/test_fastpath.py checks them):
# - a hash or entry argument that is not `bytes` becomes ``bytes(memoryview(x))``, so
#   bytes-like objects are accepted and anything else raises TypeError;
# - integers go through `operator.index` (TypeError for floats, str, ...); a value
#   outside 0..2**64-1 raises `CorruptEntry`, like any other unencodable entry;
# - `data_dir` goes through `os.fspath` and must come out a str.


def _hash_arg(hash: Buffer) -> bytes:
    if type(hash) is not bytes:
        hash = bytes(memoryview(hash))
    if len(hash) != HASH_LEN:
        raise InvalidHash(f"a block hash is {HASH_LEN} bytes, got {len(hash)}")
    return hash


def _bytes_arg(raw: Buffer) -> bytes:
    return raw if type(raw) is bytes else bytes(memoryview(raw))


def _u64(value: int, what: str) -> int:
    v = _index(value)
    if not 0 <= v <= _U64_MAX:
        raise CorruptEntry(f"{what} out of range 0..2**64-1: {v}")
    return v


def _dir_str(data_dir: str | os.PathLike[str]) -> str:
    if type(data_dir) is not str:
        data_dir = os.fspath(data_dir)
        if not isinstance(data_dir, str):
            raise TypeError(f"data_dir must be a str path, not {type(data_dir).__name__}")
    return data_dir


def block_hash(data: Buffer) -> bytes:
    """Garage's blake2sum: the first 32 bytes of BLAKE2b-512 of `data`.

    `data` is any C-contiguous bytes-like object; TypeError or BufferError otherwise.
    """
    return _blake2b(data).digest()[:HASH_LEN]


def verify(data: Buffer, hash: Buffer) -> bool:
    """True when `data` hashes to `hash` (a 32-byte block hash; `InvalidHash` if not)."""
    h = _hash_arg(hash)
    return _blake2b(data).digest()[:HASH_LEN] == h


def hash_to_hex(hash: Buffer) -> str:
    """The 64 lowercase hex characters of a 32-byte hash (`InvalidHash` if not 32 bytes)."""
    return _hash_arg(hash).hex()


def hex_to_hash(name: str) -> bytes:
    """Exactly 64 ASCII hex characters (either case) back to the 32-byte hash.

    `InvalidHash` for anything else (whitespace, signs, non-ASCII, other lengths);
    TypeError when `name` is not a str.
    """
    if not isinstance(name, str):
        raise TypeError(f"a hex block hash must be a str, not {type(name).__name__}")
    if len(name) != 2 * HASH_LEN or not name.isascii() or not _HEXDIGITS.issuperset(name):
        raise InvalidHash(f"not a block hash (want 64 hex characters): {name[:80]!r}")
    return bytes.fromhex(name)


def block_dir(data_dir: str | os.PathLike[str], hash: Buffer) -> str:
    """The fan-out directory of a block: ``data_dir/hh/hh``."""
    h = _hash_arg(hash).hex()
    return f"{_dir_str(data_dir)}/{h[0:2]}/{h[2:4]}"


def block_path(data_dir: str | os.PathLike[str], hash: Buffer) -> str:
    """The file path of a block: ``data_dir/hh/hh/<64 hex>``."""
    h = _hash_arg(hash).hex()
    return f"{_dir_str(data_dir)}/{h[0:2]}/{h[2:4]}/{h}"


def rc_encode(state: int, value: int) -> bytes | None:
    """Encode an RC entry: (RC_PRESENT, count) / (RC_DELETABLE, at_ms) / (RC_ABSENT, _).

    `CorruptEntry` for an unknown state, a count of 0, or a value outside 0..2**64-1.
    """
    if state == RC_PRESENT:
        v = _u64(value, "RC count")
        if v == 0:
            raise CorruptEntry("a present RC entry needs a count > 0, got 0")
        return _U64.pack(v)
    if state == RC_DELETABLE:
        return _U64x2.pack(0, _u64(value, "RC deletable time"))
    if state == RC_ABSENT:
        return None
    raise CorruptEntry(f"unknown RC state {state!r}")


def rc_decode(raw: Buffer | None) -> tuple[int, int]:
    """Decode RC bytes to (state, value); raises `CorruptEntry` on a bad length.

    As in Garage's ``RcEntry::parse``, the first 8 bytes of a Deletable entry are not
    checked, and 8 zero bytes decode as Present with a count of 0.
    """
    if raw is None:
        return (RC_ABSENT, 0)
    b = _bytes_arg(raw)
    n = len(b)
    if n == 8:
        return (RC_PRESENT, _U64.unpack(b)[0])
    if n == 16:
        return (RC_DELETABLE, _U64x2.unpack(b)[1])
    raise CorruptEntry(f"invalid RC entry of {n} bytes (want 8 or 16): metadata is corrupted")


def queue_key_encode(due_ms: int, hash: Buffer) -> bytes:
    """Resync-queue key: 8-byte BE due time in ms + the 32-byte hash."""
    h = _hash_arg(hash)
    return _U64.pack(_u64(due_ms, "resync due time")) + h


def queue_key_decode(key: Buffer) -> tuple[int, bytes]:
    """Split a resync-queue key into (due_ms, hash); `CorruptEntry` on a bad length."""
    b = _bytes_arg(key)
    if len(b) != 8 + HASH_LEN:
        raise CorruptEntry(f"invalid resync-queue key of {len(b)} bytes (want 40)")
    return (_U64.unpack_from(b)[0], b[8:])


def new_buffer(size: int) -> bytearray:
    """A bytearray of `size` bytes whose contents are unspecified (here: zeros; the
    compiled twin does not fill it). The caller writes every byte before reading any."""
    n = _index(size)
    if n < 0:
        raise ValueError("buffer size must not be negative")
    return bytearray(n)
