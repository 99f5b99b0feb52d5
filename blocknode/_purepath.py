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
import struct

from blocknode.errors import CorruptEntry, InvalidHash

IMPLEMENTATION = "pure"

HASH_LEN = 32
_U64 = struct.Struct(">Q")
_U64x2 = struct.Struct(">QQ")
_HEXDIGITS = frozenset("0123456789abcdef")
_blake2b = hashlib.blake2b

#: RC states as returned by `rc_decode`: (state, value)
RC_ABSENT = 0
RC_PRESENT = 1
RC_DELETABLE = 2


def block_hash(data: bytes | bytearray | memoryview) -> bytes:
    """Garage's blake2sum: the first 32 bytes of BLAKE2b-512 of `data`."""
    return _blake2b(data).digest()[:HASH_LEN]


def verify(data: bytes | bytearray | memoryview, hash: bytes) -> bool:
    """True when `data` hashes to `hash` (a 32-byte block hash)."""
    if len(hash) != HASH_LEN:
        raise InvalidHash(f"a block hash is {HASH_LEN} bytes, got {len(hash)}")
    return _blake2b(data).digest()[:HASH_LEN] == hash


def hash_to_hex(hash: bytes) -> str:
    """The 64 lowercase hex characters of a 32-byte hash."""
    if len(hash) != HASH_LEN:
        raise InvalidHash(f"a block hash is {HASH_LEN} bytes, got {len(hash)}")
    return hash.hex()


def hex_to_hash(name: str) -> bytes:
    """A 64-char lowercase/uppercase hex string back to the 32-byte hash.

    Raises `InvalidHash` for anything that is not exactly 64 hex characters.
    """
    if len(name) != 2 * HASH_LEN or not _HEXDIGITS.issuperset(name.lower()):
        raise InvalidHash(f"not a block hash (want 64 hex characters): {name[:80]!r}")
    return bytes.fromhex(name)


def block_dir(data_dir: str, hash: bytes) -> str:
    """The fan-out directory of a block: ``data_dir/hh/hh``."""
    h = hash_to_hex(hash)
    return f"{data_dir}/{h[0:2]}/{h[2:4]}"


def block_path(data_dir: str, hash: bytes) -> str:
    """The file path of a block: ``data_dir/hh/hh/<64 hex>``."""
    h = hash_to_hex(hash)
    return f"{data_dir}/{h[0:2]}/{h[2:4]}/{h}"


def rc_encode(state: int, value: int) -> bytes | None:
    """Encode an RC entry: (RC_PRESENT, count) / (RC_DELETABLE, at_ms) / (RC_ABSENT, _)."""
    if state == RC_PRESENT:
        if value <= 0:
            raise CorruptEntry(f"a present RC entry needs a count > 0, got {value}")
        return _U64.pack(value)
    if state == RC_DELETABLE:
        return _U64x2.pack(0, value)
    if state == RC_ABSENT:
        return None
    raise CorruptEntry(f"unknown RC state {state}")


def rc_decode(raw: bytes | None) -> tuple[int, int]:
    """Decode RC bytes to (state, value); raises `CorruptEntry` on a bad length."""
    if raw is None:
        return (RC_ABSENT, 0)
    n = len(raw)
    if n == 8:
        return (RC_PRESENT, _U64.unpack(raw)[0])
    if n == 16:
        return (RC_DELETABLE, _U64x2.unpack(raw)[1])
    raise CorruptEntry(f"invalid RC entry of {n} bytes (want 8 or 16): metadata is corrupted")


def queue_key_encode(due_ms: int, hash: bytes) -> bytes:
    """Resync-queue key: 8-byte BE due time in ms + the 32-byte hash."""
    if len(hash) != HASH_LEN:
        raise InvalidHash(f"a block hash is {HASH_LEN} bytes, got {len(hash)}")
    return _U64.pack(due_ms) + hash


def queue_key_decode(key: bytes) -> tuple[int, bytes]:
    """Split a resync-queue key into (due_ms, hash); `CorruptEntry` on a bad length."""
    if len(key) != 8 + HASH_LEN:
        raise CorruptEntry(f"invalid resync-queue key of {len(key)} bytes (want 40)")
    return (_U64.unpack_from(key)[0], bytes(key[8:]))
