"""Sans-io mutual authentication, session keys and per-frame AEAD.

Two kinds of peer connect to a node, each proving a different credential:

- a **node** proves it holds the 32-byte cluster secret;
- a **client** proves it holds a client key: an id and a 32-byte secret, of
  which the nodes store only a verifier (`ClientKey.verifier`), never the secret.

Handshake (three length-prefixed msgpack frames, at most `MAX_HANDSHAKE_FRAME`
bytes each, before any encrypted byte)::

    connecting -> accepting {"t": "hello", "v": version, "role": "node" | "client",
                              "id": node id | key id, "nonce": 32 random bytes}
    accepting -> connecting {"t": "hello", "v": version, "id": node id, "nonce": 32 random bytes,
                              "mac": server proof}
    connecting -> accepting {"t": "finish", "mac": client proof}

``transcript = msgpack([PROTOCOL_LABEL, version, role, client id, server id,
client nonce, server nonce])``. The proofs, by role:

| role   | server proof                         | client proof                                        |
|--------|--------------------------------------|-----------------------------------------------------|
| node   | HMAC(secret, node server label + T)  | HMAC(secret, node client label + T)                 |
| client | HMAC(V, key server label + T)        | K xor HMAC(V, key client label + T)                 |

where, for a client key with secret S, ``K = HMAC(S, key label)`` and the
verifier ``V = SHA-256(K)`` is all a node stores. The node recovers ``K`` from
the client proof and checks ``SHA-256(K) == V`` (as SCRAM does): a stolen key
table does not let anyone authenticate as a client, and a client proof cannot
pass as a node's or the other way round (different keys, labels, and the role
in the transcript). So the role of an authenticated peer is proven, never
claimed: a client can never pass for a node. The accepting node checks that a
node id is a member of its cluster (`members`) and looks a key id up in its key
table (`lookup_key`); for an unknown or revoked key id it answers with a proof
made from a random verifier, so that the connecting side cannot tell an unknown
id from a wrong secret, and refuses the finish.

Each side proves its credential without sending it; the role labels stop a
proof being reflected back; the peer's fresh nonce stops a recorded handshake
being replayed. A version mismatch gets a ``{"t": "reject", "why": "version",
"v": ...}`` frame and a `RemoteProtocolError` naming both versions on both
sides. A connecting side that finds the server's proof wrong sends ``{"t":
"reject", "why": "auth"}`` and raises `AuthenticationError`; the server then
raises `AuthenticationError` too. An accepting node may also refuse a hello
with ``"why": "member"`` (a node id outside its cluster: `AuthenticationError`),
``"why": "role"`` (it takes no client keys) or ``"why": "busy"`` (its cap for
that role is reached: `HandshakeBusy`). A peer with the wrong credential never
gets past this point, so it never sees an encrypted frame.

Session keys: HKDF-SHA256 over the secret (a node) or ``K`` (a client), salted
with both nonces and bound to the transcript, gives one 32-byte key per
direction. Every later frame is sealed with AES-256-GCM (see
`bench/rpc_crypto.py` for why not ChaCha20-Poly1305) using a per-direction
64-bit counter as the nonce and the clear chunk header as associated data: a
tampered, replayed, reordered or truncated frame fails its tag and raises
`AuthenticationError`.

Usage (both roles)::

    hs.receive_data(bytes_from_peer)
    try:
        hs.process()
    finally:
        send(hs.data_to_send())     # may hold a reject frame after an error
    if hs.done: keys = hs.keys; leftover bytes stay in hs.decoder
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blocknode.errors import (
    AuthenticationError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from blocknode.rpc.wire import NEED_DATA, FrameDecoder, pack_frame_prefix

__all__ = [
    "MAX_HANDSHAKE_FRAME",
    "PROTOCOL_VERSION",
    "ROLE_CLIENT",
    "ROLE_NODE",
    "SECRET_SIZE",
    "TAG_SIZE",
    "ClientHandshake",
    "ClientKey",
    "HandshakeBusy",
    "Peer",
    "ServerHandshake",
    "SessionCipher",
    "SessionKeys",
]

PROTOCOL_VERSION: Final = 2
"""2: roles (node / client key) in the hello; 1 knew only the cluster secret."""
PROTOCOL_LABEL: Final = b"blocknode-rpc"
SECRET_SIZE: Final = 32
NONCE_SIZE: Final = 32
MAC_SIZE: Final = 32
TAG_SIZE: Final = 16
MAX_HANDSHAKE_FRAME: Final = 1024
MAX_ID_LEN: Final = 256
MAX_REJECT_DETAIL: Final = 200

ROLE_NODE: Final = "node"
"""A peer that proved it holds the cluster secret."""
ROLE_CLIENT: Final = "client"
"""A peer that proved it holds a client key."""
ROLES: Final = (ROLE_NODE, ROLE_CLIENT)

_NODE_SERVER_LABEL = b"blocknode node server proof\x00"
_NODE_CLIENT_LABEL = b"blocknode node client proof\x00"
_KEY_SERVER_LABEL = b"blocknode key server proof\x00"
_KEY_CLIENT_LABEL = b"blocknode key client proof\x00"
_KEY_LABEL = b"blocknode client key\x00"
_UNKNOWN_KEY_LABEL = b"blocknode unknown key\x00"
_KEYS_LABEL = b"blocknode session keys\x00"


class HandshakeBusy(RemoteProtocolError):
    """The node refused the connection at its cap for this kind of peer (try again later)."""


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is at the other end of an authenticated connection: its proven role and id.

    `role` is `ROLE_NODE` (`id` is a cluster member's node id) or `ROLE_CLIENT`
    (`id` is the id of the client key it proved).
    """

    role: str
    id: str

    @classmethod
    def node(cls, node_id: str) -> Peer:
        return cls(ROLE_NODE, node_id)

    @classmethod
    def client(cls, key_id: str) -> Peer:
        return cls(ROLE_CLIENT, key_id)

    @property
    def is_node(self) -> bool:
        return self.role == ROLE_NODE

    def __str__(self) -> str:
        return self.id if self.role == ROLE_NODE else f"client key {self.id}"


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """Result of a handshake: who the peer is and the two directional keys."""

    peer_id: str
    send_key: bytes
    recv_key: bytes
    role: str = ROLE_NODE
    """The peer's proven role (`ROLE_NODE` or `ROLE_CLIENT`)."""

    @property
    def peer(self) -> Peer:
        return Peer(self.role, self.peer_id)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True, slots=True)
