"""`init-cluster`: configs for N local nodes sharing one cluster file and secret."""

from __future__ import annotations

import os
from pathlib import Path


def init_cluster(root: Path, *, nodes: int, replication: int, base_port: int = 3901,
                 host: str = "127.0.0.1") -> list[Path]:
    """Write ``root/cluster.toml``, ``root/rpc_secret`` (0600) and ``root/nodeK/config.toml``.

    Returns the config paths. Existing files are not overwritten: a second run
    on the same directory is refused, since a new secret would lock out the
    running nodes.
    """
    root.mkdir(parents=True, exist_ok=True)
    cluster = root / "cluster.toml"
    secret = root / "rpc_secret"
    if cluster.exists() or secret.exists():
        from blocknode.errors import ConfigError

        raise ConfigError(f"{root} already holds a cluster (cluster.toml / rpc_secret); use a new directory")
    lines = [f"replication_factor = {replication}", ""]
    for i in range(1, nodes + 1):
        lines += ["[[nodes]]", f'id = "node{i}"', f'addr = "{host}:{base_port + i - 1}"',
                  f'zone = "zone{(i - 1) % max(replication, 1) + 1}"', "capacity = 1", ""]
    cluster.write_text("\n".join(lines))
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    paths = []
    for i in range(1, nodes + 1):
        d = root / f"node{i}"
        d.mkdir(exist_ok=True)
        cfg = d / "config.toml"
        cfg.write_text(
            f'node_id = "node{i}"\n'
            'data_dir = "data"\n'
            'metadata_dir = "meta"\n'
            f'rpc_bind_addr = "{host}:{base_port + i - 1}"\n'
            'cluster_file = "../cluster.toml"\n'
            'rpc_secret_file = "../rpc_secret"\n'
            f'zone = "zone{(i - 1) % max(replication, 1) + 1}"\n'
        )
        paths.append(cfg)
    return paths
