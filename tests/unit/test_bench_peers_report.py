"""The peer comparison's report code: medians, ratios, targets, limits, the RESULTS.md section."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.peers import report
from bench.peers.loadgen import make_payloads, parse_workload, pct

MIB, KIB = 1 << 20, 1 << 10


def _phase(c: int, size: int, op: str, ops_s: float, *, srv: float, cli: float, ops: int = 100,
           p50: float = 1.0) -> dict:
    wall = ops / ops_s
    return {"concurrency": c, "size": size, "op": op, "ops": ops, "ops_s": ops_s,
            "mib_s": ops_s * size / MIB, "p50_ms": p50, "p99_ms": p50 * 3, "errors": 0, "bad_data": 0,
            "wall_s": wall, "cpu": {"server_cpu_s": srv, "client_cpu_s": cli, "foreign_busy_cores": 0.1}}


def _doc() -> dict:
    three = [_phase(8, MIB, "put", v, srv=2.0, cli=0.1) for v in (90.0, 100.0, 300.0)]
    three += [_phase(8, 4 * KIB, "get", 3000.0, srv=0.05, cli=0.02)]
    swift = [_phase(8, MIB, "put", 50.0, srv=1.0, cli=0.2), _phase(8, 4 * KIB, "get", 2000.0, srv=0.1, cli=0.03)]
    one = [_phase(8, MIB, "put", 150.0, srv=1.0, cli=0.1), _phase(8, MIB, "get", 140.0, srv=0.5, cli=0.1)]
    limits = [{"name": "raw write+fsync 1 MiB", "value": 200.0, "unit": "files/s", "mib_s": 200.0},
              {"name": "raw read + blake2b 1 MiB", "value": 400.0, "unit": "files/s", "mib_s": 400.0}]
    return {"systems": {report.THREE: three, report.SWIFT: swift, report.ONE: one}, "limits": limits,
            "date": "d", "reps": 3}


def test_cells_take_the_median_and_cpu_per_op() -> None:
    c = report.cells(_doc()["systems"][report.THREE])
    put = c[(8, MIB, "put")]
    assert put["reps"] == 3
    assert put["ops_s"] == 100.0
    assert put["server_ms_op"] == pytest.approx(20.0)  # 2 s of server CPU over 100 ops
    assert put["client_ms_op"] == pytest.approx(1.0)


def test_comparison_ratios_and_targets() -> None:
    rows = {(r["c"], r["size"], r["op"]): r for r in report.comparison_rows(_doc())}
    put = rows[(8, MIB, "put")]
    assert put["ratio"] == pytest.approx(2.0)  # 100 / 50 ops/s
    assert put["cpu_ratio"] == pytest.approx(2.0)  # 20 / 10 ms per op
    assert rows[(8, 4 * KIB, "get")]["ratio"] == pytest.approx(1.5)
    t = {x["target"]: x for x in report.targets(_doc())}
    assert t["c8 1 MiB put: blocknode / Swift"]["met"] is True
    assert t["c8 4 KiB get: blocknode / Swift"]["met"] is False  # 1.5 < 3
    assert t["c8 1 MiB put: server CPU per op, blocknode / Swift"]["met"] is False  # 2.0 > 0.65
    assert t["1 node c8 1 MiB put / raw write+fsync 1 MiB"]["value"] == pytest.approx(0.75)
    assert t["1 node c8 1 MiB get / raw read + blake2b 1 MiB"]["met"] is False  # 0.35 < 0.7


def test_render_without_swift_shows_dashes() -> None:
    doc = _doc()
    doc["systems"].pop(report.SWIFT)
    md = report.render(doc)
    line = next(ln for ln in md.splitlines() if ln.startswith("| 8 | 1 MiB | put"))
    assert "100" in line and "– | – | – | –" in line
    assert "| 8 | 1 MiB | put | 150.0 | raw write+fsync 1 MiB | 200 | 75 % |" in md


def test_replace_section_replaces_only_the_marked_part(tmp_path: Path) -> None:
    p = tmp_path / "RESULTS.md"
    p.write_text("# Results\n\nkeep me\n")
    report.replace_section(str(p), "first table")
    report.replace_section(str(p), "second table")
    text = p.read_text()
    assert text.count(report.BEGIN) == 1 and "second table" in text and "first table" not in text
    assert text.startswith("# Results\n\nkeep me\n")


def test_workload_parsing_and_payloads() -> None:
    assert parse_workload("4096:10,1048576:2") == [(4096, 10), (MIB, 2)]
    for bad in ("4096", "x:1", "4096:0", "4096:1:2"):
        with pytest.raises(ValueError, match="workload item"):
            parse_workload(bad)
    ps = make_payloads(4096, 50, 7)
    assert len(set(ps)) == 50 and all(len(x) == 4096 for x in ps)
    assert pct([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0 and pct([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0
