"""The RPC receive path, in CPU time: ``python -m bench.rpc_recv [--quick] [--compare OLD_TREE]``.

Measures, in this process (``time.process_time``, so other load on the
machine costs wall time, not these figures):

1. **sans-io receive**: CPU per MiB for an encrypted `Session` to turn the wire
   bytes of 1 MiB messages into messages, fed in 256 KiB recv-sized pieces.
   The wire bytes are made once beforehand; only the receiver is timed. Both
   styles include one copy per byte standing for the kernel's copy of
   ``recv_into``: *copy-in* receives into a 256 KiB buffer and hands it to
   `receive_data` (the old path, which the decoder then copies again), *in
   place* receives into `get_buffer()` (the decoder's own buffers).
2. **loopback calls**: CPU per round trip of a 1 MiB get (small request, 1 MiB
   reply), a 1 MiB put (1 MiB request, small reply) and a 4 KiB get between two
   `RpcConnection`s over a socket pair (both ends in this process, so both
   ends' CPU is counted). The get takes the reply as a view where the code
   offers ``call(..., view=True)``.

``--compare OLD_TREE`` runs this file alternately against the blocknode of
OLD_TREE (a checkout, e.g. a worktree of the previous commit) and of this
tree, several times (A B A B ...), and prints the medians side by side with
their ratio. Without it, one run against the blocknode that is importable.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
PIECE = 256 * 1024


def _keys() -> tuple[Any, Any]:
    from blocknode.rpc.handshake import ClientHandshake, ServerHandshake

    secret = bytes(range(32))
    c, s = ClientHandshake("a", secret), ServerHandshake("b", secret, members={"a", "b"})
    s.receive_data(c.data_to_send())
    s.process()
    c.receive_data(s.data_to_send())
    c.process()
    s.receive_data(c.data_to_send())
    s.process()
    return c.keys, s.keys


def _sansio(n: int) -> dict[str, float]:
    from blocknode.rpc.session import Session
    from blocknode.rpc.wire import MSG_REQUEST, NEED_DATA, OutgoingMessage, encode_head

    ka, kb = _keys()
    sender = Session(ka)
    data = os.urandom(MiB)
    wire = bytearray()
    for sid in range(1, n + 1):
        sender.queue(OutgoingMessage(sid, False, encode_head(MSG_REQUEST, "put", {}, True), memoryview(data)))
        while sender.pending:
            view, _ = sender.data_to_send()
            wire += view
    stream = bytes(wire)
    out: dict[str, float] = {}
    styles = ["copy-in"] + (["in place"] if hasattr(Session, "get_buffer") else [])
    for style in styles:
        receiver = Session(kb)
        rbuf = bytearray(PIECE)
        got = 0
        pos, size = 0, len(stream)
        src = memoryview(stream)
        t = time.process_time()
        while pos < size:
            if style == "copy-in":
                k = min(PIECE, size - pos)
                rbuf[:k] = src[pos : pos + k]  # the kernel's copy into the recv buffer
                receiver.receive_data(memoryview(rbuf)[:k])
            else:
                target = receiver.get_buffer()
                k = min(len(target), PIECE, size - pos)
                target[:k] = src[pos : pos + k]  # the kernel's copy, into the decoder's buffer
                receiver.buffer_updated(k)
            pos += k
            while receiver.next_message() is not NEED_DATA:
                got += 1
        cpu = time.process_time() - t
        assert got == n
        out[f"sans-io receive, {style} (ms CPU per MiB)"] = 1000 * cpu / n
    return out


async def _loopback(n: int) -> dict[str, float]:
    import inspect

    import trio

    from blocknode.rpc.connection import RpcConnection
    from blocknode.rpc.session import Session

    data = os.urandom(MiB)
    small = os.urandom(4096)

    async def handler(peer: Any, kind: str, fields: dict, payload: Any) -> tuple[dict, Any]:
        if kind == "put" and len(payload) != MiB and payload != b"warm-up":
            raise AssertionError("the put's payload did not arrive whole")
        return {}, {"get": data, "get4k": small}.get(kind)

    handler.takes_views = True  # type: ignore[attr-defined]  # the put's payload is not copied
    ka, kb = _keys()
    sa, sb = trio.socket.socketpair()
    a = RpcConnection(trio.SocketStream(sa), Session(ka), "b")
    b = RpcConnection(trio.SocketStream(sb), Session(kb), "a", handler)
    views = "view" in inspect.signature(a.call).parameters
    get_kw = {"view": True} if views else {}
    out: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        nursery.start_soon(b.run)
        await a.call("put", {}, b"warm-up")
        for kind, payload, kw in (("get", None, get_kw), ("put", data, {}), ("get4k", None, get_kw)):
            calls = n if kind != "get4k" else 10 * n
            t = time.process_time()
            for _ in range(calls):
                _, reply = await a.call(kind, {}, payload, **kw)
                if kind != "put":
                    assert len(reply) == len(data if kind == "get" else small)
            cpu = time.process_time() - t
            what = f"1 MiB {kind}" if kind != "get4k" else "4 KiB get"
            out[f"loopback {what}, both ends (ms CPU per call)"] = 1000 * cpu / calls
        nursery.cancel_scope.cancel()
    return out


def measure(quick: bool) -> dict[str, float]:
    """One run against the importable blocknode: {row name: ms}."""
    import trio

    n = 20 if quick else 200
    return {**_sansio(n), **trio.run(_loopback, n)}


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Rows of ``{"name", "value", "unit"}`` for a driver."""
    return [{"name": k.split(" (")[0], "value": round(v, 3), "unit": k.split("(")[1].rstrip(")")}
            for k, v in measure(quick).items()]


def compare(old_tree: str, reps: int, quick: bool) -> None:
    """Alternate runs against `old_tree` and this tree; print medians side by side."""
    this_tree = str(Path(__file__).resolve().parent.parent)
    results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for _ in range(reps):
        for label, tree in (("old", old_tree), ("new", this_tree)):
            env = {**os.environ, "PYTHONPATH": tree}
            args = [sys.executable, str(Path(__file__).resolve()), "--json"] + (["--quick"] if quick else [])
            proc = subprocess.run(args, env=env, cwd=tree, capture_output=True, text=True, timeout=900, check=True)
            results[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    names = list(dict.fromkeys(k for r in results["old"] + results["new"] for k in r))
    print(f"load average: {os.getloadavg()[0]:.2f} (1 min), {reps} alternating pairs, medians")
    print(f"{'':<62} {'old':>8} {'new':>8} {'new/old':>8}")
    old_copy_in = "sans-io receive, copy-in (ms CPU per MiB)"
    for name in names:
        old = [r[name] for r in results["old"] if name in r]
        label = name
        if not old:  # the old code has no in-place receive: against its copy-in path
            old = [r[old_copy_in] for r in results["old"]]
            label = name.replace(" (", " vs old copy-in (")
        new = [r[name] for r in results["new"] if name in r]
        mo, mn = statistics.median(old), statistics.median(new)
        print(f"{label:<62} {mo:>8.3f} {mn:>8.3f} {mn / mo:>8.2f}")


def main() -> None:
    quick = "--quick" in sys.argv
    if "--json" in sys.argv:
        print(json.dumps(measure(quick)))
        return
    if "--compare" in sys.argv:
        old_tree = sys.argv[sys.argv.index("--compare") + 1]
        reps = int(os.environ.get("REPS", "5"))
        compare(old_tree, reps, quick)
        return
    for k, v in measure(quick).items():
        print(f"{k:<60} {v:>8.3f}")


if __name__ == "__main__":
    main()
