"""The whole bench suite: ``python -m bench [--quick] [--json PATH]``.

1. micro: pure vs compiled fast path (`bench.fastpath`);
2. RPC crypto: AEAD, the sans-io session, loopback round trips (`bench.rpc_crypto`);
3. the machine's limits, measured now (`bench.limits`);
4. macro: real server processes, 1 node and 3 nodes (rf 3, quorum 2), compiled
   and pure, 4 KiB / 64 KiB / 1 MiB at concurrency 1 / 8 / 64 (`bench.macro`);
5. a summary: each macro figure as a fraction of its limit, the speed targets,
   compiled/pure ratios, and the OpenStack Swift comparison.

``python -m bench peers [--quick]`` is the side-by-side comparison with
OpenStack Swift (`bench.peers.run`).

``--quick`` takes about two minutes, the full run about ten. Options to shrink
the run further (``--skip``, ``--sizes``, ``--concurrency``, ``--nodes``,
``--impls``, ``--duration``) exist for the smoke test and for exploring.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import tempfile
import time
from typing import Any

from bench import macro
from bench.limits import limits_by_name

MIB = 1 << 20
KIB = 1 << 10

# OpenStack Swift on this machine: 3 object servers, 3 replicas, quorum 2, direct, concurrency 8.
SWIFT = {
    ("put", MIB): (147.0, "MiB/s", 1.5),
    ("get", MIB): (334.0, "MiB/s", 1.5),
    ("put", 4 * KIB): (344.0, "ops/s", 5.0),
    ("get", 4 * KIB): (2180.0, "ops/s", 2.0),
}
RAM_BOUND_MIB = 256.0  # default block_ram_buffer_max


def _environment() -> dict[str, Any]:
    from bench.fastpath import environment

    env = environment()
    env["date"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        env["cpu"] = None
    return env


def _cell(rows: list[dict[str, Any]], impl: str, nodes: int, size: int, conc: int) -> dict[str, Any] | None:
    for r in rows:
        if (r["impl"], r["nodes"], r["size"], r["concurrency"]) == (impl, nodes, size, conc):
            return r
    return None


def _limit_for(op: str, size: int, nodes: int, lim: dict[str, dict[str, Any]]) -> tuple[str, float] | None:
    """The matching limit (name, MiB/s) of a macro figure."""
    label = "1 MiB" if size == MIB else "4 KiB" if size == 4 * KIB else None
    if label is None:  # 64 KiB: the 1 MiB file figures are the closest limit
        label = "1 MiB"
    if op == "put":
        row = lim.get(f"raw write+fsync {label}")
        if row is None:
            return None
        if size == 64 * KIB:  # files/s of small files, MiB/s at the big-file rate
            return (f"raw write+fsync {label}", row["mib_s"] / nodes)
        return (f"raw write+fsync {label}" + (f" ÷ {nodes}" if nodes > 1 else ""), row["mib_s"] / nodes)
    row = lim.get(f"raw read + blake2b {label}")
    return (f"raw read + blake2b {label}", row["mib_s"]) if row else None


def summarise(macro_rows: list[dict[str, Any]], limit_rows: list[dict[str, Any]],
              crypto_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Fractions of limits, targets, compiled/pure ratios, Swift comparison."""
    lim = limits_by_name(limit_rows)
    fractions = []
    for r in macro_rows:
        for op in ("put", "get"):
            if op not in r:
                continue
            m = _limit_for(op, r["size"], r["nodes"], lim)
            fractions.append({
                "impl": r["impl"], "nodes": r["nodes"], "size": r["size"], "concurrency": r["concurrency"],
                "op": op, "mib_s": r[op]["mib_s"], "ops_s": r[op]["ops_s"],
                "limit": m[0] if m else None, "limit_mib_s": m[1] if m else None,
                "fraction": r[op]["mib_s"] / m[1] if m and m[1] else None,
            })

    ratios = []
    for r in macro_rows:
        if r["impl"] != "compiled":
            continue
        p = _cell(macro_rows, "pure", r["nodes"], r["size"], r["concurrency"])
        if p is None:
            continue
        for op in ("put", "get"):
            if op in r and op in p and p[op]["ops_s"]:
                ratios.append({"nodes": r["nodes"], "size": r["size"], "concurrency": r["concurrency"],
                               "op": op, "ratio": r[op]["ops_s"] / p[op]["ops_s"]})

    targets = _targets(macro_rows, lim, ratios)
    swift = []
    for (op, size), (value, unit, factor) in SWIFT.items():
        c = _cell(macro_rows, "compiled", 3, size, 8)
        if c is None or op not in c:
            continue
        ours = c[op]["mib_s"] if unit == "MiB/s" else c[op]["ops_s"]
        swift.append({"op": op, "size": size, "unit": unit, "swift": value, "blocknode": ours,
                      "ratio": ours / value, "target_ratio": factor, "met": ours / value >= factor})
    crypto = {r["name"]: r["value"] for r in crypto_rows}
    seal = crypto.get("aead aes-256-gcm seal 64KiB")
    encryption = {
        "aes_gcm_seal_mib_s": seal,
        "aes_gcm_open_mib_s": crypto.get("aead aes-256-gcm open 64KiB"),
        "seal_us_per_mib": 1e6 / seal if seal else None,
        "session_plain_mib_s": crypto.get("session 1MiB messages plaintext (in process)"),
        "session_encrypted_mib_s": crypto.get("session 1MiB messages encrypted (in process)"),
    }
    return {"fractions": fractions, "ratios": ratios, "targets": targets, "swift": swift,
            "encryption": encryption}


