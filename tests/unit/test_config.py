"""Node config and cluster file: defaults, validation errors that name the field."""

from __future__ import annotations

import os
import stat

import pytest

from blocknode.config import (
    NodeConfig,
    cluster_of,
    load_cluster_file,
    load_config,
    load_or_create_secret,
)
from blocknode.errors import ConfigError


def test_embedded_default():
    cfg = load_config(None)
    assert cfg == NodeConfig()
    assert cfg.data_fsync is True and cfg.metadata_fsync is True
    assert cfg.data_dir.startswith("blocknode-data")
    assert cfg.rpc_bind_addr.startswith("127.0.0.1:")
    cluster = cluster_of(cfg)
    assert [n.id for n in cluster.nodes] == [cfg.node_id]
    assert cluster.replication_factor == 1


def test_file_values_and_relative_paths(tmp_path):
    p = tmp_path / "node.toml"
    p.write_text('data_dir = "d"\ngc_delay = 5\nblock_size = 65536\ndata_fsync = false\n')
    cfg = load_config(p)
    assert cfg.data_dir == str(tmp_path / "d")
    assert cfg.metadata_dir == str(tmp_path / "blocknode-data" / "meta")
    assert cfg.gc_delay == 5 and cfg.block_size == 65536 and cfg.data_fsync is False


@pytest.mark.parametrize(
    "line, field",
    [
        ('gc_delay = "ten"', "gc_delay"),
        ("block_size = -1", "block_size"),
        ('rpc_bind_addr = "nope"', "rpc_bind_addr"),
        ('data_fsync = "yes"', "data_fsync"),
        ('rpc_secret = "abc"', "rpc_secret"),
        ("replication_factor = 0", "replication_factor"),
        ("gc_dealy = 3", "gc_dealy"),
        ("inline_threshold = 99999999", "inline_threshold"),
        ("rpc_max_connections = 0", "rpc_max_connections"),
        ("rpc_max_connections_per_addr = 1.5", "rpc_max_connections_per_addr"),
        ("rpc_max_handshakes = -3", "rpc_max_handshakes"),
        ("rpc_handshake_timeout = 0", "rpc_handshake_timeout"),
        ('rpc_idle_timeout = "long"', "rpc_idle_timeout"),
    ],
)
def test_bad_value_names_the_field(tmp_path, line, field):
    p = tmp_path / "node.toml"
    p.write_text(line + "\n")
    with pytest.raises(ConfigError, match=field):
        load_config(p)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    p = tmp_path / "bad.toml"
    p.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_cluster_file(tmp_path):
    p = tmp_path / "cluster.toml"
    p.write_text(
        "replication_factor = 2\n"
        '[[nodes]]\nid = "a"\naddr = "127.0.0.1:1"\nzone = "z1"\ncapacity = 2\n'
        '[[nodes]]\nid = "b"\naddr = "127.0.0.1:2"\n'
    )
    c = load_cluster_file(p)
    assert c.replication_factor == 2
    assert c.node("a").capacity == 2 and c.node("b").zone == "default"
    p.write_text('[[nodes]]\nid = "a"\naddr = "127.0.0.1:1"\ncapacity = 0\n')
    with pytest.raises(ConfigError, match="capacity"):
        load_cluster_file(p)


def test_node_not_in_cluster(tmp_path):
    c = tmp_path / "cluster.toml"
    c.write_text('[[nodes]]\nid = "a"\naddr = "127.0.0.1:1"\n')
    n = tmp_path / "node.toml"
    n.write_text('node_id = "zzz"\ncluster_file = "cluster.toml"\n')
    with pytest.raises(ConfigError, match="node_id"):
        cluster_of(load_config(n))


def test_secret_created_with_mode_0600(tmp_path):
    p = tmp_path / "node.toml"
    p.write_text('metadata_dir = "x/meta"\n')
    cfg = load_config(p)
    with pytest.raises(ConfigError, match="no cluster secret"):
        load_or_create_secret(cfg, create=False)
    s1 = load_or_create_secret(cfg, create=True)
    assert len(s1) == 32
    mode = stat.S_IMODE(os.stat(cfg.secret_file).st_mode)
    assert mode == 0o600
    assert load_or_create_secret(cfg, create=False) == s1
