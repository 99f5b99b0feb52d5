"""The client keys of a node: the admin key commands, their replication, the node's own admin key.

Every node holds every key (`blocknode.storage.keys`: verifiers, never secrets).

- **Commands** (admin permission): `admin_key_create` (the client made the id
  and secret; only the verifier travels), `admin_key_list`, `admin_key_delete`
  (by name or id). The node that takes the command stamps the change with a
  version newer than any it holds for that key, applies it, and broadcasts it
  (`key_put`) to every other node, waiting for their answers: a created key
  works, and a deleted one stops working, on every reachable node when the
  command returns.
- **Revocation** closes the key's open connections on every node that applies
  it (`RpcNetwork.close_client_connections`); a request on a connection still
  open is refused anyway (`blocknode.auth` reads the permissions now).
- **Anti-entropy**: every `SYNC_INTERVAL` seconds (and shortly after start) a
  node compares a digest of its table with each other node's (`key_sync`) and,
  when they differ, pulls that node's records in pages and merges them (last
  writer wins). A node that was down or missed a broadcast catches up within
  one round; since every node pulls from every other, all converge.
- **The node's admin key** (`NodeConfig.admin_key_path`): on the node's first
  start, when the file does not exist, a new key with every permission is made
  and written there (mode 0600) before it is added to the table; when the file
  exists (made by an earlier start, or by `init-cluster` for every node of its
  cluster) its key is added unless the table knows its id already — as a
  tombstone too, so a revoked admin key stays revoked.

| kind               | fields                                         | reply                          |
|--------------------|------------------------------------------------|--------------------------------|
| `admin_key_create` | name, id, permissions: [str], verifier         | id, name, permissions, nodes, of |
| `admin_key_list`   | —                                              | keys: [{id, name, permissions, created}] |
| `admin_key_delete` | name (a name or an id)                         | deleted: [{id, name}], nodes, of |
| `key_put`          | keys: [rows]                                   | changed                        |
| `key_sync`         | digest, after                                  | same, keys?: [rows], more?     |

A row is ``[id, version, deleted, name, permissions, verifier, created_ms]``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from blocknode.auth import PERMISSIONS, read_key_file, write_key_file
from blocknode.errors import BlocknodeError, RemoteProtocolError
from blocknode.protocol import (
    ADMIN_KEY_CREATE,
    ADMIN_KEY_DELETE,
    ADMIN_KEY_LIST,
    KEY_PUT,
    KEY_SYNC,
    get_int,
    get_str,
)
from blocknode.rpc.handshake import MAC_SIZE, ClientKey
from blocknode.rpc.wire import PRIO_BACKGROUND
from blocknode.storage import KeyRecord, KeyTable

if TYPE_CHECKING:
    from blocknode.manager import Reply
    from blocknode.rpc.network import RpcNetwork

__all__ = ["KeyService", "record_from_wire", "record_to_wire"]

log = logging.getLogger(__name__)

SYNC_INTERVAL: Final = 10.0
"""Seconds between two anti-entropy rounds of the keys table (±25 % jitter)."""
FIRST_SYNC_DELAY: Final = 1.0
"""Seconds after start before the first round (the node's connections come up)."""
PAGE_ROWS: Final = 200
"""Rows per `key_put` / `key_sync` message (each row ≤ ~200 bytes: far under `HEAD_MAX`)."""
MAX_NAME_BYTES: Final = 64
BOOTSTRAP_VERSION: Final = 1
"""The version of an admin key added from its file: any real change (a deletion) wins."""


def record_to_wire(r: KeyRecord) -> list[Any]:
    """A record as a wire row."""
    return [r.id, r.version, r.deleted, r.name, list(r.permissions), r.verifier, r.created_ms]


def _name(value: Any) -> str:
    name = get_str({"name": value}, "name", max_bytes=MAX_NAME_BYTES)
    if not name.isprintable() or name != name.strip():
        raise RemoteProtocolError("field 'name': expected printable characters without "
                                  "leading or trailing spaces")
    return name


def _permissions(value: Any) -> tuple[str, ...]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(p, str) and p in PERMISSIONS for p in value)):
        raise RemoteProtocolError(f"field 'permissions': expected a non-empty list of "
                                  f"{', '.join(PERMISSIONS)}")
    return tuple(p for p in PERMISSIONS if p in value)


