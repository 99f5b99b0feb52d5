"""Remote errors: how handler exceptions cross the wire and come back.

A handler's exception becomes an error reply ``{"code", "message"[, "hash"]}``
with a stable code; the caller re-raises it as a `RemoteCallError` (a
`blocknode.errors.RemoteError`) — for some codes a subclass that is also the
matching local error, so ``except BlockNotFound`` works for remote reads too.

| handler raised                     | code            | caller gets                  |
|------------------------------------|-----------------|------------------------------|
| `BlockNotFound`                    | ``not_found``   | `RemoteNotFound`             |
| `BlockCorrupted`                   | ``corrupt``     | `RemoteCorrupted`            |
| `HashMismatch`                     | ``hash_mismatch``| `RemoteHashMismatch`        |
| `Forbidden` (permission, node-only) | ``forbidden``  | `RemoteForbidden`            |
| `ProtocolError` (bad fields, ...)  | ``bad_request`` | `RemoteCallError`            |
| class with an ``rpc_code`` attribute | that code     | `RemoteCallError`            |
| other `BlocknodeError`             | ``error``       | `RemoteCallError`            |
| anything else                      | ``internal``    | `RemoteCallError`, generic message (the traceback is logged on the serving node) |
"""

from __future__ import annotations

import logging
from typing import Any

from blocknode.errors import (
    BlockCorrupted,
    BlocknodeError,
    BlockNotFound,
    Forbidden,
    HashMismatch,
    ProtocolError,
    RemoteError,
)

__all__ = [
    "RemoteCallError",
    "RemoteCorrupted",
    "RemoteForbidden",
    "RemoteHashMismatch",
    "RemoteNotFound",
    "error_reply",
    "remote_error",
]

log = logging.getLogger("blocknode.rpc")

INTERNAL_MESSAGE = "internal error while handling the request"


class RemoteCallError(RemoteError):
    """A node answered a call with an error; `.node`, `.code`, `.message`."""

    def __init__(self, node: str, code: str, message: str, hash_hex: str | None = None) -> None:
        self.node = node
        self.code = code
        self.message = message
        self.hash_hex = hash_hex or ""
        Exception.__init__(self, f"node {node}: {message} [{code}]")


class RemoteNotFound(RemoteCallError, BlockNotFound):
    """The remote node does not have the block (code ``not_found``)."""


class RemoteCorrupted(RemoteCallError, BlockCorrupted):
    """The remote copy was corrupted and quarantined (code ``corrupt``)."""


class RemoteHashMismatch(RemoteCallError, HashMismatch):
    """The remote node refused data that does not match its hash (``hash_mismatch``)."""


class RemoteForbidden(RemoteCallError, Forbidden):
    """The node refused the request: the client key lacks a permission, or the
    request is node-internal (code ``forbidden``)."""


_CODE_CLASSES: dict[str, type[RemoteCallError]] = {
    "forbidden": RemoteForbidden,
    "not_found": RemoteNotFound,
    "corrupt": RemoteCorrupted,
    "hash_mismatch": RemoteHashMismatch,
}


def error_reply(exc: BaseException, *, peer: str = "?", kind: str = "?") -> dict[str, Any]:
    """The error reply fields for an exception raised by a handler."""
    if isinstance(exc, BlockNotFound):
        code = "not_found"
    elif isinstance(exc, BlockCorrupted):
        code = "corrupt"
    elif isinstance(exc, HashMismatch):
        code = "hash_mismatch"
    elif isinstance(exc, ProtocolError):
        code = "bad_request"
    elif isinstance(getattr(exc, "rpc_code", None), str):
        code = exc.rpc_code  # type: ignore[attr-defined]
    elif isinstance(exc, RemoteCallError):
        code = exc.code
    elif isinstance(exc, BlocknodeError):
        code = "error"
    else:
        log.error("handler for %r from %s failed", kind, peer, exc_info=exc)
        return {"code": "internal", "message": INTERNAL_MESSAGE}
    fields: dict[str, Any] = {"code": code, "message": str(exc)}
    hash_hex = getattr(exc, "hash_hex", None)
    if isinstance(hash_hex, str):
        fields["hash"] = hash_hex
    if isinstance(exc, Forbidden) and exc.permission:
        fields["permission"] = exc.permission
    return fields


def remote_error(node: str, fields: dict[str, Any]) -> RemoteCallError:
    """Build the exception for an error reply received from `node`."""
    code = fields.get("code")
    message = fields.get("message")
    hash_hex = fields.get("hash")
    code = code if isinstance(code, str) else "internal"
    message = message if isinstance(message, str) else "(no message)"
    cls = _CODE_CLASSES.get(code, RemoteCallError)
    err = cls(node, code, message, hash_hex if isinstance(hash_hex, str) else None)
    if isinstance(err, RemoteForbidden):
        permission = fields.get("permission")
        err.permission = permission if isinstance(permission, str) else ""
    return err
