"""blocknode RPC: sans-io framing and handshake, Trio connections, the node network.

Modules: `wire` (frames, messages, chunk scheduler — sans-io), `handshake`
(mutual authentication of nodes and client keys, session keys, AES-256-GCM —
sans-io), `session` (the
sans-io state of an established connection), `transport` (the `Connector`
seam), `connection` (the one connection engine over a `trio.abc.Stream`; a
client connection is one without a request handler), `connect` (the one
connect + handshake routine, and `open_client`), `network` (`RpcNetwork`:
peers, calls, quorum calls, RAM budget), `errors` (remote error mapping).
"""

from blocknode.rpc.connect import open_client, open_connection
from blocknode.rpc.connection import Handler, RpcConnection
from blocknode.rpc.errors import (
    RemoteCallError,
    RemoteCorrupted,
    RemoteForbidden,
    RemoteHashMismatch,
    RemoteNotFound,
)
from blocknode.rpc.handshake import PROTOCOL_VERSION, ROLE_CLIENT, ROLE_NODE, ClientKey, Peer
from blocknode.rpc.network import NODE_LIMITS, ByteBudget, ConnectionLimits, RpcNetwork
from blocknode.rpc.wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    MAX_BATCH_ROWS,
    PRIO_BACKGROUND,
    PRIO_HIGH,
    PRIO_NORMAL,
    ReceiveBudget,
    max_message_size,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MAX_BATCH_ROWS",
    "NODE_LIMITS",
    "PRIO_BACKGROUND",
    "PRIO_HIGH",
    "PRIO_NORMAL",
    "PROTOCOL_VERSION",
    "ROLE_CLIENT",
    "ROLE_NODE",
    "ByteBudget",
    "ClientKey",
    "ConnectionLimits",
    "Handler",
    "Peer",
    "RemoteCallError",
    "RemoteCorrupted",
    "RemoteForbidden",
    "RemoteHashMismatch",
    "ReceiveBudget",
    "RemoteNotFound",
    "RpcConnection",
    "RpcNetwork",
    "max_message_size",
    "open_client",
    "open_connection",
]
