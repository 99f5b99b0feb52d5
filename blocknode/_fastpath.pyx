# cython: language_level=3
"""Compiled fast path: the same functions and results as `blocknode._purepath`."""

import hashlib

from blocknode.errors import CorruptEntry, InvalidHash

IMPLEMENTATION = "compiled"
HASH_LEN = 32
RC_ABSENT = 0
RC_PRESENT = 1
RC_DELETABLE = 2

cdef object _blake2b = hashlib.blake2b


def block_hash(data):
    """Garage's blake2sum: the first 32 bytes of BLAKE2b-512 of `data`."""
    return _blake2b(data).digest()[:32]


def verify(data, bytes hash):
    """True when `data` hashes to `hash` (a 32-byte block hash)."""
    if len(hash) != 32:
        raise InvalidHash(f"a block hash is 32 bytes, got {len(hash)}")
    return _blake2b(data).digest()[:32] == hash


def hash_to_hex(bytes hash):
    """The 64 lowercase hex characters of a 32-byte hash."""
    if len(hash) != 32:
        raise InvalidHash(f"a block hash is 32 bytes, got {len(hash)}")
    return hash.hex()


def hex_to_hash(str name):
    """A 64-char hex string back to the 32-byte hash; `InvalidHash` otherwise."""
    try:
        if len(name) != 64:
            raise ValueError
        return bytes.fromhex(name)
    except ValueError:
        raise InvalidHash(f"not a block hash (want 64 hex characters): {name[:80]!r}") from None


def block_dir(str data_dir, bytes hash):
    """The fan-out directory of a block: ``data_dir/hh/hh``."""
    h = hash_to_hex(hash)
    return f"{data_dir}/{h[0:2]}/{h[2:4]}"


def block_path(str data_dir, bytes hash):
    """The file path of a block: ``data_dir/hh/hh/<64 hex>``."""
    h = hash_to_hex(hash)
    return f"{data_dir}/{h[0:2]}/{h[2:4]}/{h}"


def rc_encode(int state, value):
    """Encode an RC entry: (RC_PRESENT, count) / (RC_DELETABLE, at_ms) / (RC_ABSENT, _)."""
    if state == RC_PRESENT:
        if value <= 0:
            raise CorruptEntry(f"a present RC entry needs a count > 0, got {value}")
        return int(value).to_bytes(8, "big")
    if state == RC_DELETABLE:
        return bytes(8) + int(value).to_bytes(8, "big")
    if state == RC_ABSENT:
        return None
    raise CorruptEntry(f"unknown RC state {state}")


def rc_decode(raw):
    """Decode RC bytes to (state, value); raises `CorruptEntry` on a bad length."""
    if raw is None:
        return (RC_ABSENT, 0)
    n = len(raw)
    if n == 8:
        return (RC_PRESENT, int.from_bytes(raw, "big"))
    if n == 16:
        return (RC_DELETABLE, int.from_bytes(raw[8:], "big"))
    raise CorruptEntry(f"invalid RC entry of {n} bytes (want 8 or 16): metadata is corrupted")


def queue_key_encode(due_ms, bytes hash):
    """Resync-queue key: 8-byte BE due time in ms + the 32-byte hash."""
    if len(hash) != 32:
        raise InvalidHash(f"a block hash is 32 bytes, got {len(hash)}")
    return int(due_ms).to_bytes(8, "big") + hash


def queue_key_decode(key):
    """Split a resync-queue key into (due_ms, hash); `CorruptEntry` on a bad length."""
    if len(key) != 40:
        raise CorruptEntry(f"invalid resync-queue key of {len(key)} bytes (want 40)")
    return (int.from_bytes(key[:8], "big"), bytes(key[8:]))
