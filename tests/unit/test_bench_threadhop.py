"""`bench.threadhop` runs and renders its old/new table (quick, one pair, two cases)."""

from __future__ import annotations

import trio

from bench import threadhop


def test_threadhop_measures_both_sides_and_renders(tmp_path) -> None:
    rows = trio.run(threadhop._run, True, 1, str(tmp_path), "c8")
    assert [(r["case"], r["side"]) for r in rows] == [
        (case, side) for case in ("noop c8", "put 1 MiB c8") for side in threadhop.SIDES]
    assert all(r["cpu_us"] > 0 and r["wall_us"] > 0 and len(r["cpu_us_all"]) == 1 for r in rows)
    puts = [r for r in rows if r["case"] == "put 1 MiB c8"]
    assert all(r["wall_us"] > 50 for r in puts)  # a real write + fsyncs, not a no-op
    table = threadhop.render(rows, (1.0, 2.0, 3.0)).splitlines()
    assert table[0] == "load average while measuring: 1.00 2.00 3.00"
    assert [ln.split(" | ")[0] for ln in table[4:]] == ["| noop c8", "| put 1 MiB c8"]
