"""The command line in-process: the parser, prog, output helpers (no node needed)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from blocknode.cli import build_parser, main
from blocknode.cli.base import node_config
from blocknode.cli.output import when
from blocknode.config import NodeConfig, load_cluster_file, load_config
from blocknode.errors import ConfigError


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
                                "scrub", "repair", "block", "worker", "key", "layout"}


def test_data_commands_do_not_load_the_node():
    code = "import sys, blocknode.cli; print('lmdb' in sys.modules, 'blocknode.node' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.stdout.split() == [b"False", b"False"], r.stderr


@pytest.mark.parametrize("host, addr", [("node-a.example.org", "node-a.example.org:4000"),
                                        ("10.1.2.3", "10.1.2.3:4000"), ("::1", "[::1]:4000"),
                                        ("[fd00::1]", "[fd00::1]:4000"), ("localhost", "localhost:4000")])
def test_init_cluster_writes_valid_toml_for_any_host(tmp_path, capsys, host, addr):
    """Issue 8 point 7: `--host` went into TOML through f-strings; tomli-w writes it now,
    and an IPv6 address is bracketed so that "host:port" splits right."""
    root = tmp_path / "c"
    assert main(["init-cluster", str(root), "--nodes", "2", "--host", host, "--base-port", "4000"]) == 0
    assert "blocknode serve --config" in capsys.readouterr().out
    cluster = load_cluster_file(root / "cluster.toml")
    assert cluster.nodes[0].addr == addr
    cfg = load_config(root / "node1" / "config.toml")
    assert cfg.rpc_bind_addr == addr and cfg.node_id == "node1"
    assert cfg.secret_file == str(root / "rpc_secret")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "0", "224.0.0.1", '"x', "a b", "x\ny",
                                  "user@host", "host:80", "a/b", "-a", "a..b", "", "1.2.3",
                                  "a" * 64, "é.example"])
def test_init_cluster_refuses_an_unspecified_or_unsafe_host(tmp_path, capsys, host):
    """Issue 13 part 5: 0.0.0.0 / :: (every interface, not an address to dial) and strings
    no resolver takes are refused (exit 2, one line), and nothing is written."""
    root = tmp_path / "c"
    rc = main(["init-cluster", str(root), "--nodes", "2", f"--host={host}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --host") and err.count("\n") == 1, err
    assert not root.exists()


@pytest.mark.parametrize("base_port, nodes", [(65535, 2), (70000, 1), (0, 1)])
def test_init_cluster_refuses_ports_out_of_range(tmp_path, capsys, base_port, nodes):
    root = tmp_path / "c"
    rc = main(["init-cluster", str(root), "--nodes", str(nodes), "--base-port", str(base_port)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --base-port") and "65535" in err and err.count("\n") == 1
    assert not root.exists()


def test_no_config_says_exactly_where_it_looked(tmp_path, monkeypatch, capsys):
    """D6: with no config and no ./blocknode-data, the error named a relative
    `blocknode-data/rpc_secret`, not where the CLI looked."""
    monkeypatch.delenv("BLOCKNODE_CONFIG", raising=False)
    here = tmp_path / "somewhere" / "else"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"no blocknode-data directory (the default node's) in {here} or any directory above it" in err
    assert "--config" in err and "BLOCKNODE_CONFIG" in err


def test_default_node_is_found_the_same_way_from_any_subdirectory(tmp_path, monkeypatch):
    """D6: the embedded default's paths were relative to the working directory."""
    monkeypatch.delenv("BLOCKNODE_CONFIG", raising=False)
    root = tmp_path / "blocknode-data"
    root.mkdir()
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    for where, serving in ((tmp_path, False), (deep, False), (deep, True)):
        monkeypatch.chdir(where)
        cfg = node_config(argparse.Namespace(), serving=serving)
        assert (cfg.data_dir, cfg.metadata_dir) == (str(root / "data"), str(root / "meta"))
        assert cfg.secret_file == str(root / "rpc_secret")
        assert cfg.rpc_bind_addr == NodeConfig().rpc_bind_addr
    # serve with none anywhere makes one here; other commands refuse (previous test)
    (root).rename(tmp_path / "moved")
    cfg = node_config(argparse.Namespace(), serving=True)
    assert cfg.data_dir == str(deep / "blocknode-data" / "data")
    # --config and BLOCKNODE_CONFIG come first
    monkeypatch.setenv("BLOCKNODE_CONFIG", str(tmp_path / "none.toml"))
    with pytest.raises(ConfigError, match="none.toml does not exist"):
        node_config(argparse.Namespace())


@pytest.mark.parametrize("ms", [2**63 - 1, -(2**63), 10**30, 1e300, float("nan"), "soon", [1]])
def test_human_times_are_total(ms):
    """D8: a ref timestamp of 2**63-1 made `block info` print a traceback."""
    assert isinstance(when(ms), str)


def test_an_unexpected_error_is_one_line(monkeypatch, capsys):
    def boom(args):
        raise KeyError("rc")

    monkeypatch.delenv("BLOCKNODE_DEBUG", raising=False)
    monkeypatch.setattr("blocknode.cli.data.cmd_status", boom)
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unexpected KeyError: 'rc'") and err.count("\n") == 1
