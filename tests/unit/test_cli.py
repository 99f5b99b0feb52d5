"""The command line in-process: the parser, prog, output helpers (no node needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from blocknode.cli import build_parser, main
from blocknode.config import load_cluster_file, load_config


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


def test_init_cluster_writes_valid_toml_for_any_host(tmp_path, capsys):
    """Issue 8 point 7: `--host '"x'` wrote invalid TOML (f-strings); tomli-w quotes it."""
    root = tmp_path / "c"
    assert main(["init-cluster", str(root), "--nodes", "2", "--host", '"x', "--base-port", "4000"]) == 0
    assert "blocknode serve --config" in capsys.readouterr().out
    cluster = load_cluster_file(root / "cluster.toml")
    assert [n.addr for n in cluster.nodes] == ['"x:4000', '"x:4001']
    cfg = load_config(root / "node2" / "config.toml")
    assert cfg.rpc_bind_addr == '"x:4001' and cfg.node_id == "node2"
    assert cfg.secret_file == str(root / "rpc_secret")


@pytest.mark.parametrize("base_port, nodes", [(65535, 2), (70000, 1), (0, 1)])
def test_init_cluster_refuses_ports_out_of_range(tmp_path, capsys, base_port, nodes):
    root = tmp_path / "c"
    rc = main(["init-cluster", str(root), "--nodes", str(nodes), "--base-port", str(base_port)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --base-port") and "65535" in err and err.count("\n") == 1
    assert not root.exists()
