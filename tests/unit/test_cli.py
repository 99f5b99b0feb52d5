"""The command line in-process: the parser, prog, output helpers (no node needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from blocknode.cli import build_parser, main


def test_prog_is_blocknode_for_the_installed_script(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: blocknode ")


def test_prog_is_python_m_blocknode_under_dash_m():
    r = subprocess.run([sys.executable, "-m", "blocknode", "--help"], capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(b"usage: python -m blocknode ")


def test_every_command_of_the_contract_is_there():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"serve", "put", "get", "ref", "unref", "status", "init-cluster",
                                "scrub", "repair", "block", "worker"}


def test_data_commands_do_not_load_the_node():
    code = "import sys, blocknode.cli; print('lmdb' in sys.modules, 'blocknode.node' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.stdout.split() == [b"False", b"False"], r.stderr
