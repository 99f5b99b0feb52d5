"""Tables of the peer comparison: medians per cell, ratios, targets, the RESULTS.md section.

Input is the document `bench.peers.run` builds: ``{"systems": {name: [phase, ...]},
"limits": [limit rows], ...}`` where a phase is what `bench.peers.loadgen` reports.
Everything here is pure computation on that document (no processes, no I/O except
`replace_section`, which rewrites one marked section of a Markdown file).
"""

from __future__ import annotations

import os
import statistics
from typing import Any

MIB = 1 << 20
KIB = 1 << 10
BEGIN = "<!-- bench peers: begin (python -m bench peers rewrites this section) -->"
END = "<!-- bench peers: end -->"
THREE, ONE, SWIFT = "blocknode-3", "blocknode-1", "swift-direct"

# (c, size, op) -> blocknode / Swift throughput goal (issue 15)
THROUGHPUT_GOALS = {(8, MIB, "put"): 1.5, (8, MIB, "get"): 1.5, (8, 4 * KIB, "put"): 5.0,
                    (8, 4 * KIB, "get"): 3.0, (1, MIB, "put"): 1.2, (1, MIB, "get"): 1.2,
                    (1, 4 * KIB, "put"): 1.2, (1, 4 * KIB, "get"): 1.2}


def size_label(size: int) -> str:
    """'4 KiB', '1 MiB', '100 B'."""
    if size >= MIB and size % MIB == 0:
        return f"{size // MIB} MiB"
    return f"{size // KIB} KiB" if size % KIB == 0 else f"{size} B"


def cells(phases: list[dict[str, Any]]) -> dict[tuple[int, int, str], dict[str, Any]]:
    """Median over reps per (concurrency, size, op): ops/s, MiB/s, p50/p99 ms, server and
    client CPU ms per op, errors, the worst foreign load seen."""
    groups: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for ph in phases:
        groups.setdefault((ph["concurrency"], ph["size"], ph["op"]), []).append(ph)
    out = {}
    for key, rs in groups.items():
        def med(f: Any, rs: list[dict[str, Any]] = rs) -> float | None:
            vals = [v for v in (f(r) for r in rs) if v is not None]
            return statistics.median(vals) if vals else None

        out[key] = {
            "reps": len(rs),
            "ops_s": med(lambda r: r["ops_s"]), "mib_s": med(lambda r: r["mib_s"]),
            "p50_ms": med(lambda r: r["p50_ms"]), "p99_ms": med(lambda r: r["p99_ms"]),
            "server_ms_op": med(lambda r: 1e3 * r["cpu"]["server_cpu_s"] / r["ops"]
                                if r["ops"] and r["cpu"].get("server_cpu_s") is not None else None),
            "client_ms_op": med(lambda r: 1e3 * r["cpu"]["client_cpu_s"] / r["ops"] if r["ops"] else None),
            "errors": sum(r["errors"] + r["bad_data"] for r in rs),
            "foreign_cores": max((r["cpu"]["foreign_busy_cores"] for r in rs
                                  if r["cpu"].get("foreign_busy_cores") is not None), default=None),
        }
    return out


def _f(x: float | None, fmt: str = ",.0f") -> str:
    return "–" if x is None else format(x, fmt)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def limit_for(op: str, size: int, limits: dict[str, dict[str, Any]]) -> tuple[str, float] | None:
    """The machine limit one node's (op, size) cell is compared with: (name, MiB/s)."""
    label = size_label(size)
    name = f"raw write+fsync {label}" if op == "put" else f"raw read + blake2b {label}"
    row = limits.get(name)
    return (name, row["mib_s"]) if row and row.get("mib_s") else None


def comparison_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (c, size, op): blocknode 3 nodes, Swift direct, ratios, goal."""
    bn = cells(doc["systems"].get(THREE, []))
    sw = cells(doc["systems"].get(SWIFT, []))
    rows = []
    for key in sorted(set(bn) | set(sw), key=lambda k: (-k[0], k[1], k[2] != "put")):
        b, s = bn.get(key), sw.get(key)
        rows.append({"c": key[0], "size": key[1], "op": key[2], "blocknode": b, "swift": s,
                     "ratio": _ratio(b and b["ops_s"], s and s["ops_s"]),
                     "cpu_ratio": _ratio(b and b["server_ms_op"], s and s["server_ms_op"]),
                     "goal": THROUGHPUT_GOALS.get(key)})
    return rows


def limit_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One node's cells as fractions of the machine limits of the same run."""
    lim = {r["name"]: r for r in doc.get("limits", [])}
    out = []
    for (c, size, op), cell in sorted(cells(doc["systems"].get(ONE, [])).items(),
                                      key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2] != "put")):
        m = limit_for(op, size, lim)
        out.append({"c": c, "size": size, "op": op, "mib_s": cell["mib_s"],
                    "limit": m[0] if m else None, "limit_mib_s": m[1] if m else None,
                    "fraction": _ratio(cell["mib_s"], m[1] if m else None)})
    return out


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 15's targets: (name, measured, goal, met)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: float, higher: bool = True) -> None:
        met = None if value is None else (value >= goal if higher else value <= goal)
        out.append({"target": name, "value": value, "goal": goal, "higher": higher, "met": met})

    for r in comparison_rows(doc):
        if r["goal"] is not None:
            add(f"c{r['c']} {size_label(r['size'])} {r['op']}: blocknode / Swift", r["ratio"], r["goal"])
    for r in comparison_rows(doc):
        if (r["c"], r["size"], r["op"]) == (8, MIB, "put"):
            add("c8 1 MiB put: server CPU per op, blocknode / Swift", r["cpu_ratio"], 0.65, higher=False)
        if (r["c"], r["size"], r["op"]) == (8, MIB, "get") and r["blocknode"]:
            add("c8 1 MiB get: client CPU ms per op", r["blocknode"]["client_ms_op"], 1.2, higher=False)
    for r in limit_rows(doc):
        if r["c"] == 8 and r["size"] == MIB:
            add(f"1 node c8 1 MiB {r['op']} / {r['limit']}", r["fraction"], 0.9 if r["op"] == "put" else 0.7)
    return out


