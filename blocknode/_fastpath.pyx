# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled fast path: the same functions and results as `blocknode._purepath`.

The pure twin defines the API and the formats; read its docstrings. Here:

- BLAKE2b-512 is computed by a small C implementation embedded below (RFC 7693,
  one stack state, no Python objects): it skips the cost of creating a hashlib
  object and its 64-byte digest, which dominates for small blocks, and compiled
  at -O3 it measured a few per cent faster than CPython's blake2b on 1 MiB.
  Like hashlib, it releases the GIL for inputs of 2 KiB or more. Debian's libb2
  is not used: it measured about 20 % slower than CPython's.
- Hex, paths, RC entries and queue keys are built directly in C buffers.
- Hash and entry arguments that are not `bytes` are normalised exactly as the
  pure twin does (``bytes(memoryview(x))``), so both accept and reject the same
  objects with the same error types.
"""

import os

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsUnsignedLongLong, PyLong_FromUnsignedLongLong
from cpython.number cimport PyNumber_Index
from libc.string cimport memcmp, memcpy

from blocknode.errors import CorruptEntry, InvalidHash

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    unsigned char *PyUnicode_1BYTE_DATA(object o)
    bint PyUnicode_IS_ASCII(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)

cdef extern from *:
    """
    /* BLAKE2b-512 (RFC 7693), unkeyed, one shot; writes the first 32 bytes of the
       64-byte digest (Garage's blake2sum). Written from the RFC; checked against
       hashlib by tests/unit/test_fastpath.py. */
    #include <stdint.h>
    #include <string.h>

    #if defined(__GNUC__) && !defined(__clang__)
    #pragma GCC push_options
    #pragma GCC optimize("O3")
    #endif

    static const uint64_t bn_b2b_iv[8] = {
        0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
        0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
        0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};

    static inline uint64_t bn_load64(const unsigned char *p) {
        uint64_t w;
        memcpy(&w, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
    #endif
        return w;
    }

    static inline void bn_store64(unsigned char *p, uint64_t w) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
    #endif
        memcpy(p, &w, 8);
    }

    #define BN_ROTR64(x, n) (((x) >> (n)) | ((x) << (64 - (n))))
    #define BN_G(a, b, c, d, x, y)              \\
        do {                                    \\
            a = a + b + (x); d = BN_ROTR64(d ^ a, 32); \\
            c = c + d;       b = BN_ROTR64(b ^ c, 24); \\
            a = a + b + (y); d = BN_ROTR64(d ^ a, 16); \\
            c = c + d;       b = BN_ROTR64(b ^ c, 63); \\
        } while (0)
    #define BN_ROUND(s0,s1,s2,s3,s4,s5,s6,s7,s8,s9,s10,s11,s12,s13,s14,s15) \\
        do {                                                  \\
            BN_G(v0, v4, v8,  v12, m[s0],  m[s1]);            \\
            BN_G(v1, v5, v9,  v13, m[s2],  m[s3]);            \\
            BN_G(v2, v6, v10, v14, m[s4],  m[s5]);            \\
            BN_G(v3, v7, v11, v15, m[s6],  m[s7]);            \\
            BN_G(v0, v5, v10, v15, m[s8],  m[s9]);            \\
            BN_G(v1, v6, v11, v12, m[s10], m[s11]);           \\
            BN_G(v2, v7, v8,  v13, m[s12], m[s13]);           \\
            BN_G(v3, v4, v9,  v14, m[s14], m[s15]);           \\
        } while (0)

    static void bn_b2b_compress(uint64_t h[8], const unsigned char *block,
                                uint64_t t0, uint64_t t1, int last) {
        uint64_t m[16];
        int i;
        for (i = 0; i < 16; i++) m[i] = bn_load64(block + 8 * i);
        uint64_t v0 = h[0], v1 = h[1], v2 = h[2], v3 = h[3];
        uint64_t v4 = h[4], v5 = h[5], v6 = h[6], v7 = h[7];
        uint64_t v8 = bn_b2b_iv[0], v9 = bn_b2b_iv[1], v10 = bn_b2b_iv[2], v11 = bn_b2b_iv[3];
        uint64_t v12 = bn_b2b_iv[4] ^ t0, v13 = bn_b2b_iv[5] ^ t1;
        uint64_t v14 = last ? ~bn_b2b_iv[6] : bn_b2b_iv[6], v15 = bn_b2b_iv[7];
        BN_ROUND( 0,  1,  2,  3,  4,  5,  6,  7,  8,  9, 10, 11, 12, 13, 14, 15);
        BN_ROUND(14, 10,  4,  8,  9, 15, 13,  6,  1, 12,  0,  2, 11,  7,  5,  3);
        BN_ROUND(11,  8, 12,  0,  5,  2, 15, 13, 10, 14,  3,  6,  7,  1,  9,  4);
        BN_ROUND( 7,  9,  3,  1, 13, 12, 11, 14,  2,  6,  5, 10,  4,  0, 15,  8);
        BN_ROUND( 9,  0,  5,  7,  2,  4, 10, 15, 14,  1, 11, 12,  6,  8,  3, 13);
        BN_ROUND( 2, 12,  6, 10,  0, 11,  8,  3,  4, 13,  7,  5, 15, 14,  1,  9);
        BN_ROUND(12,  5,  1, 15, 14, 13,  4, 10,  0,  7,  6,  3,  9,  2,  8, 11);
        BN_ROUND(13, 11,  7, 14, 12,  1,  3,  9,  5,  0, 15,  4,  8,  6,  2, 10);
        BN_ROUND( 6, 15, 14,  9, 11,  3,  0,  8, 12,  2, 13,  7,  1,  4, 10,  5);
        BN_ROUND(10,  2,  8,  4,  7,  6,  1,  5, 15, 11,  9, 14,  3, 12, 13,  0);
        BN_ROUND( 0,  1,  2,  3,  4,  5,  6,  7,  8,  9, 10, 11, 12, 13, 14, 15);
        BN_ROUND(14, 10,  4,  8,  9, 15, 13,  6,  1, 12,  0,  2, 11,  7,  5,  3);
        h[0] ^= v0 ^ v8;  h[1] ^= v1 ^ v9;  h[2] ^= v2 ^ v10; h[3] ^= v3 ^ v11;
        h[4] ^= v4 ^ v12; h[5] ^= v5 ^ v13; h[6] ^= v6 ^ v14; h[7] ^= v7 ^ v15;
    }

    static void bn_blake2b_32(const unsigned char *data, size_t n, unsigned char out[32]) {
        uint64_t h[8];
        unsigned char last[128];
        uint64_t t0 = 0, t1 = 0;
        int i;
        for (i = 0; i < 8; i++) h[i] = bn_b2b_iv[i];
        h[0] ^= 0x01010040ULL; /* digest length 64, no key, fanout 1, depth 1 */
        while (n > 128) {
            t0 += 128;
            if (t0 < 128) t1++;
            bn_b2b_compress(h, data, t0, t1, 0);
            data += 128;
            n -= 128;
        }
        memset(last, 0, sizeof last);
        if (n) memcpy(last, data, n);
        t0 += n;
        if (t0 < n) t1++;
        bn_b2b_compress(h, last, t0, t1, 1);
        for (i = 0; i < 4; i++) bn_store64(out + 8 * i, h[i]);
    }

    #if defined(__GNUC__) && !defined(__clang__)
    #pragma GCC pop_options
    #endif
    """
    void bn_blake2b_32(const unsigned char *data, size_t n, unsigned char *out) nogil


IMPLEMENTATION = "compiled"
HASH_LEN = 32
RC_ABSENT = 0
RC_PRESENT = 1
RC_DELETABLE = 2

#: Inputs of at least this many bytes are hashed with the GIL released (as hashlib does).
cdef enum:
    _GIL_FREE_MIN = 2048
    _ABSENT = 0
    _PRESENT = 1
    _DELETABLE = 2

cdef object _fspath = os.fspath
cdef const char *_HEX = b"0123456789abcdef"
cdef unsigned char _UNHEX[256]


cdef void _init_unhex() noexcept:
    cdef int i
    for i in range(256):
        _UNHEX[i] = 0xFF
    for i in range(10):
        _UNHEX[ord("0") + i] = i
    for i in range(6):
        _UNHEX[ord("a") + i] = 10 + i
        _UNHEX[ord("A") + i] = 10 + i


_init_unhex()


# ---------------------------------------------------------------- helpers

cdef inline bytes _hash_arg(object hash):
    """The 32 bytes of a hash argument (bytes, bytearray, memoryview, ...)."""
    if type(hash) is not bytes:
        hash = bytes(memoryview(hash))
    if PyBytes_GET_SIZE(hash) != 32:
        raise InvalidHash(f"a block hash is 32 bytes, got {PyBytes_GET_SIZE(hash)}")
    return <bytes>hash


cdef inline bytes _bytes_arg(object raw):
    if type(raw) is not bytes:
        raw = bytes(memoryview(raw))
    return <bytes>raw


cdef int _digest32(object data, unsigned char *out) except -1:
    """Write the block hash of `data` (any C-contiguous buffer) to `out`.

    Inputs of `_GIL_FREE_MIN` bytes or more are hashed with the GIL released; the
    buffer export held meanwhile keeps a bytearray from being resized under us.
    """
    cdef Py_buffer view
    cdef const unsigned char *p
    cdef size_t n
    if type(data) is bytes:
        p = <const unsigned char *>PyBytes_AS_STRING(data)
        n = <size_t>PyBytes_GET_SIZE(data)
        if n < _GIL_FREE_MIN:
            bn_blake2b_32(p, n, out)
        else:
            with nogil:
                bn_blake2b_32(p, n, out)
        return 0
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    p = <const unsigned char *>view.buf
    n = <size_t>view.len
    if n < _GIL_FREE_MIN:
        bn_blake2b_32(p, n, out)
    else:
        with nogil:
            bn_blake2b_32(p, n, out)
    PyBuffer_Release(&view)
    return 0


cdef inline unsigned long long _u64(object value, str what) except? 0xFFFFFFFFFFFFFFFF:
    """`value` as a C uint64; `CorruptEntry` when it does not fit, TypeError if not an int."""
    if type(value) is not int:
        value = PyNumber_Index(value)
    try:
        return PyLong_AsUnsignedLongLong(value)
    except OverflowError:
        raise CorruptEntry(f"{what} out of range 0..2**64-1: {value}") from None


cdef inline void _store_be64(unsigned char *p, unsigned long long v) noexcept:
    cdef int i
    for i in range(7, -1, -1):
        p[i] = <unsigned char>(v & 0xFF)
        v >>= 8


cdef inline unsigned long long _load_be64(const unsigned char *p) noexcept:
    cdef unsigned long long v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v


cdef inline void _hex64(unsigned char *dst, const unsigned char *h) noexcept:
    cdef int i
    for i in range(32):
        dst[2 * i] = _HEX[h[i] >> 4]
        dst[2 * i + 1] = _HEX[h[i] & 0xF]


cdef str _dir_str(object data_dir):
    if type(data_dir) is not str:
        data_dir = _fspath(data_dir)
        if not isinstance(data_dir, str):
            raise TypeError(f"data_dir must be a str path, not {type(data_dir).__name__}")
    return <str>data_dir


cdef str _join(str d, const unsigned char *h, bint full):
    """``d/hh/hh`` (+ ``/<64 hex>`` when `full`), built in one ASCII buffer."""
    cdef Py_ssize_t n, size
    cdef unsigned char *p
    cdef unsigned char hx[64]
    _hex64(hx, h)
    if not PyUnicode_IS_ASCII(d):
        s = PyBytes_FromStringAndSize(<char *>hx, 64).decode("ascii")
        if full:
            return f"{d}/{s[0:2]}/{s[2:4]}/{s}"
        return f"{d}/{s[0:2]}/{s[2:4]}"
    n = PyUnicode_GET_LENGTH(d)
    size = n + 6 + (65 if full else 0)
    out = PyUnicode_New(size, 127)
    p = PyUnicode_1BYTE_DATA(out)
    memcpy(p, PyUnicode_1BYTE_DATA(d), n)
    p += n
    p[0] = b"/"
    p[1] = hx[0]
    p[2] = hx[1]
    p[3] = b"/"
    p[4] = hx[2]
    p[5] = hx[3]
    if full:
        p[6] = b"/"
        memcpy(p + 7, hx, 64)
    return <str>out


# ---------------------------------------------------------------- public API

def block_hash(data):
    """Garage's blake2sum: the first 32 bytes of BLAKE2b-512 of `data`."""
    cdef unsigned char out[32]
    _digest32(data, out)
    return PyBytes_FromStringAndSize(<char *>out, 32)