def _best(rows: list[dict[str, Any]], nodes: int, size: int, op: str, impl: str = "compiled") -> dict[str, Any] | None:
    cells = [r for r in rows if r["impl"] == impl and r["nodes"] == nodes and r["size"] == size and op in r]
    return max(cells, key=lambda r: r[op]["ops_s"], default=None)


def _targets(rows: list[dict[str, Any]], lim: dict[str, dict[str, Any]],
             ratios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: float, unit: str, note: str = "") -> None:
        out.append({"target": name, "value": value, "goal": goal, "unit": unit,
                    "met": value is not None and value >= goal, "note": note})

    w1 = lim.get("raw write+fsync 1 MiB", {}).get("mib_s")
    rh1 = lim.get("raw read + blake2b 1 MiB", {}).get("mib_s")
    b = _best(rows, 1, MIB, "put")
    add("1-node 1 MiB put / raw write+fsync", b["put"]["mib_s"] / w1 if b and w1 else None, 0.70, "×",
        f"best concurrency c{b['concurrency']}" if b else "")
    b = _best(rows, 1, MIB, "get")
    add("1-node 1 MiB get / raw read+hash", b["get"]["mib_s"] / rh1 if b and rh1 else None, 0.70, "×",
        f"best concurrency c{b['concurrency']}" if b else "")
    b = _best(rows, 1, 4 * KIB, "put")
    add("1-node 4 KiB durable puts/s", b["put"]["ops_s"] if b else None, 10_000, "ops/s",
        f"best concurrency c{b['concurrency']}" if b else "")
    c3 = _cell(rows, "compiled", 3, MIB, 8)
    add("3-node 1 MiB put c8 / (raw write+fsync ÷ 3)",
        c3["put"]["mib_s"] / (w1 / 3) if c3 and w1 and "put" in c3 else None, 0.60, "×")
    c1 = _cell(rows, "compiled", 1, MIB, 8)
    add("3-node 1 MiB get c8 / 1-node get c8",
        c3["get"]["mib_s"] / c1["get"]["mib_s"] if c3 and c1 and "get" in c3 and "get" in c1 else None,
        0.70, "×")
    if ratios:
        worst = min(ratios, key=lambda r: r["ratio"])
        geo = math.exp(sum(math.log(r["ratio"]) for r in ratios) / len(ratios))
        add("compiled/pure, worst cell", worst["ratio"], 1.0, "×",
            f"{worst['op']} {macro.size_label(worst['size'])} c{worst['concurrency']} {worst['nodes']}-node; "
            f"geometric mean {geo:.2f}×; cells < 0.9×: {sum(r['ratio'] < 0.9 for r in ratios)}/{len(ratios)}")
    anon = [x for r in rows if r["size"] == MIB and r["concurrency"] == 64
            for x in r.get("peak_anon_mib") or [] if x]
    if anon:
        out.append({"target": "peak anonymous RSS per node during 64 concurrent 1 MiB puts",
                    "value": max(anon), "goal": RAM_BOUND_MIB, "unit": "MiB",
                    "met": max(anon) < RAM_BOUND_MIB,
                    "note": "RssAnon polled every 20 ms: the process's own memory, interpreter "
                            "included, mapped LMDB file pages excluded"})
    rss = [x for r in rows if r["size"] == MIB and r["concurrency"] == 64 for x in r["peak_rss_mib"] if x]
    if rss:
        out.append({"target": "peak RSS per node after 64 concurrent 1 MiB puts", "value": max(rss),
                    "goal": RAM_BOUND_MIB, "unit": "MiB", "met": max(rss) < RAM_BOUND_MIB,
                    "note": "VmHWM during the cell, whole process (interpreter ≈ 45 MiB and mapped "
                            "LMDB pages included)"})
    return out


