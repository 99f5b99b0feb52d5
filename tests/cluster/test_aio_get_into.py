"""`blocknode.aio.Client.get_into` with each kind of writer: an asyncio stream
writer (drained after each block), an object with an async `write` (awaited, one
block at a time), a plain file (written off the event loop), and a raw file that
writes less than it is given."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

import blocknode
import blocknode.aio
from tests.cluster.cluster_thread import cluster_in_thread

BLOCK = 64 * 1024
DATA = os.urandom(6 * BLOCK + 123)  # six blocks and a bit, behind a manifest
BLOCKS = 7


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    with cluster_in_thread(tmp_path_factory.mktemp("get_into"), 1, rf=1, block_size=BLOCK) as configs:
        yield configs


def _run(cfg, body) -> None:
    async def main() -> None:
        async with await blocknode.aio.connect(cfg, timeout=20) as client:
            h = await client.put(DATA)
            await body(client, h)

    asyncio.run(main())


class SlowAsyncSink:
    """An async `write` that takes a while; fails if two writes overlap."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.active = False

    async def write(self, chunk: bytes) -> None:
        assert not self.active, "a write started before the previous one finished"
        self.active = True
        await asyncio.sleep(0.01)
        self.parts.append(bytes(chunk))
        self.active = False


def test_async_write_is_awaited_one_block_at_a_time(one):
    async def body(client, h) -> None:
        sink = SlowAsyncSink()
        assert await client.get_into(h, sink) == len(DATA)
        assert b"".join(sink.parts) == DATA and len(sink.parts) == BLOCKS

        class Failing(SlowAsyncSink):
            async def write(self, chunk: bytes) -> None:
                await super().write(chunk)
                if len(self.parts) == 2:
                    raise OSError("disk full")

        failing = Failing()
        with pytest.raises(OSError, match="disk full"):
            await client.get_into(h, failing)
        assert len(failing.parts) == 2  # it stopped there
        assert await client.get(h) == DATA  # and the client is fine

    _run(one[0], body)


def test_asyncio_stream_writer_is_drained(one):
    async def body(client, h) -> None:
        received = bytearray()
        done = asyncio.Event()

        async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while chunk := await reader.read(16 * 1024):
                received.extend(chunk)
                await asyncio.sleep(0.002)  # a slow peer: the sender's buffer fills
            writer.close()
            done.set()

        server = await asyncio.start_server(slow_reader, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.transport.set_write_buffer_limits(high=16 * 1024)
            drains = 0
            real_drain = writer.drain

            async def counting_drain() -> None:
                nonlocal drains
                drains += 1
                await real_drain()
                # drained: the buffer is below its high-water mark before the next block
                assert writer.transport.get_write_buffer_size() <= 16 * 1024

            writer.drain = counting_drain  # type: ignore[method-assign]
            assert await client.get_into(h, writer) == len(DATA)
            writer.close()
            await writer.wait_closed()
            await asyncio.wait_for(done.wait(), 20)
        assert bytes(received) == DATA
        assert drains == BLOCKS

    _run(one[0], body)


def test_plain_file_is_written_off_the_loop(one, tmp_path):
    async def body(client, h) -> None:
        loop_thread = threading.current_thread()
        path = tmp_path / "out.bin"
        writers: set[threading.Thread] = set()

        with open(path, "wb") as f:
            real_write = f.write

            class Recording:
                def fileno(self) -> int:
                    return f.fileno()

                def write(self, chunk: bytes) -> int:
                    writers.add(threading.current_thread())
                    return real_write(chunk)

            assert await client.get_into(h, Recording()) == len(DATA)
        assert path.read_bytes() == DATA
        assert writers and loop_thread not in writers

        # A real, unbuffered file as it is (its writes may be short: all is written).
        with open(tmp_path / "raw.bin", "wb", buffering=0) as raw:
            assert await client.get_into(h, raw) == len(DATA)
        assert (tmp_path / "raw.bin").read_bytes() == DATA

    _run(one[0], body)


class ShortWrites:
    """A raw sink that accepts at most 1000 bytes per write, and says so."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, chunk) -> int:
        n = min(len(chunk), 1000)
        self.buf += bytes(chunk[:n])
        return n


def test_short_writes_are_completed_by_both_clients(one):
    async def body(client, h) -> None:
        sink = ShortWrites()
        assert await client.get_into(h, sink) == len(DATA)
        assert bytes(sink.buf) == DATA

    _run(one[0], body)
    with blocknode.connect(one[0], timeout=20) as client:
        h = client.put(DATA)
        sink = ShortWrites()
        assert client.get_into(h, sink) == len(DATA)
        assert bytes(sink.buf) == DATA
