"""Sans-io mutual authentication, session keys and per-frame AEAD.

Handshake (three length-prefixed msgpack frames, at most `MAX_HANDSHAKE_FRAME`
bytes each, before any encrypted byte)::

    client -> server  {"t": "hello",  "v": version, "id": client id, "nonce": 32 random bytes}
    server -> client  {"t": "hello",  "v": version, "id": server id, "nonce": 32 random bytes,
                       "mac": HMAC(secret, "server" label + transcript)}
    client -> server  {"t": "finish", "mac": HMAC(secret, "client" label + transcript)}

``transcript = msgpack([PROTOCOL_LABEL, version, client id, server id, client nonce,
server nonce])``. Each side proves it holds the 32-byte cluster secret without
sending it; the role labels stop a proof being reflected back; the peer's fresh
nonce stops a recorded handshake being replayed. A version mismatch gets a
``{"t": "reject", "why": "version", "v": ...}`` frame and a `RemoteProtocolError`
naming both versions on both sides. A client that finds the server's proof wrong
sends ``{"t": "reject", "why": "auth"}`` and raises `AuthenticationError`; the
server then raises `AuthenticationError` too. A peer with the wrong secret never
gets past this point, so it never sees an encrypted frame.

Session keys: HKDF-SHA256 over the secret, salted with both nonces and bound to
the transcript, gives one 32-byte key per direction. Every later frame is sealed
with AES-256-GCM (see `bench/rpc_crypto.py` for why not ChaCha20-Poly1305) using
a per-direction 64-bit counter as the nonce and the clear chunk header as
associated data: a tampered, replayed, reordered or truncated frame fails its
tag and raises `AuthenticationError`.

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
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

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
    "SECRET_SIZE",
    "TAG_SIZE",
    "ClientHandshake",
    "ServerHandshake",
    "SessionCipher",
    "SessionKeys",
]

PROTOCOL_VERSION: Final = 1
PROTOCOL_LABEL: Final = b"blocknode-rpc"
SECRET_SIZE: Final = 32
NONCE_SIZE: Final = 32
MAC_SIZE: Final = 32
TAG_SIZE: Final = 16
MAX_HANDSHAKE_FRAME: Final = 1024
MAX_ID_LEN: Final = 256

_SERVER_LABEL = b"blocknode server proof\x00"
_CLIENT_LABEL = b"blocknode client proof\x00"
_KEYS_LABEL = b"blocknode session keys\x00"


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """Result of a handshake: who the peer is and the two directional keys."""

    peer_id: str
    send_key: bytes
    recv_key: bytes


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
    """Shared machinery of both roles."""

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
            raise AuthenticationError(
                "peer refused our handshake proof: the cluster secrets differ"
            )
        raise RemoteProtocolError(f"handshake rejected by peer: {why!r}")

    @staticmethod
    def _field(obj: dict[str, Any], name: str, typ: type, size: int | None = None) -> Any:
        value = obj.get(name)
        if type(value) is not typ or (size is not None and len(value) != size):
            raise RemoteProtocolError(f"handshake: field {name!r} missing or malformed")
        return value

    def _transcript(self, client_id: str, server_id: str, nc: bytes, ns: bytes) -> bytes:
        return msgpack.packb(
            [PROTOCOL_LABEL, self.version, client_id, server_id, nc, ns], use_bin_type=True
        )

    def _mac(self, label: bytes, transcript: bytes) -> bytes:
        return hmac.new(self._secret, label + transcript, hashlib.sha256).digest()

    def _derive(self, transcript: bytes, nc: bytes, ns: bytes) -> tuple[bytes, bytes]:
        okm = HKDF(
            algorithm=hashes.SHA256(), length=64, salt=nc + ns, info=_KEYS_LABEL + transcript
        ).derive(self._secret)
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

    `expected_peer_id`, if given, must match the id the server proves; a
    mismatch raises `RemoteProtocolError` (connected to the wrong node).
    """

    def __init__(
        self,
        node_id: str,
        secret: bytes,
        *,
        expected_peer_id: str | None = None,
        version: int = PROTOCOL_VERSION,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        super().__init__(node_id, secret, version=version, rng=rng)
        self.expected_peer_id = expected_peer_id
        self._send({"t": "hello", "v": version, "id": self.node_id, "nonce": self._nonce})

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
        if not hmac.compare_digest(mac, self._mac(_SERVER_LABEL, transcript)):
            self._send({"t": "reject", "why": "auth", "v": self.version})
            raise AuthenticationError(
                f"peer {server_id!r} could not prove it holds the cluster secret "
                "(wrong cluster secret on one side?)"
            )
        if self.expected_peer_id is not None and server_id != self.expected_peer_id:
            raise RemoteProtocolError(
                f"connected to node {server_id!r} but expected {self.expected_peer_id!r}"
            )
        self._send({"t": "finish", "mac": self._mac(_CLIENT_LABEL, transcript)})
        c2s, s2c = self._derive(transcript, self._nonce, ns)
        self._keys = SessionKeys(server_id, send_key=c2s, recv_key=s2c)
        self.done = True


class ServerHandshake(_Handshake):
    """The accepting side: answers a client hello, then checks the client's proof."""

    def __init__(
        self,
        node_id: str,
        secret: bytes,
        *,
        version: int = PROTOCOL_VERSION,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        super().__init__(node_id, secret, version=version, rng=rng)
        self._client: tuple[str, bytes, bytes] | None = None  # id, nonce, transcript

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
            self._send({"t": "reject", "why": "version", "v": self.version})
            raise RemoteProtocolError(
                f"protocol version mismatch: peer speaks version {version!r}, "
                f"we speak version {self.version}"
            )
        client_id = _check_id(obj.get("id"), "peer")
        nc = self._field(obj, "nonce", bytes, NONCE_SIZE)
        transcript = self._transcript(client_id, self.node_id, nc, self._nonce)
        self._client = (client_id, nc, transcript)
        self._send(
            {
                "t": "hello",
                "v": self.version,
                "id": self.node_id,
                "nonce": self._nonce,
                "mac": self._mac(_SERVER_LABEL, transcript),
            }
        )

    def _on_finish(self, obj: dict[str, Any]) -> None:
        assert self._client is not None
        client_id, nc, transcript = self._client
        if obj["t"] != "finish":
            raise RemoteProtocolError(f"handshake: expected client finish, got {obj['t']!r}")
        mac = self._field(obj, "mac", bytes, MAC_SIZE)
        if not hmac.compare_digest(mac, self._mac(_CLIENT_LABEL, transcript)):
            raise AuthenticationError(
                f"peer {client_id!r} failed to prove it holds the cluster secret "
                "(wrong secret or replayed handshake)"
            )
        c2s, s2c = self._derive(transcript, nc, self._nonce)
        self._keys = SessionKeys(client_id, send_key=s2c, recv_key=c2s)
        self.done = True
