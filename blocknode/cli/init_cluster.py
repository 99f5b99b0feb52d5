"""`init-cluster`: configs for N local nodes sharing one cluster file and secret."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from blocknode.cli.base import EXIT_USAGE, fail, prog_of
from blocknode.errors import ConfigError


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


def cmd_init_cluster(args: argparse.Namespace) -> int:
    """Write configs for N local nodes sharing one cluster file and secret."""
    if args.nodes < 1:
        raise fail("--nodes: expected an integer >= 1", EXIT_USAGE)
    rf = args.replication if args.replication is not None else min(3, args.nodes)
    if not 1 <= rf <= args.nodes:
        raise fail(f"--replication: expected 1..{args.nodes} (the number of nodes), got {rf}", EXIT_USAGE)
    paths = init_cluster(Path(args.dir), nodes=args.nodes, replication=rf,
                         base_port=args.base_port, host=args.host)
    prog = prog_of(args)
    print(f"wrote a {args.nodes}-node cluster (replication {rf}) in {args.dir}:")
    for p in paths:
        print(f"  {prog} serve --config {p}")
    print(f"then, e.g.: {prog} --config {paths[0]} status")
    return 0


def add_command(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `init-cluster`."""
    s = sub.add_parser("init-cluster", help="write configs for N local nodes")
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--replication", type=int, default=None, help="default: min(3, nodes)")
    s.add_argument("--base-port", type=int, default=3901)
    s.add_argument("--host", default="127.0.0.1")
    s.set_defaults(func=cmd_init_cluster)
