"""The permission check and where a client finds its key (issue 10 part 1), without a node."""

from __future__ import annotations

import os
import stat

import pytest

from blocknode.auth import (
    ADMIN,
    KEY_ENV,
    NODE_ONLY,
    READ,
    WRITE,
    authorize,
    load_client_key,
    read_key_file,
    required_permission,
    write_key_file,
)
from blocknode.config import NodeConfig, load_config
from blocknode.errors import ConfigError, Forbidden
from blocknode.protocol import ADMIN_KINDS, ALL_KINDS, CLIENT_KINDS, REPLICA_KINDS
from blocknode.rpc.handshake import ClientKey, Peer

EVERY = frozenset({READ, WRITE, ADMIN})


def test_every_kind_has_exactly_one_rule() -> None:
    assert {k: required_permission(k) for k in CLIENT_KINDS} == {
        "client_get": READ, "client_put": WRITE, "client_put_many": WRITE, "client_ref": WRITE,
        "status": "", "client_layout": "", "client_get_direct": READ,
        "client_put_direct": WRITE}
    assert all(required_permission(k) == ADMIN for k in ADMIN_KINDS)
    assert all(required_permission(k) == NODE_ONLY for k in REPLICA_KINDS)
    assert required_permission("no_such_kind") == NODE_ONLY


@pytest.mark.parametrize("kind", sorted(ALL_KINDS | {"no_such_kind"}))
def test_nodes_may_do_everything_clients_only_what_their_key_allows(kind: str) -> None:
    authorize(Peer.node("n1"), kind, lambda key_id: None)
    needed = required_permission(kind)
    client = Peer.client("BK" + "0" * 24)
    if needed == NODE_ONLY:
        with pytest.raises(Forbidden, match="node-internal") as info:
            authorize(client, kind, lambda key_id: EVERY)
        assert info.value.permission == NODE_ONLY
        return
    authorize(client, kind, lambda key_id: frozenset({needed}) if needed else frozenset({READ}))
    for perms in (EVERY - {needed}, frozenset()):
        if needed:
            with pytest.raises(Forbidden, match=f"lacks the '{needed}' permission") as info:
                authorize(client, kind, lambda key_id, perms=perms: perms)
            assert info.value.permission == needed
    with pytest.raises(Forbidden, match="revoked"):
        authorize(client, kind, lambda key_id: None)


def test_a_client_finds_its_key_env_first_then_its_file_then_the_nodes(tmp_path) -> None:
    env_key, file_key, admin_key = ClientKey.generate(), ClientKey.generate(), ClientKey.generate()
    assert write_key_file(tmp_path / "app.key", file_key)
    assert write_key_file(tmp_path / "admin_key", admin_key)
    assert stat.S_IMODE(os.stat(tmp_path / "app.key").st_mode) == 0o600
    assert not write_key_file(tmp_path / "app.key", env_key)  # never over an existing file
    assert read_key_file(tmp_path / "app.key") == file_key
    (tmp_path / "c.toml").write_text('client_key_file = "app.key"\nadmin_key_file = "admin_key"\n')
    cfg = load_config(tmp_path / "c.toml")
    assert load_client_key(cfg, {KEY_ENV: str(env_key)}) == env_key
    assert load_client_key(cfg, {}) == file_key
    node = NodeConfig(admin_key_file=str(tmp_path / "admin_key"))
    assert load_client_key(node, {}) == admin_key
    with pytest.raises(ConfigError, match="no client key: set BLOCKNODE_KEY"):
        load_client_key(NodeConfig(metadata_dir=str(tmp_path / "x" / "meta")), {})


def test_a_bad_key_is_named_never_shown(tmp_path) -> None:
    secret = "ab" * 31 + "zz"
    with pytest.raises(ConfigError, match=KEY_ENV) as info:
        load_client_key(NodeConfig(), {KEY_ENV: f"BK{'0' * 24}:{secret}"})
    assert secret[:20] not in str(info.value)
    (tmp_path / "k").write_text(f"BK{'0' * 24}:{secret}\n")
    (tmp_path / "k").chmod(0o600)
    with pytest.raises(ConfigError, match="client key file .*/k: the secret") as info:
        read_key_file(tmp_path / "k")
    assert secret[:20] not in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        read_key_file(tmp_path / "missing")
    key = ClientKey.generate()
    (tmp_path / "c.toml").write_text(f'client_key_file = "{key}"\n')
    with pytest.raises(ConfigError, match="looks like a key itself") as info:
        load_config(tmp_path / "c.toml")
    assert key.secret.hex() not in str(info.value)


def test_a_key_file_other_users_can_read_is_refused(tmp_path) -> None:
    """Issue 10 part 3: a key file is a secret; group/other bits are refused unless the
    config says `allow_world_readable_secrets`."""
    key = ClientKey.generate()
    assert write_key_file(tmp_path / "app.key", key)
    (tmp_path / "c.toml").write_text('client_key_file = "app.key"\n')
    cfg = load_config(tmp_path / "c.toml")
    (tmp_path / "app.key").chmod(0o640)
    with pytest.raises(ConfigError, match=r"app.key is accessible to its group .*chmod 600") as e:
        load_client_key(cfg, {})
    assert key.secret.hex() not in str(e.value)
    (tmp_path / "c.toml").write_text('client_key_file = "app.key"\n'
                                     "allow_world_readable_secrets = true\n")
    assert load_client_key(load_config(tmp_path / "c.toml"), {}) == key
