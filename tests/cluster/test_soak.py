"""The soak bench's code path, CI-sized: 10 s, 8 clients, one node restart (`bench.soak`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import soak


def test_soak_runs_with_a_restart_and_reports_zero_errors(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "soak.json"
    status = soak.main(["--seconds", "10", "--clients", "8", "--restart-every", "4",
                        "--json", str(out)])
    printed = capsys.readouterr().out
    s = json.loads(out.read_text())
    assert status == 0, printed
    assert s["errors"] == 0 and s["ok"], printed
    # One restart at 4 s; a second at 8 s when the first was quick (a quiet machine): the
    # soak restarts only while one more interval still fits, which depends on the timing.
    assert 1 <= len(s["restarts"]) <= 2, s["restarts"]
    assert [r["signal"] for r in s["restarts"]] == ["SIGTERM", "SIGKILL"][:len(s["restarts"])]
    for kind in ("put", "get", "ref", "unref", "final_get"):
        assert s["kinds"][kind]["ops"] > 0, (kind, printed)
    assert all(0 < m <= s["rss_budget_mib"] for m in s["peak_rss_anon_mib"])
    assert "| put |" in printed and "peak RssAnon" in printed


def test_soak_fails_on_errors_or_memory_over_budget() -> None:
    fine = soak.Stats(budget=100, peak_anon=[50, 60, 100])
    assert fine.ok
    assert not soak.Stats(budget=100, peak_anon=[50, 101, 60]).ok
    assert not soak.Stats(budget=100, peak_anon=[1, 1, 1], errors=["client 0 get: boom"]).ok


def test_soak_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        soak.main(["--ram-buffer", "lots"])
    assert e.value.code == 2
    assert "--ram-buffer" in capsys.readouterr().err
