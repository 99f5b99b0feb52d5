"""Storage: everything a node keeps on its disks, and the only package that uses LMDB.

Modules (each owns its tables or files; nothing outside this package opens a
transaction or touches a table):

- `env`: `MetadataEnv`, the LMDB environment and its group-commit writer.
- `refs`: `RcEntry`, `RefEntry`, `RefTable` (tables `rc`, `refs`).
- `resync_queue`: `ResyncQueue`, `ErrorEntry` and the backoff policy (tables `resync`, `errors`).
- `worker_state`: `WorkerState` (table `state`).
- `inline`: `InlineTable`, small blocks (tables `blocks`, `blocks_zst`).
- `keys`: `KeyTable`, `KeyRecord`: the client keys (table `keys`).
- `metadata`: `MetadataStore`, which composes the above (`node.meta`).
- `block_files`: `BlockFiles`, the block files on disk, in one or several data directories.
- `local_blocks`: `LocalBlocks`, files + inline blocks + references under each block's lock.
- `rebalance`: `Rebalance`, the worker that moves block files to their data directory
  (`repair rebalance`) and refetches the blocks of a data directory that failed.
"""

from blocknode.storage.block_files import BlockFiles
from blocknode.storage.keys import KeyRecord, KeyTable
from blocknode.storage.local_blocks import LocalBlocks
from blocknode.storage.metadata import MetadataStore
from blocknode.storage.refs import ABSENT, RcEntry, RefEntry
from blocknode.storage.resync_queue import ErrorEntry

__all__ = [
    "ABSENT",
    "BlockFiles",
    "ErrorEntry",
    "KeyRecord",
    "KeyTable",
    "LocalBlocks",
    "MetadataStore",
    "RcEntry",
    "RefEntry",
]
