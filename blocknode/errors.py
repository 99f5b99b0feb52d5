"""The error vocabulary of blocknode: every error a caller may need to branch on.

Both fast-path implementations, the store, the metadata layer, the RPC layer and
the client raise these (never a raw `KeyError`, `OSError` or msgpack error across
a module boundary), so callers and the CLI can print one clear line.

Protocol errors are split by blame, as h11 does: `RemoteProtocolError` — the
peer sent bytes or a request that break the protocol (close that connection, or
answer ``bad_request``); `LocalProtocolError` — this process misused the
protocol API (a bug here, or a caller's bad argument). ``except ProtocolError``
catches both.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BlockCorrupted",
    "BlockNotFound",
    "BlocknodeError",
    "CliError",
    "ClientClosed",
    "ClientForked",
    "ClockSkewError",
    "ConfigError",
    "CorruptEntry",
    "Forbidden",
    "HashMismatch",
    "InvalidHash",
    "LocalProtocolError",
    "MetadataError",
    "MetadataFull",
    "NodeUnreachable",
    "ProtocolError",
    "QuorumError",
    "RemoteError",
    "RemoteProtocolError",
    "RpcError",
    "RpcTimeout",
    "StoreError",
    "StreamTruncated",
    "UnknownNode",
    "VersionConflict",
    "single_error",
]


class BlocknodeError(Exception):
    """Base class of every error blocknode raises on purpose."""


class ConfigError(BlocknodeError):
    """A config or cluster file is missing, unreadable, or has a bad field."""


class UnknownNode(ConfigError, KeyError):
    """The cluster has no node with this id (`node_id`).

    Also a `KeyError`, for callers that look nodes up like a mapping.
    """

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        super().__init__(f"no node {node_id!r} in the cluster")

    __str__ = BlocknodeError.__str__  # the message, not KeyError's quoted repr


class CliError(BlocknodeError):
    """A command-line failure to print as one line; `status` is the exit status.

    1 for an operational error, 2 for bad usage or bad input (the CLI's contract).
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


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
    """The wire protocol was violated; the subclass says by whom (catch this for both)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or a request that violate the protocol.

    On a connection: close that connection (only). In a request handler: the
    caller gets a ``bad_request`` error reply.
    """


class ClockSkewError(RemoteProtocolError):
    """A peer sent a reference version timestamped further ahead of this node's clock
    than `max_clock_skew` allows: refused (one bad clock must not decide the order)."""


class LocalProtocolError(ProtocolError):
    """This process misused the protocol API: unencodable fields, an unknown
    priority, a block over `block_size` handed to a coordinator, bytes fed after
    the end of stream, ... (a bug or a bad argument here, not the peer's fault)."""


class StreamTruncated(RemoteProtocolError):
    """The peer's byte stream ended in the middle of a frame."""


class AuthenticationError(RemoteProtocolError):
    """The peer failed the handshake or a frame's tag: wrong cluster secret, replay, or tampering."""


class Forbidden(BlocknodeError):
    """The caller's client key lacks the permission this request needs, or the request
    is one only nodes may make. `permission` names what was missing (``read``,
    ``write``, ``admin``, or ``node`` for a node-internal request). Crosses the wire
    with the code ``forbidden``; the CLI exits with status 3."""

    rpc_code = "forbidden"
    permission = ""

    def __init__(self, message: str, permission: str = "") -> None:
        super().__init__(message)
        self.permission = permission


class RpcError(BlocknodeError):
    """An RPC could not be completed."""


class ClientClosed(BlocknodeError):
    """A blocking or asyncio client was closed (before or while the call ran)."""


class ClientForked(ClientClosed):
    """A blocking or asyncio client made in a parent process was used in a forked
    child, where its background thread does not exist: the child must connect again."""


class NodeUnreachable(RpcError):
    """A node could not be connected to, or its connection broke."""


class RpcTimeout(RpcError):
    """A node did not answer within the call's deadline."""


class RemoteError(RpcError):
    """The remote node answered with an error."""


class QuorumError(RpcError):
    """Fewer nodes than the quorum succeeded; `failures` maps each node to its error.

    `applied` names the nodes that did succeed (a write below quorum is still
    applied there: the message says where, so that nobody reads "0/2" as "nothing
    happened").
    """

    def __init__(self, what: str, quorum: int, successes: int, failures: dict[str, str],
                 applied: list[str] | None = None) -> None:
        self.quorum = quorum
        self.successes = successes
        self.failures = failures
        self.applied = sorted(applied or [])
        detail = "; ".join(f"{node}: {err}" for node, err in sorted(failures.items()))
        where = f", applied on {', '.join(self.applied)}" if self.applied else ""
        super().__init__(
            f"{what}: quorum not reached ({successes}/{quorum} succeeded{where}); failed: {detail}"
        )


class VersionConflict(BlocknodeError):
    """A reference change lost to a newer version of the same reference, made elsewhere
    (last writer wins): the change is not in effect. Running the command again applies
    it after that version."""

    rpc_code = "conflict"


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
