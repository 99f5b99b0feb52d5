"""Issue 13 part 4: output made for people (tables, times, sizes), `--version`, help text on
every argument, progress bars silent off a terminal."""

from __future__ import annotations

import argparse
import io
import sys
import time

import pytest

from blocknode import __version__
from blocknode.cli import build_parser, main
from blocknode.cli.output import ago, cell, duration, progress, size, table, when


def _parsers(p: argparse.ArgumentParser, path: str = "blocknode"):
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_argument_has_help_text():
    missing = []
    for path, p in _parsers(build_parser()):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"blocknode {__version__}"
    assert build_parser().prog == "blocknode"


def test_human_values():
    assert size(None) == "-" and size(1536) == "1.5 KiB" and size(0) == "0 Bytes"
    assert duration(None) == "-" and duration(3 * 3600) == "3 hours"
    assert ago(-300) == "5 minutes ago" and ago(3 * 86400) == "in 3 days" and ago(0.2) == "now"
    now_ms = int(time.time() * 1000)
    assert when(now_ms - 120_000).endswith("(2 minutes ago)")
    assert "UTC" in when(now_ms) and when(None) == "never"
    assert when(2**63 - 1).endswith("(not a calendar date)")
    assert cell(None) == "-" and cell(True) == "yes" and cell(2.0) == "2"
    lines = table(["node", "up"], [["node1", True], ["n2", None]])
    assert lines == ["NODE   UP", "node1  yes", "n2     -"]


def test_progress_is_silent_off_a_terminal(capsys):
    with progress(100, "put") as bar:
        bar.update(50)
    assert bar.disable and capsys.readouterr().err == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_draw_on_a_terminal(monkeypatch):
    from blocknode.cli.output import fraction_progress, set_progress

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with progress(4 * 1024 * 1024, "put") as bar:
        bar.update(2 * 1024 * 1024)
    with fraction_progress("scrub") as bar:
        set_progress(bar, 42.0, "10 checked, 0 corrupt")
    out = term.getvalue()
    assert "put" in out and "2.00M" in out and "50%" in out
    assert "scrub" in out and "42.0%" in out and "10 checked, 0 corrupt" in out
