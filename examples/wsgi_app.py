"""A plain WSGI app (no framework) storing uploaded files in blocknode.

    POST   /files            body: the file     -> 201 {"hash": ..., "ref": ...}
    GET    /files/HASH                          -> the bytes (streamed)
    DELETE /files/HASH?ref=REF                  -> 204 (the reference is deleted)

One blocking client (`blocknode.connect`) is shared by every worker thread of
the server. Run it next to a node:

    python -m examples.wsgi_app [--config PATH] [--port 8080]
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIServer, make_server

import blocknode


class _Body:
    """`wsgi.input` limited to CONTENT_LENGTH (reading past it could block)."""

    def __init__(self, stream: Any, length: int) -> None:
        self._stream, self._left = stream, length

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._stream.read(n) if n else b""
        self._left -= len(data)
        return data


class _LazyResponse:
    """A file object for `get_into` that starts the response at its first block
    (so an error before any byte can still be a 404)."""

    def __init__(self, start_response: Callable[..., Any]) -> None:
        self._start = start_response
        self._write: Callable[[bytes], Any] | None = None

    def write(self, chunk: bytes) -> None:
        if self._write is None:
            self._write = self._start("200 OK", [("Content-Type", "application/octet-stream")])
        self._write(bytes(chunk))  # wsgiref wants exactly `bytes`

    def finish(self) -> None:
        if self._write is None:  # no block at all (never: empty data is one block)
            self.write(b"")


def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def make_app(client: blocknode.SyncClient) -> Callable[..., Iterable[bytes]]:
    """The WSGI callable, using `client` from every request thread."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        try:
            if method == "POST" and path == "/files":
                ref = f"upload-{uuid.uuid4().hex}"
                length = int(environ.get("CONTENT_LENGTH") or 0)
                h = client.put(_Body(environ["wsgi.input"], length), ref=ref)  # type: ignore[arg-type]
                return _json(start_response, "201 Created", {"hash": h, "ref": ref})
            if path.startswith("/files/"):
                h = path.removeprefix("/files/")
                if method == "GET":
                    out = _LazyResponse(start_response)
                    client.get_into(h, out)  # type: ignore[arg-type]
                    out.finish()
                    return []
                if method == "DELETE":
                    ref = parse_qs(environ.get("QUERY_STRING", "")).get("ref", [""])[0]
                    client.unref(h, ref)
                    start_response("204 No Content", [])
                    return []
            return _json(start_response, "404 Not Found", {"error": "no such route"})
        except (blocknode.BlockNotFound, blocknode.InvalidHash) as exc:
            return _json(start_response, "404 Not Found", {"error": str(exc)})
        except blocknode.BlocknodeError as exc:
            return _json(start_response, "503 Service Unavailable", {"error": str(exc)})

    return app


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="node config (default: the CLI's lookup)")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args()
    with blocknode.connect(args.config) as client:
        server = make_server("127.0.0.1", args.port, make_app(client), server_class=ThreadingWSGIServer)
        print(f"serving on http://127.0.0.1:{args.port}/files")
        server.serve_forever()


if __name__ == "__main__":
    main()
