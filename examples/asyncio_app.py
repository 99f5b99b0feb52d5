"""A plain asyncio HTTP app (`asyncio.start_server`, no framework) storing uploaded
files in blocknode, with the asyncio client (`blocknode.aio`).

    POST   /files            body: the file     -> 201 {"hash": ..., "ref": ...}
    GET    /files/HASH                          -> the bytes (streamed)
    DELETE /files/HASH?ref=REF                  -> 204 (the reference is deleted)

Minimal HTTP/1.1: one request per connection, a Content-Length body. Run it
next to a node:

    python -m examples.asyncio_app [--config PATH] [--port 8081]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import blocknode
import blocknode.aio

MAX_UPLOAD = 256 * 1024 * 1024


async def _respond(writer: asyncio.StreamWriter, status: str, body: bytes = b"",
                   ctype: str = "application/json") -> None:
    writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + body)
    await writer.drain()


class _LazyResponse:
    """`get_into`'s file object: the headers go with the first block, so an error
    before any byte can still be a 404."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer, self.started = writer, False

    def write(self, chunk: bytes) -> None:
        if not self.started:
            self.started = True
            self._writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                               b"Connection: close\r\n\r\n")
        self._writer.write(chunk)

    async def drain(self) -> None:
        await self._writer.drain()


def make_handler(client: blocknode.aio.Client) -> Any:
    """The `asyncio.start_server` callback, using `client` from every connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = (await reader.readline()).decode("latin-1").split()
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if len(request) < 2:
                return await _respond(writer, "400 Bad Request")
            method, url = request[0], urlsplit(request[1])
            try:
                if method == "POST" and url.path == "/files":
                    length = int(headers.get("content-length", "0"))
                    if length > MAX_UPLOAD:
                        return await _respond(writer, "413 Payload Too Large")
                    body = await reader.readexactly(length)
                    ref = f"upload-{uuid.uuid4().hex}"
                    h = await client.put(body, ref=ref)
                    return await _respond(writer, "201 Created",
                                          json.dumps({"hash": h, "ref": ref}).encode())
                if url.path.startswith("/files/"):
                    h = url.path.removeprefix("/files/")
                    if method == "GET":
                        out = _LazyResponse(writer)
                        await client.get_into(h, out)
                        if not out.started:  # no block at all (never: empty data is one block)
                            await _respond(writer, "200 OK", ctype="application/octet-stream")
                        return
                    if method == "DELETE":
                        await client.unref(h, parse_qs(url.query).get("ref", [""])[0])
                        return await _respond(writer, "204 No Content")
                return await _respond(writer, "404 Not Found")
            except (blocknode.BlockNotFound, blocknode.InvalidHash) as exc:
                return await _respond(writer, "404 Not Found", json.dumps({"error": str(exc)}).encode())
            except blocknode.BlocknodeError as exc:
                return await _respond(writer, "503 Service Unavailable",
                                      json.dumps({"error": str(exc)}).encode())
        finally:
            writer.close()

    return handle


async def serve(config: Any, port: int) -> None:
    async with await blocknode.aio.connect(config) as client:
        server = await asyncio.start_server(make_handler(client), "127.0.0.1", port)
        print(f"serving on http://127.0.0.1:{port}/files")
        async with server:
            await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="node config (default: the CLI's lookup)")
    p.add_argument("--port", type=int, default=8081)
    args = p.parse_args()
    asyncio.run(serve(args.config, args.port))


if __name__ == "__main__":
    main()
