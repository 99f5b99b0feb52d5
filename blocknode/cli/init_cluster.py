"""`init-cluster`: configs for N local nodes sharing one cluster file, secret and admin key."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from pathlib import Path
from typing import Any

import tomli_w

from blocknode.auth import ClientKey, write_key_file
from blocknode.cli.base import EXIT_USAGE, fail, prog_of
from blocknode.config import cluster_from_dict, config_from_dict
from blocknode.errors import ConfigError

MAX_PORT = 65535
# A DNS name (RFC 1123): dot-separated labels of letters, digits and inner hyphens.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def address_host(host: str) -> str:
    """`host` as the host part of a "host:port" address the other nodes can dial.

    Accepted: an IPv4 address, an IPv6 address (returned in brackets: ``[::1]``)
    or a DNS name. Refused (`ConfigError`): an unspecified address (``0.0.0.0``,
    ``::``), which only means "every interface" to a listener and is no address
    to dial; a multicast address; and any other string (spaces, quotes, ``@``,
    ``/``, a port, ...), which no resolver would take and which would end up in
    every node's config.
    """
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.is_unspecified or ip.is_multicast:
            kind = "unspecified (every interface)" if ip.is_unspecified else "multicast"
            raise ConfigError(f"--host {host!r}: an {kind} address is no address the nodes "
                              "can dial; give this machine's address or name (e.g. 127.0.0.1)")
        return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if (len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels)
            or all(label.isdigit() for label in labels)):
        raise ConfigError(f"--host {host!r}: expected an IPv4 or IPv6 address or a DNS name "
                          "(letters, digits, hyphens and dots)")
    return host


def init_cluster(root: Path, *, nodes: int, replication: int, base_port: int = 3901,
                 host: str = "127.0.0.1") -> list[Path]:
    """Write ``root/cluster.toml``, ``root/rpc_secret`` and ``root/admin_key`` (0600) and
    ``root/nodeK/config.toml``.

    The admin key is every node's `admin_key_file`: each node adds it to its key
    table when it starts, so the CLI run with any node's config may do
    everything at once, on every node.

    Returns the config paths. Existing files are not overwritten: a second run
    on the same directory is refused, since a new secret would lock out the
    running nodes. The files are written by a TOML writer (any host string is
    quoted correctly) and checked by the same validation `serve` applies, before
    anything is written.
    """
    if not 1 <= base_port <= MAX_PORT - nodes + 1:
        raise ConfigError(f"ports {base_port}..{base_port + nodes - 1}: a port is 1..{MAX_PORT}")
    host = address_host(host)
    cluster_doc: dict[str, Any] = {"replication_factor": replication, "nodes": []}
    node_docs: list[dict[str, Any]] = []
    for i in range(1, nodes + 1):
        addr = f"{host}:{base_port + i - 1}"
        zone = f"zone{(i - 1) % max(replication, 1) + 1}"
        cluster_doc["nodes"].append({"id": f"node{i}", "addr": addr, "zone": zone, "capacity": 1})
        node_docs.append({"node_id": f"node{i}", "data_dir": "data", "metadata_dir": "meta",
                          "rpc_bind_addr": addr, "cluster_file": "../cluster.toml",
                          "rpc_secret_file": "../rpc_secret", "admin_key_file": "../admin_key",
                          "zone": zone})
    cluster_from_dict(cluster_doc, source="init-cluster")
    for doc in node_docs:
        config_from_dict(doc, source="init-cluster")

    root.mkdir(parents=True, exist_ok=True)
    cluster = root / "cluster.toml"
    secret = root / "rpc_secret"
    admin_key = root / "admin_key"
    if cluster.exists() or secret.exists() or admin_key.exists():
        raise ConfigError(f"{root} already holds a cluster (cluster.toml / rpc_secret / admin_key); "
                          "use a new directory")
    cluster.write_text(tomli_w.dumps(cluster_doc))
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    write_key_file(admin_key, ClientKey.generate())
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
    s = sub.add_parser("init-cluster", help="write configs for N local nodes (and an admin key)")
    s.add_argument("dir", metavar="DIR", help="where to write the cluster file and one "
                   "directory per node (node1, node2, ...)")
    s.add_argument("--nodes", type=int, required=True, metavar="N", help="how many nodes")
    s.add_argument("--replication", type=int, default=None, metavar="R",
                   help="copies of each block (default: min(3, nodes))")
    s.add_argument("--base-port", type=int, default=3901, metavar="P",
                   help="node i listens on P + i - 1 (default: 3901)")
    s.add_argument("--host", default="127.0.0.1",
                   help="the address (IPv4, IPv6 or DNS name) the nodes listen on and dial; "
                   "not 0.0.0.0 or :: (default: 127.0.0.1)")
    s.set_defaults(func=cmd_init_cluster)
