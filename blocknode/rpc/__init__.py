"""blocknode RPC: sans-io framing and handshake, Trio connections, the node network.

Modules: `wire` (frames, messages, chunk scheduler — sans-io), `handshake`
(mutual authentication, session keys, AES-256-GCM — sans-io), `session` (the
sans-io state of an established connection), `connection` (one connection over
a `trio.abc.Stream`), `network` (`RpcNetwork`: peers, calls, quorum calls, RAM
budget), `client` (`open_client` for the CLI), `errors` (remote error mapping).
"""

from blocknode.rpc.client import RpcClientConnection, open_client
from blocknode.rpc.connection import Handler, RpcConnection
from blocknode.rpc.errors import (
    RemoteCallError,
    RemoteCorrupted,
    RemoteHashMismatch,
    RemoteNotFound,
)
from blocknode.rpc.handshake import PROTOCOL_VERSION
from blocknode.rpc.network import ByteBudget, RpcNetwork
from blocknode.rpc.wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    PRIO_BACKGROUND,
    PRIO_HIGH,
    PRIO_NORMAL,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "PRIO_BACKGROUND",
    "PRIO_HIGH",
    "PRIO_NORMAL",
    "PROTOCOL_VERSION",
    "ByteBudget",
    "Handler",
    "RemoteCallError",
    "RemoteCorrupted",
    "RemoteHashMismatch",
    "RemoteNotFound",
    "RpcClientConnection",
    "RpcConnection",
    "RpcNetwork",
    "open_client",
]
