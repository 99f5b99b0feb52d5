"""The machine's limits, measured in the same run as the blocknode figures.

    python -m bench.limits [--quick] [--dir DIR]

- raw durable file writes into a ``hh/hh/<hex>`` fan-out tree, exactly the
  store's protocol (write ``.tmp``, fsync, rename, fsync the directory), for
  1 MiB and 4 KiB files, one stream; the directories exist beforehand (a used
  store's steady state; creating them costs one more fsync per new directory);
- raw reads of the same files (page cache, as blocknode's gets see them), alone
  and followed by a BLAKE2b-512 of the bytes (what a verified get must do);
- BLAKE2b-512 (``hashlib``) MiB/s on one core;
- loopback TCP MiB/s: a plain socket sender thread and receiver (``recv_into``
  a preallocated buffer), 1 MiB sends.

Every figure is the median of several repeats with its spread (see
`bench._stats`). `run(quick, base_dir)` returns rows
``{"name", "value", "unit", "spread", "size"}``; `limits_by_name(rows)` indexes them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

MIB = 1 << 20
KIB = 1 << 10


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _names(n: int, salt: bytes) -> list[str]:
    return [hashlib.blake2b(salt + i.to_bytes(8, "little"), digest_size=32).hexdigest() for i in range(n)]


def _make_dirs(root: str, names: list[str]) -> None:
    """Create the fan-out directories (untimed: the steady state of a used store)."""
    for name in names:
        os.makedirs(os.path.join(root, name[:2], name[2:4]), exist_ok=True)
    os.sync()


def _write_files(root: str, names: list[str], data: bytes) -> list[str]:
    """Durably write one file per name into root/hh/hh/name; returns the paths."""
    paths = []
    view = memoryview(data)
    for name in names:
        d = os.path.join(root, name[:2], name[2:4])
        final = os.path.join(d, name)
        tmp = final + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            v = view
            while v:
                v = v[os.write(fd, v):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        _fsync_dir(d)
        paths.append(final)
    return paths


def _read_files(paths: list[str], hash_too: bool) -> None:
    b2 = hashlib.blake2b
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        if hash_too:
            b2(data).digest()


def _stat(rates: list[float]) -> tuple[float, float]:
    rates = sorted(rates)
    med = statistics.median(rates)
    return med, (rates[-1] - rates[0]) / med if med else 0.0


def _row(name: str, rates: list[float], unit: str, size: int | None = None) -> dict[str, Any]:
    med, spread = _stat(rates)
    return {"name": name, "value": med, "unit": unit, "spread": spread, "size": size,
            "repeats": len(rates)}


def disk_rows(base_dir: str, quick: bool) -> list[dict[str, Any]]:
    """Raw durable writes and reads into a fan-out tree under `base_dir`."""
    repeats = 3 if quick else 5
    rows: list[dict[str, Any]] = []
    root = tempfile.mkdtemp(prefix="limits-", dir=base_dir)
    try:
        for size, count in ((MIB, 24 if quick else 96), (4 * KIB, 150 if quick else 600)):
            data = os.urandom(size)
            label = "1 MiB" if size == MIB else "4 KiB"
            write_rates, all_paths = [], []
            for r in range(repeats):
                names = _names(count, f"{size}-{r}-".encode())
                _make_dirs(root, names)
                t0 = time.perf_counter()
                all_paths.extend(_write_files(root, names, data))
                write_rates.append(count / (time.perf_counter() - t0))
            rows.append(_row(f"raw write+fsync {label}", write_rates, "files/s", size))
            for hash_too in (False, True):
                rates = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    _read_files(all_paths, hash_too)
                    rates.append(len(all_paths) / (time.perf_counter() - t0))
                name = f"raw read{' + blake2b' if hash_too else ''} {label}"
                rows.append(_row(name, rates, "files/s", size))
            for p in all_paths:
                os.unlink(p)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def hash_rows(quick: bool) -> list[dict[str, Any]]:
    """hashlib BLAKE2b-512 on one core, 1 MiB and 4 KiB buffers."""
    from bench._stats import measure

    rows = []
    opts = {"repeats": 3, "min_time": 0.05} if quick else {"repeats": 5, "min_time": 0.2}
    for size in (MIB, 4 * KIB):
        data = os.urandom(size)
        st = measure(lambda d=data: hashlib.blake2b(d).digest(), **opts)
        rates = [st.median_ops_per_s]  # measure() gives median+spread; keep its spread
        row = _row(f"blake2b-512 one core {'1 MiB' if size == MIB else '4 KiB'}", rates, "ops/s", size)
        row["spread"] = st.spread
        row["repeats"] = st.repeats
        rows.append(row)
    return rows


def loopback_rows(quick: bool) -> list[dict[str, Any]]:
    """Plain TCP over 127.0.0.1: one sender thread, one receiver, 1 MiB sends."""
    repeats = 3 if quick else 5
    per = 200 if quick else 1000  # MiB per repeat
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    payload = os.urandom(MIB)
    total = per * MIB * (repeats + 1)  # one warm-up round

    def sender() -> None:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sent = 0
            while sent < total:
                s.sendall(payload)
                sent += MIB
        finally:
            s.close()

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    conn, _ = lsock.accept()
    buf = bytearray(MIB)
    rates = []
    try:
        for r in range(repeats + 1):
            want = per * MIB
            t0 = time.perf_counter()
            while want:
                n = conn.recv_into(buf, min(want, MIB))
                if not n:
                    raise RuntimeError("loopback sender stopped early")
                want -= n
            if r:
                rates.append(per / (time.perf_counter() - t0))
    finally:
        conn.close()
        lsock.close()
        t.join(5)
    return [_row("loopback tcp one stream", rates, "MiB/s")]


def run(quick: bool = False, base_dir: str | None = None) -> list[dict[str, Any]]:
    """Every limit row (see module docstring); `base_dir`: where to write files."""
    base = base_dir or tempfile.gettempdir()
    rows = disk_rows(base, quick) + hash_rows(quick) + loopback_rows(quick)
    for r in rows:
        if r["unit"] in ("files/s", "ops/s") and r["size"]:
            r["mib_s"] = r["value"] * r["size"] / MIB
        elif r["unit"] == "MiB/s":
            r["mib_s"] = r["value"]
    return rows


def limits_by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The rows keyed by name."""
    return {r["name"]: r for r in rows}


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = ["| limit | median | MiB/s | spread |", "|---|---|---|---|"]
    for r in rows:
        mib = f"{r['mib_s']:,.0f}" if r.get("mib_s") is not None else ""
        lines.append(f"| {r['name']} | {r['value']:,.0f} {r['unit']} | {mib} | ±{r['spread'] * 50:.0f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry."""
    p = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dir", help="where to write the test files (default: the temp dir)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    rows = run(args.quick, args.dir)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