def _key_id(value: Any) -> str:
    if not isinstance(value, str) or not ClientKey.ID_RE.fullmatch(value):
        raise RemoteProtocolError("field 'id': expected a key id (BK + 24 hex digits)")
    return value


def record_from_wire(row: Any) -> KeyRecord:
    """A wire row as a record; `RemoteProtocolError` if malformed."""
    if not isinstance(row, list) or len(row) != 7:
        raise RemoteProtocolError("keys: expected rows [id, version, deleted, name, "
                                  "permissions, verifier, created]")
    kid, version, deleted, name, perms, verifier, created = row
    if not isinstance(deleted, bool):
        raise RemoteProtocolError("keys: malformed deleted flag")
    version = get_int({"version": version}, "version")
    created = get_int({"created": created}, "created")
    kid = _key_id(kid)
    if deleted:
        return KeyRecord(kid, version, deleted=True)
    if not isinstance(verifier, bytes) or len(verifier) != MAC_SIZE:
        raise RemoteProtocolError("keys: malformed verifier")
    return KeyRecord(kid, version, False, _name(name), _permissions(perms), verifier, created)


def _rows(fields: dict[str, Any]) -> list[KeyRecord]:
    rows = fields.get("keys")
    if not isinstance(rows, list) or len(rows) > PAGE_ROWS:
        raise RemoteProtocolError(f"field 'keys': expected a list of at most {PAGE_ROWS} rows")
    return [record_from_wire(r) for r in rows]


