"""`blocknode.connect` / `blocknode.aio.connect` find the node and the key like the CLI."""

from __future__ import annotations

import asyncio
import os

import pytest

import blocknode
from blocknode.client.portal import resolve_config, resolve_key
from blocknode.config import DEFAULT_ROOT, NodeConfig
from blocknode.rpc.handshake import SECRET_SIZE, ClientKey


def test_config_given_as_object_path_env_or_nearest_default(tmp_path, monkeypatch):
    cfg = NodeConfig()
    assert resolve_config(cfg) is cfg
    path = tmp_path / "node.toml"
    path.write_text('node_id = "n7"\nrpc_bind_addr = "127.0.0.1:3999"\n')
    assert resolve_config(path).node_id == "n7"
    assert resolve_config(str(path)).node_id == "n7"
    monkeypatch.setenv("BLOCKNODE_CONFIG", str(path))
    assert resolve_config(None).node_id == "n7"
    monkeypatch.delenv("BLOCKNODE_CONFIG")
    (tmp_path / DEFAULT_ROOT).mkdir()
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    found = resolve_config(None)
    assert found.data_dir == str(tmp_path / DEFAULT_ROOT / "data")


def test_no_node_to_talk_to_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("BLOCKNODE_CONFIG", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    if any((d / DEFAULT_ROOT).is_dir() for d in empty.parents):
        pytest.skip(f"a {DEFAULT_ROOT} directory above {empty}")
    with pytest.raises(blocknode.ConfigError, match="no node to talk to"):
        blocknode.connect()
    with pytest.raises(blocknode.ConfigError, match="no node to talk to"):
        asyncio.run(blocknode.aio.connect())


def test_key_text(tmp_path):
    text = "BK" + "ab" * 12 + ":" + os.urandom(SECRET_SIZE).hex()
    key = resolve_key(text)
    assert isinstance(key, ClientKey) and str(key) == text
    assert resolve_key(None) is None and resolve_key(key) is key
    with pytest.raises(blocknode.ConfigError, match="client key"):
        resolve_key("not-a-key")


def test_unreachable_node_raises_in_the_caller(tmp_path):
    from tests.cluster.harness import free_ports

    port = free_ports(1)[0]
    path = tmp_path / "node.toml"
    path.write_text(f'node_id = "n1"\nrpc_bind_addr = "127.0.0.1:{port}"\nconnect_timeout = 0.5\n')
    key = "BK" + "ab" * 12 + ":" + os.urandom(SECRET_SIZE).hex()
    with pytest.raises(blocknode.NodeUnreachable):
        blocknode.connect(path, key=key)
    with pytest.raises(blocknode.NodeUnreachable):
        asyncio.run(blocknode.aio.connect(path, key=key))
