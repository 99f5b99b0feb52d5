"""The async client API (Trio): put, get, ref, unref and admin calls through one node.

Modules: `api` (`Client`, `open_client`), `batcher` (concurrent small puts share
one RPC), `manifest` (how data larger than a block is named), `portal` (the Trio
client in a background thread, for callers that are not Trio), `sync` (the
blocking client, `blocknode.connect`; the asyncio one is `blocknode.aio`),
`stream` (putting a file object block by block). This package imports neither
LMDB nor the node's manager: a client is not a node.
"""

from blocknode.client.api import Client, open_client
from blocknode.client.batcher import BATCH_MAX_BLOCK
from blocknode.client.manifest import (
    MANIFEST_MAGIC,
    decode_manifest,
    encode_manifest,
    new_ref_id,
    parse_hash,
)

__all__ = [
    "BATCH_MAX_BLOCK",
    "MANIFEST_MAGIC",
    "Client",
    "decode_manifest",
    "encode_manifest",
    "new_ref_id",
    "open_client",
    "parse_hash",
]
