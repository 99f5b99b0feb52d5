"""blocknode: a distributed, content-addressed block store node.

The public surface: the clients (Trio: `open_client`/`Client`; blocking:
`connect`/`SyncClient`; asyncio: `blocknode.aio`) and the error types callers
branch on. Everything else is internal (and may change).
"""

__version__ = "0.1.0"

from blocknode import aio
from blocknode.client import Client, open_client
from blocknode.client.sync import SyncClient, connect
from blocknode.config import NodeConfig, load_config
from blocknode.errors import (
    AuthenticationError,
    BlockCorrupted,
    BlocknodeError,
    BlockNotFound,
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
