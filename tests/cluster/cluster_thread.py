"""An in-process cluster running in its own thread (its own `trio.run`), for tests of
clients that are not Trio (the blocking and asyncio clients, the examples)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from blocknode.config import NodeConfig
from tests.cluster.harness import in_process_cluster


@contextmanager
def cluster_in_thread(root: Path, n: int = 3, **kw: Any) -> Iterator[list[NodeConfig]]:
    """Start `n` nodes (see `write_cluster`) in a background thread; yield their configs."""
    started = threading.Event()
    box: dict[str, Any] = {}
    stop = trio.Event()

    async def main() -> None:
        async with in_process_cluster(root, n, **kw) as cluster:
            box["configs"] = cluster.configs
            box["token"] = trio.lowlevel.current_trio_token()
            started.set()
            await stop.wait()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            box["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=run, name="cluster", daemon=True)
    thread.start()
    started.wait(60)
    if "error" in box:
        raise box["error"]
    try:
        yield box["configs"]
    finally:
        trio.from_thread.run_sync(stop.set, trio_token=box["token"])
        thread.join(30)
