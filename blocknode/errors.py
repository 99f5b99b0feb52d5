"""The error vocabulary of blocknode: every error a caller may need to branch on.

Both fast-path implementations, the store, the metadata layer, the RPC layer and
the client raise these (never a raw `KeyError`, `OSError` or msgpack error across
a module boundary), so callers and the CLI can print one clear line.
"""

from __future__ import annotations


class BlocknodeError(Exception):
    """Base class of every error blocknode raises on purpose."""


class ConfigError(BlocknodeError):
    """A config or cluster file is missing, unreadable, or has a bad field."""


class InvalidHash(BlocknodeError, ValueError):
    """A hash is not 32 bytes, or a hash string is not 64 hex characters."""


class CorruptEntry(BlocknodeError, ValueError):
    """An encoded metadata entry (RC value, queue key, ...) has an invalid length or form."""


class StoreError(BlocknodeError):
    """A local block store operation failed."""


class BlockNotFound(StoreError):
    """The block is not stored here (or, from the client, on any reachable node)."""

    def __init__(self, hash_hex: str, detail: str = "") -> None:
        self.hash_hex = hash_hex
        msg = f"block {hash_hex} not found"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class BlockCorrupted(StoreError):
    """The stored bytes no longer match the block's hash; the file was quarantined."""

    def __init__(self, hash_hex: str) -> None:
        self.hash_hex = hash_hex
        super().__init__(f"block {hash_hex} is corrupted (quarantined as .corrupted)")


class HashMismatch(StoreError):
    """Data offered for a block does not hash to the block's name."""


class MetadataError(BlocknodeError):
    """The LMDB metadata store failed."""


class MetadataFull(MetadataError):
    """The LMDB map is full: raise `lmdb_map_size` in the node config."""


class ProtocolError(BlocknodeError):
    """The peer sent bytes that violate the wire protocol (the connection is closed)."""


class AuthenticationError(ProtocolError):
    """The peer failed the handshake: wrong cluster secret, replay, or tampering."""


class RpcError(BlocknodeError):
    """An RPC could not be completed."""


class NodeUnreachable(RpcError):
    """A node could not be connected to, or its connection broke."""


class RpcTimeout(RpcError):
    """A node did not answer within the call's deadline."""


class RemoteError(RpcError):
    """The remote node answered with an error."""


class QuorumError(RpcError):
    """Fewer nodes than the quorum succeeded; `failures` maps each node to its error."""

    def __init__(self, what: str, quorum: int, successes: int, failures: dict[str, str]) -> None:
        self.quorum = quorum
        self.successes = successes
        self.failures = failures
        detail = "; ".join(f"{node}: {err}" for node, err in sorted(failures.items()))
        super().__init__(
            f"{what}: quorum not reached ({successes}/{quorum} succeeded); failed: {detail}"
        )


def single_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report from (nested) exception groups, for one clear line.

    Trio nurseries wrap a child's error in an `ExceptionGroup`; when several
    children fail together (e.g. the blocks of one large put, all for want of a
    quorum) they fail for the same reason, so the first is reported. A
    KeyboardInterrupt anywhere wins: the user asked to stop.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                walk(sub)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, KeyboardInterrupt):
            return leaf
    return leaves[0] if leaves else group