def verify(data, hash):
    """True when `data` hashes to `hash` (a 32-byte block hash)."""
    cdef unsigned char out[32]
    cdef bytes h = _hash_arg(hash)
    _digest32(data, out)
    return memcmp(out, PyBytes_AS_STRING(h), 32) == 0


def hash_to_hex(hash):
    """The 64 lowercase hex characters of a 32-byte hash."""
    cdef bytes h = _hash_arg(hash)
    out = PyUnicode_New(64, 127)
    _hex64(PyUnicode_1BYTE_DATA(out), <const unsigned char *>PyBytes_AS_STRING(h))
    return out


def hex_to_hash(name):
    """Exactly 64 ASCII hex characters (either case) back to the 32-byte hash.

    `InvalidHash` for anything else (whitespace, signs, non-ASCII, other lengths);
    TypeError when `name` is not a str.
    """
    cdef unsigned char out[32]
    cdef const unsigned char *p
    cdef unsigned char hi, lo
    cdef int i
    if not isinstance(name, str):
        raise TypeError(f"a hex block hash must be a str, not {type(name).__name__}")
    if PyUnicode_GET_LENGTH(name) == 64 and PyUnicode_IS_ASCII(name):
        p = PyUnicode_1BYTE_DATA(name)
        for i in range(32):
            hi = _UNHEX[p[2 * i]]
            lo = _UNHEX[p[2 * i + 1]]
            if (hi | lo) & 0xF0:
                break
            out[i] = (hi << 4) | lo
        else:
            return PyBytes_FromStringAndSize(<char *>out, 32)
    raise InvalidHash(f"not a block hash (want 64 hex characters): {name[:80]!r}")