class ClientKey:
    """A client credential: an id and a 32-byte secret (see the module docstring).

    Its text form, ``ID:SECRET`` with the secret as 64 hex characters, is what
    `key create` prints and what ``BLOCKNODE_KEY`` or a `client_key_file`
    holds. `repr` never shows the secret.
    """

    id: str
    secret: bytes = field(repr=False)

    ID_PREFIX: ClassVar[str] = "BK"
    ID_RE: ClassVar[re.Pattern[str]] = re.compile(r"BK[0-9a-f]{24}")

    @classmethod
    def generate(cls, rng: Callable[[int], bytes] = os.urandom) -> ClientKey:
        """A new key: a random id (``BK`` + 24 hex digits) and a random secret."""
        return cls(cls.ID_PREFIX + rng(12).hex(), rng(SECRET_SIZE))

    @classmethod
    def parse(cls, text: str) -> ClientKey:
        """``ID:SECRET`` -> key; `ValueError` (never quoting the secret) if malformed."""
        kid, sep, secret = text.strip().partition(":")
        if not sep or not cls.ID_RE.fullmatch(kid):
            raise ValueError("expected ID:SECRET with ID = BK + 24 hex digits")
        if len(secret) != 2 * SECRET_SIZE:
            raise ValueError(f"expected a secret of {2 * SECRET_SIZE} hex digits after the "
                             f"colon, got {len(secret)} characters")
        try:
            raw = bytes.fromhex(secret)
        except ValueError:
            raise ValueError("the secret after the colon is not all hex digits") from None
        return cls(kid, raw)

    def __str__(self) -> str:
        return f"{self.id}:{self.secret.hex()}"

    @property
    def proof_key(self) -> bytes:
        """K: what the client proves it knows (recoverable by a node during a handshake only)."""
        return _hmac(self.secret, _KEY_LABEL)

    @property
    def verifier(self) -> bytes:
        """V = SHA-256(K): all a node stores of the key."""
        return hashlib.sha256(self.proof_key).digest()


