"""blocknode: a distributed, content-addressed block store node.

The public surface: the clients (Trio: `open_client`/`Client`; blocking:
`connect`/`SyncClient`; asyncio: `blocknode.aio`) and the error types callers
branch on. Everything else is internal (and may change).
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from blocknode.client import Client, open_client
from blocknode.client.sync import SyncClient, connect
from blocknode.config import NodeConfig, load_config
from blocknode.errors import (
    AuthenticationError,
    BlockCorrupted,
    BlocknodeError,
    BlockNotFound,
    ClientClosed,
    ClientForked,
    ConfigError,
    Forbidden,
    HashMismatch,
    InvalidHash,
    LocalProtocolError,
    MetadataFull,
    NodeUnreachable,
    ProtocolError,
    QuorumError,
    RemoteError,
    RemoteProtocolError,
    RpcError,
    RpcTimeout,
    StoreError,
)

__all__ = [
    "AuthenticationError",
    "BlockCorrupted",
    "BlockNotFound",
    "BlocknodeError",
    "Client",
    "ClientClosed",
    "ClientForked",
    "ConfigError",
    "Forbidden",
    "HashMismatch",
    "InvalidHash",
    "LocalProtocolError",
    "MetadataFull",
    "NodeConfig",
    "NodeUnreachable",
    "ProtocolError",
    "QuorumError",
    "RemoteError",
    "RemoteProtocolError",
    "RpcError",
    "RpcTimeout",
    "StoreError",
    "SyncClient",
    "__version__",
    "aio",
    "connect",
    "load_config",
    "open_client",
]

if TYPE_CHECKING:
    from blocknode import aio


def __getattr__(name: str) -> Any:
    # `blocknode.aio` on first use: importing asyncio costs every command tens of ms.
    if name == "aio":
        import blocknode.aio

        return blocknode.aio
    raise AttributeError(f"module 'blocknode' has no attribute {name!r}")
