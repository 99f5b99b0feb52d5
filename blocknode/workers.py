"""Background workers of a node: installed on a `Node` by `install_workers`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blocknode.node import Node


def install_workers(node: Node) -> None:
    """Register the node's background workers and their admin RPC handlers."""
