"""blocknode RPC: sans-io framing and handshake, Trio connections, the node network.

Modules: `wire` (frames, messages, chunk scheduler — sans-io), `handshake`
(mutual authentication, session keys, AES-256-GCM — sans-io), `session` (the
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
    RemoteHashMismatch,
    RemoteNotFound,
)
from blocknode.rpc.handshake import PROTOCOL_VERSION
from blocknode.rpc.network import ByteBudget, ConnectionLimits, RpcNetwork
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
    "PRIO_BACKGROUND",
    "PRIO_HIGH",
    "PRIO_NORMAL",
    "PROTOCOL_VERSION",
    "ByteBudget",
    "ConnectionLimits",
    "Handler",
    "RemoteCallError",
    "RemoteCorrupted",
    "RemoteHashMismatch",
    "ReceiveBudget",
    "RemoteNotFound",
    "RpcConnection",
    "RpcNetwork",
    "max_message_size",
    "open_client",
    "open_connection",
]
