"""Micro-benchmark of the fast path: pure twin vs compiled module, hashlib as the limit.

    python -m bench.fastpath [--quick] [--json PATH]

Prints a Markdown table: for each function, calls/s of the pure and the compiled
implementation (median of several repeats, ± half their spread), the ratio
compiled/pure, and for the hash rows raw ``hashlib.blake2b(d).digest()`` (called
from a Python function, like the pure twin) plus MiB/s. A last row times two
threads hashing 1 MiB blocks at once, which only scales if the GIL is released.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from bench._stats import Stat, fmt_rate, fmt_spread, measure
from blocknode import _purepath as pure

try:
    from blocknode import _fastpath as compiled
except ImportError:  # not built: the compiled column stays empty
    compiled = None  # type: ignore[assignment]

SIZES = (64, 4096, 1 << 20)
MIB = float(1 << 20)
_blake2b = hashlib.blake2b


def _hashlib_digest(data: bytes) -> bytes:
    return _blake2b(data).digest()


def _cases() -> list[
    tuple[str, int | None, Callable[[ModuleType], tuple[Callable[..., Any], tuple[Any, ...]]]]
]:
    """(function, size or None, impl -> (fn, args)) for every row."""
    h = pure.block_hash(b"blocknode")
    hx = h.hex()
    rc8 = pure.rc_encode(pure.RC_PRESENT, 3)
    qk = pure.queue_key_encode(1_700_000_000_000, h)
    cases: list[Any] = []
    for size in SIZES:
        data = os.urandom(size)
        digest = pure.block_hash(data)
        cases.append(("block_hash", size, lambda m, d=data: (m.block_hash, (d,))))
        cases.append(("verify", size, lambda m, d=data, g=digest: (m.verify, (d, g))))
    cases += [
        ("hash_to_hex", None, lambda m: (m.hash_to_hex, (h,))),
        ("hex_to_hash", None, lambda m: (m.hex_to_hash, (hx,))),
        ("block_dir", None, lambda m: (m.block_dir, ("/var/lib/blocknode/data", h))),
        ("block_path", None, lambda m: (m.block_path, ("/var/lib/blocknode/data", h))),
        ("rc_encode", None, lambda m: (m.rc_encode, (m.RC_PRESENT, 3))),
        ("rc_decode", None, lambda m: (m.rc_decode, (rc8,))),
        ("queue_key_encode", None, lambda m: (m.queue_key_encode, (1_700_000_000_000, h))),
        ("queue_key_decode", None, lambda m: (m.queue_key_decode, (qk,))),
    ]
    return cases


def _two_threads(fn: Callable[[bytes], Any], data: bytes, per_thread: int) -> Callable[[], None]:
    def work() -> None:
        for _ in range(per_thread):
            fn(data)

    def both() -> None:
        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    return both


def _stat_fields(prefix: str, stat: Stat | None, size: int | None) -> dict[str, Any]:
    if stat is None:
        return {f"{prefix}_ops_s": None, f"{prefix}_spread": None, f"{prefix}_mib_s": None}
    return {
        f"{prefix}_ops_s": stat.median_ops_per_s,
        f"{prefix}_spread": stat.spread,
        f"{prefix}_mib_s": stat.median_ops_per_s * size / MIB if size else None,
    }


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Measure every row; returns one dict per row (the figures `--json` writes).

    Keys: function, size (bytes or None), {pure,compiled,hashlib}_{ops_s,spread,mib_s},
    ratio (compiled/pure), vs_hashlib (compiled/hashlib). Missing figures are None.
    """
    opts = {"repeats": 3, "min_time": 0.05} if quick else {"repeats": 7, "min_time": 0.2}
    rows: list[dict[str, Any]] = []
    for name, size, make in _cases():
        p = measure(*_flat(make(pure)), **opts)
        c = measure(*_flat(make(compiled)), **opts) if compiled is not None else None
        raw = None
        if name == "block_hash":
            raw = measure(_hashlib_digest, make(pure)[1][0], **opts)
        rows.append(_row(name, size, p, c, raw))
    # Two threads at once on 1 MiB blocks: scales only if the GIL is released.
    data = os.urandom(1 << 20)
    per = 2 if quick else 8
    threaded = {
        key: measure(_two_threads(fn, data, per), **opts).scaled(2 * per)
        for key, fn in (
            ("pure", pure.block_hash),
            ("compiled", getattr(compiled, "block_hash", None)),
            ("hashlib", _hashlib_digest),
        )
        if fn is not None
    }
    rows.append(
        _row(
            "block_hash, 2 threads",
            1 << 20,
            threaded["pure"],
            threaded.get("compiled"),
            threaded["hashlib"],
        )
    )
    return rows


def _flat(pair: tuple[Callable[..., Any], tuple[Any, ...]]) -> tuple[Any, ...]:
    fn, args = pair
    return (fn, *args)


def _row(name: str, size: int | None, p: Stat, c: Stat | None, raw: Stat | None) -> dict[str, Any]:
    row: dict[str, Any] = {"function": name, "size": size}
    row |= _stat_fields("pure", p, size)
    row |= _stat_fields("compiled", c, size)
    row |= _stat_fields("hashlib", raw, size)
    row["ratio"] = c.median_ops_per_s / p.median_ops_per_s if c else None
    row["vs_hashlib"] = c.median_ops_per_s / raw.median_ops_per_s if c and raw else None
    return row


def _size(size: int | None) -> str:
    if size is None:
        return ""
    return (
        f"{size >> 20} MiB"
        if size >= 1 << 20
        else f"{size >> 10} KiB"
        if size >= 1024
        else f"{size} B"
    )


def _cell(row: dict[str, Any], prefix: str) -> str:
    ops, spread, mib = row[f"{prefix}_ops_s"], row[f"{prefix}_spread"], row[f"{prefix}_mib_s"]
    if ops is None:
        return "–"
    text = f"{fmt_rate(ops)}/s {fmt_spread(Stat(ops, spread, 0, 0))}"
    return f"{text} ({mib:,.0f} MiB/s)" if mib is not None else text


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| function | size | pure | compiled | compiled/pure | hashlib.blake2b (limit) | compiled/hashlib |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}×" if r["ratio"] else "–"
        vs = f"{r['vs_hashlib']:.2f}×" if r["vs_hashlib"] else ""
        raw = _cell(r, "hashlib") if r["hashlib_ops_s"] is not None else ""
        lines.append(
            f"| {r['function']} | {_size(r['size'])} | {_cell(r, 'pure')} | {_cell(r, 'compiled')} "
            f"| {ratio} | {raw} | {vs} |"
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Versions and machine facts to print next to the figures."""
    try:
        import Cython

        cython_version = Cython.__version__
    except ImportError:
        cython_version = None
    return {
        "python": platform.python_version(),
        "cython": cython_version,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "compiled_available": compiled is not None,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: print the table; ``--json PATH`` also writes the figures."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.fastpath", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    env = environment()
    print(
        f"Python {env['python']}, Cython {env['cython']}, {env['cores']} cores, "
        f"compiled module {'present' if env['compiled_available'] else 'MISSING'}\n",
        flush=True,
    )
    rows = run(quick=args.quick)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
