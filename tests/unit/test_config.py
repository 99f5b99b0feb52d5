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


def test_one_default_replication_factor(tmp_path):
    from blocknode.cluster_config import DEFAULT_REPLICATION_FACTOR, ClusterConfig, ClusterNode

    assert DEFAULT_REPLICATION_FACTOR == 1
    assert NodeConfig().replication_factor == DEFAULT_REPLICATION_FACTOR
    assert ClusterConfig(nodes=(ClusterNode("a", "127.0.0.1:1"),)).replication_factor == 1
    p = tmp_path / "cluster.toml"
    p.write_text('[[nodes]]\nid = "a"\naddr = "127.0.0.1:1"\n')
    assert load_cluster_file(p).replication_factor == DEFAULT_REPLICATION_FACTOR
    assert load_cluster_file(p, default_rf=2).replication_factor == 2  # the node config's value


SECRET = "0123456789abcdef" * 4


@pytest.mark.parametrize("value", [
    SECRET[:-1],                        # one character short
    SECRET + "0",                       # one too many
    SECRET[:-2] + "zz",                 # not hex
    SECRET[:20] + " " + SECRET[21:],    # a stray space
], ids=["short", "long", "not-hex", "space"])
def test_a_bad_secret_is_never_echoed(tmp_path, value):
    """D7: `field 'rpc_secret': expected ..., got '<the secret>'`."""
    p = tmp_path / "node.toml"
    p.write_text(f'rpc_secret = "{value}"\n')
    with pytest.raises(ConfigError, match="rpc_secret") as e:
        load_config(p)
    msg = str(e.value)
    assert not any(value[i:i + 8] in msg for i in range(len(value) - 7)), msg


def test_a_secret_in_the_wrong_place_is_never_echoed(tmp_path):
    p = tmp_path / "node.toml"
    p.write_text(f'rpc_secret = {int(SECRET[:15], 16)}\n')  # a number
    with pytest.raises(ConfigError, match="type int") as e:
        load_config(p)
    assert str(int(SECRET[:15], 16)) not in str(e.value)
    p.write_text(f'rpc_secret_file = "{SECRET}"\n')  # the value where its path belongs
    with pytest.raises(ConfigError, match="looks like the secret") as e:
        load_config(p)
    assert SECRET[:8] not in str(e.value)
    assert SECRET[:8] not in repr(load_config(None).__class__(rpc_secret=SECRET))


def test_a_bad_secret_file_is_never_echoed(tmp_path):
    f = tmp_path / "secret"
    cfg = NodeConfig(rpc_secret_file=str(f))
    for content in (SECRET[:-1].encode(), SECRET.encode()[:-2] + b"\xc3\xa9", SECRET[:-2].encode() + b"zz"):
        f.write_bytes(content + b"\n")
        f.chmod(0o600)
        with pytest.raises(ConfigError, match="expected 64 hex characters") as e:
            load_or_create_secret(cfg, create=False)
        msg = str(e.value)
        assert SECRET[:8] not in msg and "c3" not in msg and "zz" not in msg, msg


def test_a_secret_file_others_may_access_is_refused(tmp_path):
    """Issue 10 part 3 (a cluster test runs `serve` and `status` against one)."""
    from blocknode.config import check_private_file

    f = tmp_path / "secret"
    f.write_text(SECRET + "\n")
    cfg = NodeConfig(rpc_secret_file=str(f))
    for mode in (0o600, 0o400):
        f.chmod(mode)
        assert load_or_create_secret(cfg, create=False) == bytes.fromhex(SECRET)
    for mode, who in ((0o640, "its group"), (0o604, "other users"), (0o666, "its group and other users")):
        f.chmod(mode)
        with pytest.raises(ConfigError, match=f"accessible to {who} .mode {mode:04o}, expected 0600.") as e:
            load_or_create_secret(cfg, create=False)
        assert "chmod 600" in str(e.value) and SECRET[:8] not in str(e.value)
        with pytest.raises(ConfigError):
            check_private_file(f, "key file")
        check_private_file(f, "key file", allow_world_readable=True)
        allowed = NodeConfig(rpc_secret_file=str(f), allow_world_readable_secrets=True)
        assert load_or_create_secret(allowed, create=False) == bytes.fromhex(SECRET)


def test_storage_creates_private_files_whatever_the_umask(tmp_path):
    """Issue 10 part 3: block files, fan-out directories and LMDB files are 0600/0700
    even in a process whose umask lets others read (serve sets 077 besides)."""
    from blocknode.block import hashed
    from blocknode.storage import BlockFiles, MetadataStore

    old = os.umask(0o022)
    try:
        files = BlockFiles(str(tmp_path / "data"), fsync=False)
        files.write(hashed(os.urandom(100)))
        meta = MetadataStore(str(tmp_path / "meta"), map_size=1 << 22, sync=False)
        meta.close()
    finally:
        os.umask(old)
    for root, _, names in os.walk(tmp_path):
        if root != str(tmp_path):
            assert stat.S_IMODE(os.stat(root).st_mode) == 0o700, root
        for n in names:
            assert stat.S_IMODE(os.stat(os.path.join(root, n)).st_mode) == 0o600, n


def test_bootstrap_peers_accepted_as_addresses(tmp_path):
    p = tmp_path / "n.toml"
    p.write_text('node_id = "n4"\nbootstrap_peers = ["10.0.0.1:3901", "[::1]:3902"]\n')
    cfg = load_config(p)
    assert cfg.bootstrap_peers == ("10.0.0.1:3901", "[::1]:3902")
    assert load_config(None).bootstrap_peers == ()


@pytest.mark.parametrize("value, message", [
    ('"10.0.0.1:3901"', "field 'bootstrap_peers': expected an array of addresses"),
    ('["10.0.0.1:3901", "nohost"]', "field 'bootstrap_peers', entry 1: expected an address "
                                    "\"host:port\", got 'nohost'"),
    ('["10.0.0.1:99999"]', "entry 0: expected an address"),
    ("[3901]", "entry 0: expected an address \"host:port\", got 3901"),
    ('["a:1", "a:1"]', "field 'bootstrap_peers': 'a:1' is listed twice"),
])
def test_bad_bootstrap_peers_name_the_field_and_entry(tmp_path, value, message):
    p = tmp_path / "n.toml"
    p.write_text(f'node_id = "n4"\nbootstrap_peers = {value}\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and message in str(e.value)