class KeyService:
    """The client keys of one node (see module docstring).

    `members` are every node id of the cluster (this one included); `net` is
    set by the node once its network exists (`attach`).
    """

    def __init__(self, node_id: str, table: KeyTable, members: list[str], *,
                 now_ms: Callable[[], int], rpc_timeout: float,
                 sync_interval: float = SYNC_INTERVAL, rng: random.Random | None = None) -> None:
        self.node_id = node_id
        self.table = table
        self.peers = [m for m in members if m != node_id]
        self.now_ms = now_ms
        self.rpc_timeout = rpc_timeout
        self.sync_interval = sync_interval
        self._rng = rng or random.Random()
        self.net: RpcNetwork | None = None
        self._live: dict[str, KeyRecord] = {r.id: r for r in table.all() if not r.deleted}
        self._made_admin_key: tuple[str, str] | None = None
        self.sync_rounds = 0
        """Anti-entropy rounds done (for tests and status)."""

    def attach(self, net: RpcNetwork) -> None:
        """The network to broadcast on and whose connections of revoked keys to close."""
        self.net = net

    def handlers(self) -> dict[str, Any]:
        """The RPC handlers of key management and key replication, by kind (the node
        serves them; `run` is the key anti-entropy task the node runs)."""
        return {
            ADMIN_KEY_CREATE: self.handle_create,
            ADMIN_KEY_LIST: self.handle_list,
            ADMIN_KEY_DELETE: self.handle_delete,
            KEY_PUT: self.handle_put,
            KEY_SYNC: self.handle_sync,
        }

    # ------------------------------------------------------------ lookups (handshake, auth)

    def verifier(self, key_id: str) -> bytes | None:
        """The verifier of a live key (what the handshake checks a client's proof with)."""
        rec = self._live.get(key_id)
        return rec.verifier if rec is not None else None

    def permissions(self, key_id: str) -> frozenset[str] | None:
        """A live key's permissions now; None for an unknown or revoked key."""
        rec = self._live.get(key_id)
        return frozenset(rec.permissions) if rec is not None else None

    def live_keys(self) -> list[KeyRecord]:
        """Every live key, by name then id."""
        return sorted(self._live.values(), key=lambda r: (r.name, r.id))

    # ------------------------------------------------------------ applying changes

    async def apply(self, records: list[KeyRecord]) -> list[KeyRecord]:
        """Merge `records` into the table (last writer wins); returns those that changed it.

        A key deleted here gets its open connections closed.
        """
        changed = await self.table.merge(records)
        for rec in changed:
            current = self.table.get(rec.id)  # the committed winner, whatever ran meanwhile
            if current is None or current.deleted:
                gone = self._live.pop(rec.id, None)
                if gone is not None:
                    log.info("client key %s (%s) revoked", rec.id, gone.name)
                if self.net is not None:
                    self.net.close_client_connections(rec.id, f"client key {rec.id} was revoked")
            else:
                self._live[rec.id] = current
        return changed

    async def broadcast(self, records: list[KeyRecord]) -> int:
        """Send `records` to every other node at once; returns how many acknowledged."""
        if self.net is None or not self.peers:
            return 0
        acked = 0
        rows = [record_to_wire(r) for r in records]
        pages = [rows[i:i + PAGE_ROWS] for i in range(0, len(rows), PAGE_ROWS)]

        async def send(nid: str) -> None:
            nonlocal acked
            try:
                for page in pages:
                    await self.net.call(nid, KEY_PUT, {"keys": page}, timeout=self.rpc_timeout)  # type: ignore[union-attr]
                acked += 1
            except BlocknodeError as exc:
                log.info("key change not sent to %s now (%s); it will catch up by anti-entropy",
                         nid, exc)

        async with trio.open_nursery() as nursery:
            for nid in self.peers:
                nursery.start_soon(send, nid)
        return acked

    def _next_version(self, key_id: str) -> int:
        old = self.table.get(key_id)
        return max(self.now_ms(), (old.version + 1) if old is not None else 0)

    # ------------------------------------------------------------ the node's admin key

    async def ensure_admin_key(self, path: str, *, allow_world_readable: bool = False) -> bool:
        """Make the node's admin key file on first start, and make sure the table has
        its key (see module docstring); True when it made the key (`announce_admin_key`
        says so once the node runs)."""
        key = ClientKey.generate()
        try:
            made = write_key_file(path, key)
        except OSError as exc:  # e.g. a read-only file system: the node runs on without it
            log.warning("cannot make the admin key file %s (%s): the CLI run with this node's "
                        "config needs another key (BLOCKNODE_KEY or client_key_file); set "
                        "admin_key_file to a file you made (see deploy/README.md)", path,
                        exc.strerror or exc)
            return False
        if made:
            now = self.now_ms()
            await self.apply([KeyRecord(key.id, now, False, f"admin@{self.node_id}", PERMISSIONS,
                                        key.verifier, now)])
            self._made_admin_key = (key.id, path)
            return True
        key = read_key_file(path, what="admin key file", allow_world_readable=allow_world_readable)
        record = KeyRecord(key.id, BOOTSTRAP_VERSION, False, "admin", PERMISSIONS, key.verifier, 0)
        if await self.table.add_if_absent(record):
            self._live[key.id] = record
        elif key.id not in self._live:
            log.warning("the admin key in %s (%s) was revoked: the CLI cannot use it; make "
                        "another with `key create`, or remove the file and restart", path, key.id)
        return False

    def announce_admin_key(self) -> None:
        """Log the admin key made at this start, if any (once the node listens: a node
        that fails to start says one thing only)."""
        if self._made_admin_key is not None:
            log.info("made an admin key %s (admin@%s) in %s", self._made_admin_key[0],
                     self.node_id, self._made_admin_key[1])
            self._made_admin_key = None

    # ------------------------------------------------------------ admin commands

    async def handle_create(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Create a key made by the client (only its verifier travels)."""
        name = _name(fields.get("name"))
        kid = _key_id(fields.get("id"))
        perms = _permissions(fields.get("permissions"))
        verifier = fields.get("verifier")
        if not isinstance(verifier, bytes) or len(verifier) != MAC_SIZE:
            raise RemoteProtocolError(f"field 'verifier': expected {MAC_SIZE} bytes")
        if any(r.name == name for r in self._live.values()):
            raise RemoteProtocolError(f"a key named {name!r} exists already (key list)")
        if self.table.get(kid) is not None:
            raise RemoteProtocolError(f"key id {kid} is taken; make another")
        now = self.now_ms()
        rec = KeyRecord(kid, self._next_version(kid), False, name, perms, verifier, now)
        await self.apply([rec])
        acked = await self.broadcast([rec])
        return {"id": kid, "name": name, "permissions": list(perms), "nodes": acked + 1,
                "of": len(self.peers) + 1}, None

    async def handle_list(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Every live key: id, name, permissions, created (ms; 0 when unknown)."""
        return {"keys": [{"id": r.id, "name": r.name, "permissions": list(r.permissions),
                          "created": r.created_ms or None} for r in self.live_keys()]}, None

    async def handle_delete(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Delete every live key with this name (or this id), cluster-wide."""
        which = get_str(fields, "name", max_bytes=MAX_NAME_BYTES)
        doomed = [r for r in self.live_keys() if which in (r.name, r.id)]
        if not doomed:
            raise BlocknodeError(f"no key named {which!r} (`key list` shows them)")
        tombs = [r.tombstone(self._next_version(r.id)) for r in doomed]
        await self.apply(tombs)
        acked = await self.broadcast(tombs)
        return {"deleted": [{"id": r.id, "name": r.name} for r in doomed], "nodes": acked + 1,
                "of": len(self.peers) + 1}, None

    # ------------------------------------------------------------ node to node

    async def handle_put(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Merge key records a node sent (a broadcast)."""
        return {"changed": len(await self.apply(_rows(fields)))}, None

    async def handle_sync(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Compare digests; when they differ, a page of our records after `after`."""
        digest = fields.get("digest")
        after = fields.get("after", "")
        if not isinstance(digest, bytes) or not isinstance(after, str):
            raise RemoteProtocolError("key_sync: expected digest (bytes) and after (str)")
        if digest == self.table.digest():
            return {"same": True}, None
        rows = [r for r in self.table.all() if r.id > after]
        return {"same": False, "keys": [record_to_wire(r) for r in rows[:PAGE_ROWS]],
                "more": len(rows) > PAGE_ROWS}, None

    async def sync_with(self, nid: str) -> int:
        """Pull `nid`'s records if its table differs from ours; returns how many changed ours."""
        assert self.net is not None
        changed = 0
        after = ""
        digest = self.table.digest()
        while True:
            reply, _ = await self.net.call(nid, KEY_SYNC, {"digest": digest, "after": after},
                                           timeout=self.rpc_timeout, priority=PRIO_BACKGROUND)
            if reply.get("same") is True:
                return changed
            rows = _rows(reply)
            changed += len(await self.apply(rows))
            if not reply.get("more") or not rows:
                return changed
            after = rows[-1].id

    async def sync_round(self) -> int:
        """One anti-entropy round with every other node; returns the records changed here."""
        changed = 0

        async def one(nid: str) -> None:
            nonlocal changed
            try:
                changed += await self.sync_with(nid)
            except BlocknodeError as exc:
                log.debug("key sync with %s failed: %s", nid, exc)

        async with trio.open_nursery() as nursery:
            for nid in self.peers:
                nursery.start_soon(one, nid)
        self.sync_rounds += 1
        if changed:
            log.info("key sync: %d key record(s) caught up", changed)
        return changed

    async def run(self) -> None:
        """The anti-entropy loop (a worker of the node)."""
        await trio.sleep(FIRST_SYNC_DELAY)
        while True:
            await self.sync_round()
            await trio.sleep(self.sync_interval * self._rng.uniform(0.75, 1.25))

