"""Who may do what: the one permission check, and where a client finds its key.

Two kinds of peer talk to a node (the handshake proves which, see
`blocknode.rpc.handshake`): **nodes**, holding the cluster secret, may send
every kind; **clients**, holding a client key, may send only the kinds their
key's permissions allow:

| permission | kinds                                                     | CLI commands |
|------------|-----------------------------------------------------------|--------------|
| (any key)  | `status`, `client_layout`                                 | status |
| `read`     | `client_get`, `client_get_direct`                         | get |
| `write`    | `client_put`, `client_put_many`, `client_ref`, `client_put_direct` | put, ref, unref |
| `admin`    | every `admin_*` kind (`protocol.ADMIN_KINDS`)             | scrub, repair, block, worker, key |

Every other kind (`protocol.REPLICA_KINDS`: `put_block(s)`, `get_block`,
`need_block`, `add_ref`/`del_ref`, `ae_*`, `key_*`, and any unknown kind) is
node-internal and refused from every client key. A refusal raises `Forbidden`
(code ``forbidden``, CLI exit status 3) naming the missing permission.

A client's key (`ClientKey`, the text ``ID:SECRET``) comes from, in order:
``BLOCKNODE_KEY`` in the environment; the config's `client_key_file`; the
node's admin key file (`NodeConfig.admin_key_path`, made by the node on its
first start, mode 0600) when the config is a node's. An application's config
therefore holds a key, never the cluster secret.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from blocknode.config import NodeConfig, check_private_file
from blocknode.errors import ConfigError, Forbidden
from blocknode.protocol import (
    ADMIN_KINDS,
    CLIENT_GET,
    CLIENT_GET_DIRECT,
    CLIENT_LAYOUT,
    CLIENT_PUT,
    CLIENT_PUT_DIRECT,
    CLIENT_PUT_MANY,
    CLIENT_REF,
    STATUS,
)
from blocknode.rpc.handshake import ClientKey, Peer

__all__ = [
    "ADMIN",
    "KEY_ENV",
    "NODE_ONLY",
    "PERMISSIONS",
    "READ",
    "WRITE",
    "ClientKey",
    "authorize",
    "load_client_key",
    "read_key_file",
    "required_permission",
    "write_key_file",
]

READ: Final = "read"
WRITE: Final = "write"
ADMIN: Final = "admin"
PERMISSIONS: Final = (READ, WRITE, ADMIN)
"""Every permission a client key may hold, in display order."""
NODE_ONLY: Final = "node"
"""What a node-internal kind "needs": to be a node."""

KEY_ENV: Final = "BLOCKNODE_KEY"
"""The environment variable naming a client's key (``ID:SECRET``); it wins over any file."""

_KIND_PERMISSION: Final[dict[str, str]] = {
    STATUS: "",
    CLIENT_LAYOUT: "",
    CLIENT_GET: READ,
    CLIENT_GET_DIRECT: READ,
    CLIENT_PUT: WRITE,
    CLIENT_PUT_DIRECT: WRITE,
    CLIENT_PUT_MANY: WRITE,
    CLIENT_REF: WRITE,
    **{kind: ADMIN for kind in ADMIN_KINDS},
}

_WHAT: Final = {READ: "get", WRITE: "put, ref and unref",
                ADMIN: "scrub, repair, worker, block and key commands"}


def required_permission(kind: str) -> str:
    """The permission a client key needs for `kind`: ``read``, ``write``, ``admin``,
    ``""`` (any key), or `NODE_ONLY` (no client key may send it)."""
    return _KIND_PERMISSION.get(kind, NODE_ONLY)


def authorize(peer: Peer, kind: str,
              permissions_of: Callable[[str], frozenset[str] | None]) -> None:
    """Refuse (`Forbidden`) a request of `kind` from `peer` that it may not make.

    Nodes may make every request. `permissions_of(key_id)` gives a client key's
    permissions now (None: the key was revoked since the connection opened).
    """
    if peer.is_node:
        return
    needed = required_permission(kind)
    if needed == NODE_ONLY:
        raise Forbidden(f"{kind!r} is a node-internal request: only nodes (holding the cluster "
                        "secret) may make it, never a client key", NODE_ONLY)
    perms = permissions_of(peer.id)
    if perms is None:
        raise Forbidden(f"client key {peer.id} has been revoked", needed or READ)
    if needed and needed not in perms:
        raise Forbidden(f"client key {peer.id} lacks the {needed!r} permission ({kind} needs it; "
                        f"{needed} allows {_WHAT[needed]})", needed)


# ------------------------------------------------------------------ key files


def read_key_file(path: str | os.PathLike[str], *, what: str = "client key file",
                  allow_world_readable: bool = False) -> ClientKey:
    """The key a file holds (one line ``ID:SECRET``); `ConfigError` naming the file
    (never the secret) when it is missing or malformed, or readable by other users
    (unless `allow_world_readable`, the `allow_world_readable_secrets` field)."""
    p = Path(path)
    try:
        check_private_file(p, what, allow_world_readable=allow_world_readable)
        text = p.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(f"{what} {p} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {p}: expected one line ID:SECRET, found bytes that are "
                          "not ASCII") from None
    except OSError as exc:
        raise ConfigError(f"{what} {p} cannot be read: {exc.strerror or exc}") from None
    try:
        return ClientKey.parse(text)
    except ValueError as exc:
        raise ConfigError(f"{what} {p}: {exc}") from None


def write_key_file(path: str | os.PathLike[str], key: ClientKey) -> bool:
    """Create `path` holding `key` (mode 0600, fsync'd); False, writing nothing, when
    it exists already (another process made it first: read that one instead)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f"{p.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, f"{key}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, p)  # atomic, and never over an existing file
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def load_client_key(cfg: NodeConfig, environ: Mapping[str, str] | None = None) -> ClientKey:
    """The key a client uses with `cfg`: ``BLOCKNODE_KEY``, else `client_key_file`, else
    the node's admin key file if it exists; `ConfigError` saying where it looked."""
    env = os.environ if environ is None else environ
    text = env.get(KEY_ENV)
    if text:
        try:
            return ClientKey.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{KEY_ENV}: {exc}") from None
    allow = cfg.allow_world_readable_secrets
    if cfg.client_key_file:
        return read_key_file(cfg.client_key_file, allow_world_readable=allow)
    admin = cfg.admin_key_path
    if os.path.exists(admin):
        return read_key_file(admin, what="admin key file", allow_world_readable=allow)
    raise ConfigError(
        f"no client key: set {KEY_ENV}=ID:SECRET, or client_key_file in {cfg.source} (a node "
        f"makes its admin key {admin} on its first start; `key create` makes others)"
    )
