"""The examples (examples/wsgi_app.py, examples/asyncio_app.py) store and serve
uploaded files through a real cluster."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import urllib.error
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

import blocknode
import blocknode.aio
from examples import asyncio_app, wsgi_app
from tests.cluster.cluster_thread import cluster_in_thread

BLOCK = 64 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with cluster_in_thread(tmp_path_factory.mktemp("examples"), 3, block_size=BLOCK) as configs:
        yield configs


def _request(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _exercise(base: str) -> None:
    """Upload files of several sizes from 8 threads at once, read each back, delete."""
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            for size in (0, 10, 5000, BLOCK + 1, 5 * BLOCK + 3):
                data = os.urandom(size)
                status, body = _request("POST", f"{base}/files", data)
                assert status == 201, body
                info = json.loads(body)
                status, got = _request("GET", f"{base}/files/{info['hash']}")
                assert status == 200 and got == data, (i, size)
                status, _ = _request("DELETE", f"{base}/files/{info['hash']}?ref={info['ref']}")
                assert status == 204
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert _request("GET", f"{base}/files/{'ab' * 32}")[0] == 404
    assert _request("GET", f"{base}/files/nothex")[0] == 404


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_wsgi_example(cluster):
    with blocknode.connect(cluster[0]) as client:
        server = make_server("127.0.0.1", 0, wsgi_app.make_app(client),
                             server_class=wsgi_app.ThreadingWSGIServer, handler_class=_Quiet)
        t = threading.Thread(target=server.serve_forever, daemon=True)
        t.start()
        try:
            _exercise(f"http://127.0.0.1:{server.server_port}")
        finally:
            server.shutdown()
            server.server_close()
            t.join()


def test_asyncio_example(cluster):
    async def main() -> None:
        async with await blocknode.aio.connect(cluster[1]) as client:
            server = await asyncio.start_server(asyncio_app.make_handler(client), "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            async with server:
                await asyncio.to_thread(_exercise, f"http://127.0.0.1:{port}")

    asyncio.run(main())