# ------------------------------------------------------------------ tables

def _spread(x: float | None) -> str:
    return "" if x is None else f" ±{x * 50:.0f}%"


def macro_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """One Markdown table of every macro cell."""
    frac = {(f["impl"], f["nodes"], f["size"], f["concurrency"], f["op"]): f["fraction"]
            for f in summary["fractions"]}
    lines = [
        "| impl | nodes | size | conc | put ops/s | put MiB/s | put p50/p99 ms | put / limit "
        "| get ops/s | get MiB/s | get p50/p99 ms | get / limit | peak RSS MiB | client CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["impl"], str(r["nodes"]), macro.size_label(r["size"]), str(r["concurrency"])]
        for op in ("put", "get"):
            f = r.get(op)
            if f is None:
                cells += ["–"] * 4
                continue
            fr = frac.get((r["impl"], r["nodes"], r["size"], r["concurrency"], op))
            err = f" ({f['errors']} err)" if f["errors"] else ""
            cells += [f"{f['ops_s']:,.0f}{_spread(f['spread'])}{err}", f"{f['mib_s']:,.1f}",
                      f"{f['p50_ms']:.2f} / {f['p99_ms']:.1f}", f"{fr:.0%}" if fr is not None else ""]
        cells.append("/".join(f"{x:.0f}" if x else "?" for x in r["peak_rss_mib"]))
        cli = [c for op in ("put", "get") if op in r for c in r[op]["client_cpu"]]
        cells.append(f"{max(cli):.0%}×{r['clients']}" if cli else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_table(summary: dict[str, Any]) -> str:
    """compiled/pure per cell."""
    lines = ["| nodes | size | conc | put compiled/pure | get compiled/pure |", "|---|---|---|---|---|"]
    seen: dict[tuple[int, int, int], dict[str, float]] = {}
    for r in summary["ratios"]:
        seen.setdefault((r["nodes"], r["size"], r["concurrency"]), {})[r["op"]] = r["ratio"]
    for (n, s, c), d in seen.items():
        lines.append(f"| {n} | {macro.size_label(s)} | {c} | "
                     f"{d.get('put', float('nan')):.2f}× | {d.get('get', float('nan')):.2f}× |")
    return "\n".join(lines)


def targets_table(summary: dict[str, Any]) -> str:
    """The speed targets, met or missed."""
    lines = ["| target | measured | goal | met | note |", "|---|---|---|---|---|"]
    for t in summary["targets"]:
        v = t["value"]
        if v is None:
            val = "–"
        elif t["unit"] == "×":
            val = f"{v:.2f}×"
        else:
            val = f"{v:,.0f} {t['unit']}"
        goal = f"{t['goal']:.2f}×" if t["unit"] == "×" else f"{t['goal']:,.0f} {t['unit']}"
        lines.append(f"| {t['target']} | {val} | {'≥' if t['unit'] != 'MiB' else '<'} {goal} | "
                     f"{'n/a' if v is None else 'yes' if t['met'] else '**no**'} | {t['note']} |")
    return "\n".join(lines)


def swift_table(summary: dict[str, Any]) -> str:
    """blocknode 3-node c8 against OpenStack Swift on this machine."""
    lines = ["| op | size | Swift | blocknode 3-node c8 | ratio | goal | met |", "|---|---|---|---|---|---|---|"]
    for s in summary["swift"]:
        lines.append(f"| {s['op']} | {macro.size_label(s['size'])} | {s['swift']:,.0f} {s['unit']} | "
                     f"{s['blocknode']:,.0f} {s['unit']} | {s['ratio']:.2f}× | ≥ {s['target_ratio']:.1f}× | "
                     f"{'yes' if s['met'] else '**no**'} |")
    return "\n".join(lines)


def crypto_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The RPC encryption figures."""
    lines = ["| measurement | value |", "|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['value']:,} {r['unit']} |")
    e = summary["encryption"]
    if e.get("seal_us_per_mib"):
        lines.append(f"| AES-256-GCM seal time per 1 MiB block | {e['seal_us_per_mib']:,.0f} µs |")
    return "\n".join(lines)


def render(doc: dict[str, Any]) -> str:
    """Every table of a finished run (the `--json` document) as Markdown."""
    from bench import fastpath, limits

    env = doc["environment"]
    summary = doc["summary"]
    parts = [f"Run {env['date']}{' (--quick)' if doc.get('quick') else ''}: Python {env['python']}, "
             f"Cython {env['cython']}, {env['cores']} cores ({env.get('cpu')}); "
             f"bench took {doc.get('elapsed_s', 0):.0f} s."]
    if doc["micro"]:
        parts.append("### Fast path: pure vs compiled (micro)\n\n" + fastpath.table(doc["micro"]))
    if doc["limits"]:
        parts.append("### Machine limits (measured in the same run)\n\n" + limits.table(doc["limits"]))
    if doc["rpc_crypto"]:
        parts.append("### RPC encryption\n\n" + crypto_table(doc["rpc_crypto"], summary))
    if doc["macro"]:
        parts.append("### Macro\n\n" + macro_table(doc["macro"], summary))
    if summary["ratios"]:
        parts.append("### compiled / pure (servers' fast path, same run)\n\n" + ratio_table(summary))
    if summary["targets"]:
        parts.append("### Targets\n\n" + targets_table(summary))
    if summary["swift"]:
        parts.append("### Against OpenStack Swift (3 object servers, 3 replicas, quorum 2, c8)\n\n"
                     + swift_table(summary))
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------ driver

def main(argv: list[str] | None = None) -> int:
    """Command-line entry (``python -m bench peers ...`` runs `bench.peers.run`)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["peers"]:
        from bench.peers.run import main as peers_main

        return peers_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="≈ 2 minutes instead of ≈ 10")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: micro,crypto,limits,macro,background")
    p.add_argument("--duration", type=float, help="seconds per put/get phase of a macro cell")
    p.add_argument("--sizes", help="macro block sizes, comma-separated bytes")
    p.add_argument("--concurrency", help="macro concurrency levels, comma-separated")
    p.add_argument("--nodes", help="macro cluster sizes, comma-separated (1 or 3)")
    p.add_argument("--impls", default="compiled,pure", help="macro server fast paths")
    p.add_argument("--dir", help="where servers and limit files write (default: the temp dir)")
    p.add_argument("--render", metavar="JSON", help="print the tables of an earlier --json run, run nothing")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(render(json.load(f)))
        return 0
    skip = set(filter(None, args.skip.split(",")))
    base = args.dir or tempfile.gettempdir()
    t_start = time.monotonic()
    out: dict[str, Any] = {"environment": _environment(), "quick": args.quick}
    env = out["environment"]
    print(f"# blocknode bench — {env['date']}\n\nPython {env['python']}, Cython {env['cython']}, "
          f"{env['cores']} cores ({env.get('cpu')}), compiled module "
          f"{'present' if env['compiled_available'] else 'MISSING'}\n", flush=True)

    out["micro"] = []
    if "micro" not in skip:
        from bench import fastpath

        print("## Fast path: pure vs compiled\n", flush=True)
        out["micro"] = fastpath.run(quick=args.quick)
        print(fastpath.table(out["micro"]) + "\n", flush=True)

    out["rpc_crypto"] = []
    if "crypto" not in skip:
        from bench import rpc_crypto

        out["rpc_crypto"] = rpc_crypto.run(quick=args.quick)

    out["limits"] = []
    if "limits" not in skip:
        from bench import limits

        print("## Machine limits (measured now)\n", flush=True)
        out["limits"] = limits.run(args.quick, base)
        print(limits.table(out["limits"]) + "\n", flush=True)

    out["macro"] = []
    if "macro" not in skip:
        print("## Macro: real server processes over loopback\n", flush=True)
        kw = macro.cell_options(args.sizes, args.concurrency, args.nodes)
        out["macro"] = macro.run(args.quick, duration=args.duration, base_dir=base,
                                 impls=tuple(args.impls.split(",")),
                                 log=lambda s: print("    " + s, flush=True), **kw)

    out["background"] = []
    if "background" not in skip:
        from bench import background

        print("## Background work: scrub speed and client latency\n", flush=True)
        out["background"] = background.run(args.quick, base_dir=base)
        print(background.render(out["background"], background.environment(), args.quick) + "\n",
              flush=True)

    summary = summarise(out["macro"], out["limits"], out["rpc_crypto"])
    out["summary"] = summary
    if out["macro"]:
        print("\n" + macro_table(out["macro"], summary) + "\n")
        if summary["ratios"]:
            print("### compiled / pure (servers' fast path)\n\n" + ratio_table(summary) + "\n")
    if out["rpc_crypto"]:
        print("### RPC encryption\n\n" + crypto_table(out["rpc_crypto"], summary) + "\n")
    if summary["targets"]:
        print("### Targets\n\n" + targets_table(summary) + "\n")
    if summary["swift"]:
        print("### Against OpenStack Swift (3 object servers, 3 replicas, quorum 2, c8)\n\n"
              + swift_table(summary) + "\n")
    out["elapsed_s"] = time.monotonic() - t_start
    print(f"(bench took {out['elapsed_s']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
