"""The error vocabulary: one base class, protocol errors split by blame."""

from __future__ import annotations

import inspect

import pytest

from blocknode import errors
from blocknode.cluster_config import ClusterConfig, ClusterNode
from blocknode.errors import (
    AuthenticationError,
    BlocknodeError,
    CliError,
    ConfigError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StreamTruncated,
    UnknownNode,
)
from blocknode.layout import Layout
from blocknode.rpc.errors import error_reply


def test_every_error_class_is_a_blocknode_error() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, BaseException) and c.__module__ == errors.__name__]
    assert CliError in classes and UnknownNode in classes
    for cls in classes:
        assert issubclass(cls, BlocknodeError), cls
    assert set(errors.__all__) == {c.__name__ for c in classes} | {"single_error"}


def test_protocol_errors_split_by_blame_under_one_base() -> None:
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert issubclass(AuthenticationError, RemoteProtocolError)  # the peer failed to prove itself
    assert issubclass(StreamTruncated, RemoteProtocolError)


def test_both_blames_are_bad_request_on_the_wire() -> None:
    assert error_reply(RemoteProtocolError("x"))["code"] == "bad_request"
    assert error_reply(LocalProtocolError("x"))["code"] == "bad_request"


def test_unknown_node_is_a_config_error_and_a_key_error() -> None:
    cluster = ClusterConfig(nodes=(ClusterNode("a", "127.0.0.1:1"),), replication_factor=1)
    with pytest.raises(UnknownNode) as info:
        cluster.node("zz")
    exc = info.value
    assert isinstance(exc, ConfigError) and isinstance(exc, KeyError)
    assert exc.node_id == "zz" and str(exc) == "no node 'zz' in the cluster"
    with pytest.raises(UnknownNode, match="no node 'zz'"):
        Layout(cluster).node("zz")


def test_cli_error_carries_its_exit_status() -> None:
    assert CliError("boom").status == 1
    assert CliError("usage", 2).status == 2
    from blocknode import cli

    assert cli.CliError is CliError
    assert cli.fail("x", cli.EXIT_USAGE).status == cli.EXIT_USAGE