def block_dir(data_dir, hash):
    """The fan-out directory of a block: ``data_dir/hh/hh``."""
    cdef bytes h = _hash_arg(hash)
    return _join(_dir_str(data_dir), <const unsigned char *>PyBytes_AS_STRING(h), False)


def block_path(data_dir, hash):
    """The file path of a block: ``data_dir/hh/hh/<64 hex>``."""
    cdef bytes h = _hash_arg(hash)
    return _join(_dir_str(data_dir), <const unsigned char *>PyBytes_AS_STRING(h), True)


def rc_encode(state, value):
    """Encode an RC entry: (RC_PRESENT, count) / (RC_DELETABLE, at_ms) / (RC_ABSENT, _)."""
    cdef unsigned char buf[16]
    cdef unsigned long long v
    if state == _PRESENT:
        v = _u64(value, "RC count")
        if v == 0:
            raise CorruptEntry("a present RC entry needs a count > 0, got 0")
        _store_be64(buf, v)
        return PyBytes_FromStringAndSize(<char *>buf, 8)
    if state == _DELETABLE:
        v = _u64(value, "RC deletable time")
        _store_be64(buf, 0)
        _store_be64(buf + 8, v)
        return PyBytes_FromStringAndSize(<char *>buf, 16)
    if state == _ABSENT:
        return None
    raise CorruptEntry(f"unknown RC state {state!r}")