def render(doc: dict[str, Any]) -> str:
    """The whole section as Markdown."""
    parts = [f"Run {doc.get('date', '?')}{' (--quick)' if doc.get('quick') else ''}, "
             f"{doc.get('elapsed_s', 0):.0f} s; load average before/after "
             f"{doc.get('loadavg_before')} / {doc.get('loadavg_after')}; "
             f"blocknode fast path {doc.get('fastpath', '?')}; Swift: {doc.get('swift_status', '?')}.",
             "Same load generator (`bench/peers/loadgen.py`) for both; 3 nodes or 3 object servers "
             "on 127.0.0.1, replication 3, write quorum 2; medians of "
             f"{doc.get('reps', '?')} rep(s); CPU = ms per op of the server process groups (srv) and "
             "the load generator (cli); \"other\" = the busiest foreign load (cores) seen in a phase."]
    lines = ["| c | size | op | blocknode ops/s | MiB/s | p50 / p99 ms | srv / cli ms/op "
             "| Swift ops/s | MiB/s | p50 / p99 ms | srv / cli ms/op | ratio | goal | srv CPU ratio | other |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in comparison_rows(doc):
        row = [str(r["c"]), size_label(r["size"]), r["op"]]
        for cell in (r["blocknode"], r["swift"]):
            if cell is None:
                row += ["–"] * 4
                continue
            err = f" ({cell['errors']} err)" if cell["errors"] else ""
            row += [_f(cell["ops_s"]) + err, _f(cell["mib_s"], ",.1f"),
                    f"{_f(cell['p50_ms'], '.2f')} / {_f(cell['p99_ms'], '.1f')}",
                    f"{_f(cell['server_ms_op'], '.2f')} / {_f(cell['client_ms_op'], '.2f')}"]
        fo = [c["foreign_cores"] for c in (r["blocknode"], r["swift"]) if c and c["foreign_cores"] is not None]
        met = "" if r["goal"] is None or r["ratio"] is None else (" ✓" if r["ratio"] >= r["goal"] else " ✗")
        row += [(_f(r["ratio"], ".2f") + "×" if r["ratio"] is not None else "–") + met,
                f"≥ {r['goal']:.1f}×" if r["goal"] else "",
                _f(r["cpu_ratio"], ".2f") + "×" if r["cpu_ratio"] is not None else "–",
                _f(max(fo), ".2f") if fo else "–"]
        lines.append("| " + " | ".join(row) + " |")
    parts.append("\n".join(lines))
    lr = limit_rows(doc)
    if lr:
        lines = ["| one node: c | size | op | MiB/s | limit (same run) | limit MiB/s | fraction |",
                 "|---|---|---|--:|---|--:|--:|"]
        for r in lr:
            lines.append(f"| {r['c']} | {size_label(r['size'])} | {r['op']} | {_f(r['mib_s'], ',.1f')} | "
                         f"{r['limit'] or '–'} | {_f(r['limit_mib_s'], ',.0f')} | "
                         f"{_f(r['fraction'] and 100 * r['fraction'], '.0f')} % |")
        parts.append("\n".join(lines))
    if doc.get("limits"):
        lines = ["| limit | median | MiB/s |", "|---|--:|--:|"]
        for r in doc["limits"]:
            lines.append(f"| {r['name']} | {r['value']:,.0f} {r['unit']} | {_f(r.get('mib_s'))} |")
        parts.append("\n".join(lines))
    ts = targets(doc)
    if ts:
        lines = ["| target | measured | goal | met |", "|---|--:|--:|---|"]
        for t in ts:
            lines.append(f"| {t['target']} | {_f(t['value'], '.2f')} | {'≥' if t['higher'] else '≤'} "
                         f"{t['goal']:.2f} | {'n/a' if t['met'] is None else 'yes' if t['met'] else '**no**'} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def replace_section(path: str, body: str, heading: str = "## Against OpenStack Swift, side by side "
                    "(`python -m bench peers`)") -> None:
    """Put `body` between the markers in `path` (replacing what was there, or appending a
    new section with `heading`); written to a temporary file, fsynced and renamed."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        start, end = text.index(BEGIN), text.index(END) + len(END)
        text = text[:start] + block + text[end:]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