class SessionCipher:
    """AES-256-GCM for one direction with a 64-bit counter nonce.

    The counter advances on every successful seal/open; the receiver expects
    exactly the next counter, so a dropped, replayed or reordered frame fails
    its tag. After a failure the cipher is dead (the connection must close).
    """

    _NONCE = struct.Struct(">4xQ")

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("session key must be 32 bytes")
        self._aead = AESGCM(key)
        self._counter = 0
        self._dead = False

    def _nonce(self) -> bytes:
        if self._dead:
            raise LocalProtocolError("session cipher used after an authentication failure")
        if self._counter >= 2**64 - 1:
            raise AuthenticationError("session nonce space exhausted")
        nonce = self._NONCE.pack(self._counter)
        self._counter += 1
        return nonce

    def seal_into(self, header: bytes, body: bytes | memoryview, out: memoryview) -> None:
        """Encrypt `body` into `out` (exactly ``len(body) + TAG_SIZE`` bytes)."""
        self._aead.encrypt_into(self._nonce(), body, header, out)

    def open_into(self, header: bytes | memoryview, ciphertext: bytes | memoryview, out: memoryview) -> None:
        """Decrypt and verify into `out` (``len(ciphertext) - TAG_SIZE`` bytes)."""
        if len(ciphertext) < TAG_SIZE or len(out) != len(ciphertext) - TAG_SIZE:
            self._dead = True
            raise AuthenticationError("frame too short to hold an authentication tag")
        nonce = self._nonce()
        try:
            self._aead.decrypt_into(nonce, ciphertext, header, out)
        except InvalidTag:
            self._dead = True
            raise AuthenticationError(
                "frame failed authentication (tampered, replayed, reordered or truncated)"
            ) from None


def _check_secret(secret: bytes) -> bytes:
    if not isinstance(secret, bytes | bytearray) or len(secret) != SECRET_SIZE:
        raise ValueError(f"cluster secret must be {SECRET_SIZE} bytes")
    return bytes(secret)


def _check_id(node_id: object, who: str) -> str:
    if not isinstance(node_id, str) or not 0 < len(node_id) <= MAX_ID_LEN:
        error = LocalProtocolError if who == "local" else RemoteProtocolError
        raise error(f"{who} id must be a string of 1..{MAX_ID_LEN} characters")
    return node_id