def rc_decode(raw):
    """Decode RC bytes to (state, value); raises `CorruptEntry` on a bad length."""
    if raw is None:
        return (_ABSENT, 0)
    cdef bytes b = _bytes_arg(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(b)
    if n == 8:
        return (_PRESENT, PyLong_FromUnsignedLongLong(_load_be64(p)))
    if n == 16:
        return (_DELETABLE, PyLong_FromUnsignedLongLong(_load_be64(p + 8)))
    raise CorruptEntry(f"invalid RC entry of {n} bytes (want 8 or 16): metadata is corrupted")


def queue_key_encode(due_ms, hash):
    """Resync-queue key: 8-byte BE due time in ms + the 32-byte hash."""
    cdef unsigned char buf[40]
    cdef bytes h = _hash_arg(hash)
    _store_be64(buf, _u64(due_ms, "resync due time"))
    memcpy(buf + 8, PyBytes_AS_STRING(h), 32)
    return PyBytes_FromStringAndSize(<char *>buf, 40)


def queue_key_decode(key):
    """Split a resync-queue key into (due_ms, hash); `CorruptEntry` on a bad length."""
    cdef bytes b = _bytes_arg(key)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    if n != 40:
        raise CorruptEntry(f"invalid resync-queue key of {n} bytes (want 40)")
    cdef const char *p = PyBytes_AS_STRING(b)
    return (
        PyLong_FromUnsignedLongLong(_load_be64(<const unsigned char *>p)),
        PyBytes_FromStringAndSize(p + 8, 32),
    )


def new_buffer(size):
    """A bytearray of `size` bytes whose contents are unspecified: not zero-filled, so
    the caller must write every byte before reading any (receive buffers the socket or
    the cipher fills). Zero-filling 1 MiB costs as much as copying it."""
    cdef Py_ssize_t n = PyNumber_Index(size)
    if n < 0:
        raise ValueError("buffer size must not be negative")
    return PyByteArray_FromStringAndSize(NULL, n)
