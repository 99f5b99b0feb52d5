"""Selects the fast-path implementation: compiled (Cython) when it imports, pure otherwise.

- ``BLOCKNODE_PURE=1`` forces the pure-Python twin.
- ``BLOCKNODE_REQUIRE_FAST=1`` makes a missing compiled module an error (CI sets it,
  so a broken build cannot pass by testing the twin twice).

``python -c "import blocknode.fastpath as f; print(f.IMPLEMENTATION)"`` tells which
one is in use. Both modules expose exactly the names in `__all__`.
"""

from __future__ import annotations

import importlib
import os
import warnings

__all__ = [
    "IMPLEMENTATION",
    "HASH_LEN",
    "RC_ABSENT",
    "RC_PRESENT",
    "RC_DELETABLE",
    "block_hash",
    "verify",
    "hash_to_hex",
    "hex_to_hash",
    "block_dir",
    "block_path",
    "rc_encode",
    "rc_decode",
    "queue_key_encode",
    "queue_key_decode",
    "new_buffer",
]


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


if _truthy("BLOCKNODE_PURE"):
    if _truthy("BLOCKNODE_REQUIRE_FAST"):
        raise ImportError("BLOCKNODE_PURE=1 and BLOCKNODE_REQUIRE_FAST=1 contradict each other")
    from blocknode import _purepath as _impl
else:
    try:
        _impl = importlib.import_module("blocknode._fastpath")  # type: ignore[assignment]
    except ImportError as exc:
        if _truthy("BLOCKNODE_REQUIRE_FAST"):
            raise ImportError(
                "BLOCKNODE_REQUIRE_FAST=1 but the compiled blocknode._fastpath did not import "
                f"({exc}); rebuild with `pip install -e .` (needs a C compiler)"
            ) from exc
        warnings.warn(
            "blocknode: compiled fast path unavailable, using the pure-Python twin "
            f"({exc})",
            RuntimeWarning,
            stacklevel=2,
        )
        from blocknode import _purepath as _impl  # type: ignore[no-redef]

IMPLEMENTATION: str = _impl.IMPLEMENTATION
HASH_LEN: int = _impl.HASH_LEN
RC_ABSENT: int = _impl.RC_ABSENT
RC_PRESENT: int = _impl.RC_PRESENT
RC_DELETABLE: int = _impl.RC_DELETABLE
block_hash = _impl.block_hash
verify = _impl.verify
hash_to_hex = _impl.hash_to_hex
hex_to_hash = _impl.hex_to_hash
block_dir = _impl.block_dir
block_path = _impl.block_path
rc_encode = _impl.rc_encode
rc_decode = _impl.rc_decode
queue_key_encode = _impl.queue_key_encode
queue_key_decode = _impl.queue_key_decode
new_buffer = _impl.new_buffer
