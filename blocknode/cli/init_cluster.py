"""`init-cluster`: configs for N local nodes sharing one cluster file and secret."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import tomli_w

from blocknode.cli.base import EXIT_USAGE, fail, prog_of
from blocknode.config import cluster_from_dict, config_from_dict
from blocknode.errors import ConfigError

MAX_PORT = 65535


def init_cluster(root: Path, *, nodes: int, replication: int, base_port: int = 3901,
                 host: str = "127.0.0.1") -> list[Path]:
    """Write ``root/cluster.toml``, ``root/rpc_secret`` (0600) and ``root/nodeK/config.toml``.

    Returns the config paths. Existing files are not overwritten: a second run
    on the same directory is refused, since a new secret would lock out the
    running nodes. The files are written by a TOML writer (any host string is
    quoted correctly) and checked by the same validation `serve` applies, before
    anything is written.
    """
    if not 1 <= base_port <= MAX_PORT - nodes + 1:
        raise ConfigError(f"ports {base_port}..{base_port + nodes - 1}: a port is 1..{MAX_PORT}")
    cluster_doc: dict[str, Any] = {"replication_factor": replication, "nodes": []}
    node_docs: list[dict[str, Any]] = []
    for i in range(1, nodes + 1):
        addr = f"{host}:{base_port + i - 1}"
        zone = f"zone{(i - 1) % max(replication, 1) + 1}"
        cluster_doc["nodes"].append({"id": f"node{i}", "addr": addr, "zone": zone, "capacity": 1})
        node_docs.append({"node_id": f"node{i}", "data_dir": "data", "metadata_dir": "meta",
                          "rpc_bind_addr": addr, "cluster_file": "../cluster.toml",
                          "rpc_secret_file": "../rpc_secret", "zone": zone})
    cluster_from_dict(cluster_doc, source="init-cluster")
    for doc in node_docs:
        config_from_dict(doc, source="init-cluster")

    root.mkdir(parents=True, exist_ok=True)
    cluster = root / "cluster.toml"
    secret = root / "rpc_secret"
    if cluster.exists() or secret.exists():
        raise ConfigError(f"{root} already holds a cluster (cluster.toml / rpc_secret); use a new directory")
    cluster.write_text(tomli_w.dumps(cluster_doc))
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    paths = []
    for doc in node_docs:
        d = root / doc["node_id"]
        d.mkdir(exist_ok=True)
        cfg = d / "config.toml"
        cfg.write_text(tomli_w.dumps(doc))
        paths.append(cfg)
    return paths


def cmd_init_cluster(args: argparse.Namespace) -> int:
    """Write configs for N local nodes sharing one cluster file and secret."""
    if args.nodes < 1:
        raise fail("--nodes: expected an integer >= 1", EXIT_USAGE)
    rf = args.replication if args.replication is not None else min(3, args.nodes)
    if not 1 <= rf <= args.nodes:
        raise fail(f"--replication: expected 1..{args.nodes} (the number of nodes), got {rf}", EXIT_USAGE)
    last = args.base_port + args.nodes - 1
    if not 1 <= args.base_port <= last <= MAX_PORT:
        raise fail(f"--base-port: {args.nodes} node(s) from port {args.base_port} need ports "
                   f"{args.base_port}..{last}; a port is 1..{MAX_PORT}", EXIT_USAGE)
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