class _Handshake:
    """Shared machinery of both sides."""

    def __init__(
        self,
        node_id: str,
        secret: bytes,
        *,
        version: int = PROTOCOL_VERSION,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.node_id = _check_id(node_id, "local")
        self._secret = _check_secret(secret)
        self.version = version
        self._nonce = rng(NONCE_SIZE)
        self.decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)
        self._out = bytearray()
        self.done = False
        self._failed = False
        self._keys: SessionKeys | None = None
        self.role = ROLE_NODE
        """The role of the connecting side (for the accepting side: once its hello arrived)."""

    @property
    def keys(self) -> SessionKeys:
        """Session keys; only valid once `done`."""
        if self._keys is None:
            raise RuntimeError("handshake not finished")
        return self._keys

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the peer (``b""`` = the peer closed)."""
        self.decoder.receive_data(data)

    def data_to_send(self) -> bytes:
        """Bytes to send to the peer now (possibly empty)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def _send(self, obj: dict[str, Any]) -> None:
        body = msgpack.packb(obj, use_bin_type=True)
        self._out += pack_frame_prefix(len(body)) + body

    def _next(self) -> dict[str, Any] | None:
        """The next handshake frame as a dict, or None if more bytes are needed."""
        try:
            frame = self.decoder.next_frame()
        except RemoteProtocolError as exc:
            raise type(exc)(f"handshake: {exc}") from None
        if frame is NEED_DATA:
            if self.decoder.at_eof:
                raise RemoteProtocolError("handshake: peer closed the connection")
            return None
        try:
            obj = msgpack.unpackb(
                frame,
                raw=False,
                strict_map_key=True,
                max_str_len=MAX_HANDSHAKE_FRAME,
                max_bin_len=MAX_HANDSHAKE_FRAME,
                max_array_len=64,
                max_map_len=64,
                max_ext_len=0,
            )
        except Exception as exc:
            raise RemoteProtocolError(f"handshake: undecodable frame ({type(exc).__name__})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
            raise RemoteProtocolError("handshake: frame is not a typed map")
        if obj["t"] == "reject":
            self._on_reject(obj)
        return obj

    def _on_reject(self, obj: dict[str, Any]) -> None:
        why = obj.get("why")
        if why == "version":
            raise RemoteProtocolError(
                f"protocol version mismatch: peer speaks version {obj.get('v')!r}, "
                f"we speak version {self.version}"
            )
        if why == "auth":
            if self.role == ROLE_CLIENT:
                raise AuthenticationError(
                    "the client refused our proof: its key is unknown here (revoked, or not "
                    "yet known to this node) or its secret is wrong"
                )
            raise AuthenticationError(
                "peer refused our handshake proof: the cluster secrets differ"
            )
        if why == "member":
            raise AuthenticationError(
                f"the node refused us: {self.node_id!r} is not a node of its cluster"
            )
        if why == "role":
            raise RemoteProtocolError("the node accepts no client keys")
        if why == "busy":
            detail = obj.get("detail")
            detail = detail[:MAX_REJECT_DETAIL] if isinstance(detail, str) else "at capacity"
            raise HandshakeBusy(f"the node refused the connection: {detail}")
        raise RemoteProtocolError(f"handshake rejected by peer: {why!r}")

    def _reject(self, why: str, **extra: Any) -> None:
        self._send({"t": "reject", "why": why, "v": self.version, **extra})

    @staticmethod
    def _field(obj: dict[str, Any], name: str, typ: type, size: int | None = None) -> Any:
        value = obj.get(name)
        if type(value) is not typ or (size is not None and len(value) != size):
            raise RemoteProtocolError(f"handshake: field {name!r} missing or malformed")
        return value

    def _transcript(self, client_id: str, server_id: str, nc: bytes, ns: bytes) -> bytes:
        return msgpack.packb(
            [PROTOCOL_LABEL, self.version, self.role, client_id, server_id, nc, ns],
            use_bin_type=True,
        )

    def _derive(self, ikm: bytes, transcript: bytes, nc: bytes, ns: bytes) -> tuple[bytes, bytes]:
        okm = HKDF(
            algorithm=hashes.SHA256(), length=64, salt=nc + ns, info=_KEYS_LABEL + transcript
        ).derive(ikm)
        return okm[:32], okm[32:]  # client->server, server->client

    def process(self) -> None:
        """Advance with the bytes received so far; raises on any failure."""
        if self._failed:
            raise LocalProtocolError("handshake already failed")
        if self.done:
            return
        try:
            self._step()
        except ProtocolError:
            self._failed = True
            raise


class ClientHandshake(_Handshake):
    """The connecting side. Its hello is queued at construction.

    `role` `ROLE_NODE`: `local_id` is this node's id and `secret` the cluster
    secret. `ROLE_CLIENT`: `local_id` is a client key's id and `secret` its
    secret (see `ClientKey`). `expected_peer_id`, if given, must match the id
    the server proves; a mismatch raises `RemoteProtocolError` (connected to
    the wrong node).
    """

    def __init__(
        self,
        local_id: str,
        secret: bytes,
        *,
        role: str = ROLE_NODE,
        expected_peer_id: str | None = None,
        version: int = PROTOCOL_VERSION,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        super().__init__(local_id, secret, version=version, rng=rng)
        if role not in ROLES:
            raise LocalProtocolError(f"unknown handshake role {role!r}")
        self.role = role
        self.expected_peer_id = expected_peer_id
        self._key = ClientKey(local_id, self._secret) if role == ROLE_CLIENT else None
        self._send({"t": "hello", "v": version, "role": role, "id": self.node_id,
                    "nonce": self._nonce})

    @classmethod
    def for_key(cls, key: ClientKey, **kw: Any) -> ClientHandshake:
        """A client's handshake, proving `key`."""
        return cls(key.id, key.secret, role=ROLE_CLIENT, **kw)

    def _step(self) -> None:
        obj = self._next()
        if obj is None:
            return
        if obj["t"] != "hello":
            raise RemoteProtocolError(f"handshake: expected server hello, got {obj['t']!r}")
        version = obj.get("v")
        if version != self.version:
            raise RemoteProtocolError(
                f"protocol version mismatch: peer speaks version {version!r}, "
                f"we speak version {self.version}"
            )
        server_id = _check_id(obj.get("id"), "peer")
        ns = self._field(obj, "nonce", bytes, NONCE_SIZE)
        mac = self._field(obj, "mac", bytes, MAC_SIZE)
        transcript = self._transcript(self.node_id, server_id, self._nonce, ns)
        if self._key is None:
            expected, ikm = _hmac(self._secret, _NODE_SERVER_LABEL + transcript), self._secret
            finish = _hmac(self._secret, _NODE_CLIENT_LABEL + transcript)
        else:
            verifier, ikm = self._key.verifier, self._key.proof_key
            expected = _hmac(verifier, _KEY_SERVER_LABEL + transcript)
            finish = _xor(ikm, _hmac(verifier, _KEY_CLIENT_LABEL + transcript))
        if not hmac.compare_digest(mac, expected):
            self._reject("auth")
            if self._key is None:
                raise AuthenticationError(
                    f"peer {server_id!r} could not prove it holds the cluster secret "
                    "(wrong cluster secret on one side?)"
                )
            raise AuthenticationError(
                f"node {server_id!r} does not know client key {self.node_id} (revoked, or "
                "never created) or the key's secret is wrong"
            )
        if self.expected_peer_id is not None and server_id != self.expected_peer_id:
            raise RemoteProtocolError(
                f"connected to node {server_id!r} but expected {self.expected_peer_id!r}"
            )
        self._send({"t": "finish", "mac": finish})
        c2s, s2c = self._derive(ikm, transcript, self._nonce, ns)
        self._keys = SessionKeys(server_id, send_key=c2s, recv_key=s2c, role=ROLE_NODE)
        self.done = True


class ServerHandshake(_Handshake):
    """The accepting side: answers a hello, then checks the peer's proof.

    `members`: the node ids allowed to connect as nodes (None: any id that
    proves the cluster secret). `lookup_key(key_id)`: the verifier of a live
    client key, or None (None instead of a function: client keys refused).
    `admit(role, peer_id)`, called once the hello is read: None to go on, or a
    reason to refuse the connection as busy (the caller's caps per role).
    """

    def __init__(
        self,
        node_id: str,
        secret: bytes,
        *,
        members: Container[str] | None = None,
        lookup_key: Callable[[str], bytes | None] | None = None,
        admit: Callable[[str, str], str | None] | None = None,
        version: int = PROTOCOL_VERSION,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        super().__init__(node_id, secret, version=version, rng=rng)
        self._members = members
        self._lookup_key = lookup_key
        self._admit = admit
        self._client: tuple[str, bytes, bytes] | None = None  # id, nonce, transcript
        self._verifier: bytes | None = None  # of the client key (a random one if unknown)
        self._known_key = False
        self.peer_id: str | None = None
        """The id the peer claimed in its hello (proven only once `done`)."""

    def _step(self) -> None:
        while not self.done:
            obj = self._next()
            if obj is None:
                return
            if self._client is None:
                self._on_hello(obj)
            else:
                self._on_finish(obj)

    def _on_hello(self, obj: dict[str, Any]) -> None:
        if obj["t"] != "hello":
            raise RemoteProtocolError(f"handshake: expected client hello, got {obj['t']!r}")
        version = obj.get("v")
        if version != self.version:
            self._reject("version")
            raise RemoteProtocolError(
                f"protocol version mismatch: peer speaks version {version!r}, "
                f"we speak version {self.version}"
            )
        role = obj.get("role")
        if role not in ROLES:
            raise RemoteProtocolError("handshake: field 'role' missing or malformed")
        self.role = role
        client_id = _check_id(obj.get("id"), "peer")
        self.peer_id = client_id
        nc = self._field(obj, "nonce", bytes, NONCE_SIZE)
        if role == ROLE_NODE and self._members is not None and client_id not in self._members:
            self._reject("member")
            raise AuthenticationError(
                f"peer claims to be node {client_id!r}, which is not a node of this cluster"
            )
        if role == ROLE_CLIENT:
            if self._lookup_key is None:
                self._reject("role")
                raise RemoteProtocolError("a client key was offered, but this node takes none")
            verifier = self._lookup_key(client_id)
            self._known_key = verifier is not None
            # An unknown id gets a proof from a random verifier: the peer cannot tell an
            # unknown id from a wrong secret, and the finish is refused below.
            self._verifier = verifier if verifier is not None else os.urandom(MAC_SIZE)
        if self._admit is not None:
            refusal = self._admit(role, client_id)
            if refusal is not None:
                self._reject("busy", detail=refusal[:MAX_REJECT_DETAIL])
                raise HandshakeBusy(f"refused {role} {client_id!r}: {refusal}")
        transcript = self._transcript(client_id, self.node_id, nc, self._nonce)
        self._client = (client_id, nc, transcript)
        if role == ROLE_NODE:
            mac = _hmac(self._secret, _NODE_SERVER_LABEL + transcript)
        else:
            assert self._verifier is not None
            mac = _hmac(self._verifier, _KEY_SERVER_LABEL + transcript)
        self._send({"t": "hello", "v": self.version, "id": self.node_id, "nonce": self._nonce,
                    "mac": mac})

    def _on_finish(self, obj: dict[str, Any]) -> None:
        assert self._client is not None
        client_id, nc, transcript = self._client
        if obj["t"] != "finish":
            raise RemoteProtocolError(f"handshake: expected client finish, got {obj['t']!r}")
        mac = self._field(obj, "mac", bytes, MAC_SIZE)
        if self.role == ROLE_NODE:
            ikm = self._secret
            if not hmac.compare_digest(mac, _hmac(self._secret, _NODE_CLIENT_LABEL + transcript)):
                raise AuthenticationError(
                    f"peer {client_id!r} failed to prove it holds the cluster secret "
                    "(wrong secret or replayed handshake)"
                )
        else:
            assert self._verifier is not None
            ikm = _xor(mac, _hmac(self._verifier, _KEY_CLIENT_LABEL + transcript))
            proven = hmac.compare_digest(hashlib.sha256(ikm).digest(), self._verifier)
            if not (proven and self._known_key):
                raise AuthenticationError(
                    f"client key {client_id!r} refused: unknown or revoked key, wrong secret, "
                    "or a replayed handshake"
                )
        c2s, s2c = self._derive(ikm, transcript, nc, self._nonce)
        self._keys = SessionKeys(client_id, send_key=s2c, recv_key=c2s, role=self.role)
        self.done = True
