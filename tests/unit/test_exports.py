"""The public surface of `blocknode` is pinned: a change here is an API change."""

import blocknode


def test_public_names_are_pinned():
    assert sorted(blocknode.__all__) == sorted([
        "AuthenticationError", "BlockCorrupted", "BlockNotFound", "BlocknodeError", "Client",
        "ClientClosed", "ClientForked", "ConfigError", "Forbidden", "HashMismatch", "InvalidHash", "LocalProtocolError", "MetadataFull",
        "NodeConfig", "NodeUnreachable", "ProtocolError", "QuorumError", "RemoteError",
        "RemoteProtocolError", "RpcError",
        "RpcTimeout", "StoreError", "SyncClient", "__version__", "aio", "connect", "load_config",
        "open_client",
    ])
    for name in blocknode.__all__:
        assert hasattr(blocknode, name), name
    assert sorted(blocknode.aio.__all__) == ["Client", "connect"]


def test_errors_share_one_base():
    for name in blocknode.__all__:
        obj = getattr(blocknode, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, blocknode.BlocknodeError), name


def test_single_error_reports_the_first_leaf_or_an_interrupt():
    from blocknode.errors import QuorumError, single_error

    a, b = QuorumError("put a", 2, 0, {"n2": "down"}), QuorumError("put b", 2, 0, {"n2": "down"})
    assert single_error(ExceptionGroup("g", [a])) is a
    assert single_error(ExceptionGroup("g", [ExceptionGroup("h", [a, b])])) is a
    stop = KeyboardInterrupt()
    assert single_error(BaseExceptionGroup("g", [a, stop])) is stop
