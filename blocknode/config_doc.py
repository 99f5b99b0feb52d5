"""The configuration reference, generated from the config code so that it cannot drift.

Every field of `NodeConfig` has an entry in `FIELD_DOCS` (what it means); its
default comes from the dataclass and its accepted form from the validator's
own description in `blocknode.config`. `config_reference()` renders them as
Markdown; the committed ``deploy/CONFIG.md`` is its output, and a test checks
that they are equal. After changing a field, regenerate the file:

    python -m blocknode.config_doc > deploy/CONFIG.md
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from blocknode.cluster_config import ClusterConfig, ClusterNode
from blocknode.config import _FIELDS, DEFAULT_ROOT, SIZE_FIELDS, NodeConfig
from blocknode.sizes import format_size
from blocknode.workers.scrub import JITTER as SCRUB_JITTER

# field -> (section, meaning[, default as text when the value alone would mislead])
FIELD_DOCS: dict[str, tuple[str, ...]] = {
    "node_id": ("Identity and paths",
                "This node's id; with a cluster file it must be one of its `[[nodes]]` ids."),
    "data_dir": ("Identity and paths",
                 "Where block files live (`<hh>/<hh>/<hash>`, `<hash>.zst` when compressed); the "
                 "bulk of the bytes: size its disk for your data. A relative path is relative to "
                 "the config file's directory. Several disks: an array of tables, "
                 '`[{ path = "/mnt/hdd1", capacity = "2T" }, { path = "/mnt/hdd2", capacity = '
                 '"4T" }, { path = "/mnt/old", read_only = true }]`: blocks spread by capacity '
                 "(required unless `read_only`; only the ratios matter), a `read_only` one is read "
                 "and emptied by `repair rebalance`, never written. Each directory gets a "
                 "`blocknode-marker` file; one in use found without it at start (a disk not "
                 "mounted) is taken out of service and its blocks fetched from the other nodes."),
    "metadata_dir": ("Identity and paths",
                     "The LMDB environment (references, RCs, resync queue, small blocks). Best on an "
                     "SSD. A relative path is relative to the config file's directory."),
    "cluster_file": ("Identity and paths",
                     "The cluster file shared by every node (see below). Unset: a cluster of this one "
                     "node, with `zone` and `replication_factor` from this file.", "unset (single node)"),
    "bootstrap_peers": ("Identity and paths",
                        'Addresses (`["10.0.0.1:3901", "10.0.0.2:3901"]`) of nodes of an existing '
                        "cluster. A node with no layout yet (no cluster file, or one that does not "
                        "list it) fetches the cluster's layout from them (retrying with backoff "
                        "while none answers; its listener starts at once), then shows in `layout "
                        "show` as known but unassigned, storing nothing, until `layout assign` + "
                        "`layout apply`. Ignored once the node has a layout.", "empty"),
    "zone": ("Identity and paths",
             "This node's zone when it runs without a cluster file (a cluster file gives each "
             "node's zone itself)."),
    "rpc_bind_addr": ("Network",
                      'Address the node listens on, `"host:port"` (`"[v6]:port"` for IPv6); '
                      '`"0.0.0.0:3901"` listens on every interface.'),
    "rpc_public_addr": ("Network",
                        "Address other nodes and clients dial to reach this node, when it differs "
                        "from `rpc_bind_addr` (which must then not be 0.0.0.0). With a cluster file "
                        "the file's `addr` is what others dial.", "= `rpc_bind_addr`"),
    "rpc_secret": ("Network",
                   "The 32-byte cluster secret as 64 hex characters, the same on every node. It "
                   "authenticates nodes only (clients use client keys) and gives every power: "
                   "keep it on the nodes. Prefer `rpc_secret_file`: a config file is often more "
                   "readable than a secret should be.",
                   "unset"),
    "rpc_secret_file": ("Network",
                        "File holding the cluster secret (64 hex characters), mode 0600. The default "
                        "file is created on first start; a named file must exist.",
                        "`<metadata_dir>/../rpc_secret`"),
    "allow_world_readable_secrets": ("Network",
                                     "Accept a secret or key file that its group or other users "
                                     "may access. Off (the default), such a file is refused with "
                                     "an error saying to `chmod 600` it (as Garage's option of the "
                                     "same name)."),
    "max_clock_skew": ("Network",
                       "A reference version a peer sends timestamped further ahead of this node's "
                       "clock than this is refused and logged (times are set by the coordinating "
                       "node's hybrid logical clock, never by clients). Keep the nodes' clocks in "
                       "sync (NTP) well within it."),
    "rpc_timeout": ("Network", "Deadline of one RPC to another node (a put, a get, a batch)."),
    "connect_timeout": ("Network", "Deadline to open a connection to a peer and finish the handshake."),
    "need_block_timeout": ("Network",
                           "Deadline of the `need_block` question the GC asks the other replicas "
                           "before deleting a block (no answer: the block is kept)."),
    "hedge_delay": ("Network",
                    "A read that has no answer from the first replica after this long also asks "
                    "the next one; the first valid copy wins."),
    "group_commit_rounds": ("Network",
                            "Group commit across clients: at most this many small-block batches "
                            "(`client_put_many`, from any clients and connections) are being "
                            "stored at once; those that arrive meanwhile wait and go together as "
                            "the next one (one `put_blocks` per replica, one commit there). An "
                            "idle node adds no wait. 0: each batch is stored on its own."),
    "block_ram_buffer_max": ("Network",
                             "Cap on block bytes held in RAM by RPCs, a quarter each for: payloads "
                             "this node sends, client requests it is handling, messages being "
                             "received (an eighth from nodes, an eighth from clients), replies not "
                             "yet sent (past it the node stops reading and TCP pushes back)."),
    "rpc_handshake_timeout": ("Network", "Deadline of a connection's handshake (both directions)."),
    "rpc_max_handshakes": ("Network",
                           "Incoming connections not yet authenticated at once, clients and nodes "
                           "alike; a newcomer past it closes the oldest."),
    "rpc_max_connections": ("Network",
                            "Incoming client connections at once (with `rpc_max_node_connections` "
                            "also kept under half the descriptor limit, whose soft value `serve` "
                            "raises to the hard one); a client past it is refused as busy, never "
                            "a node."),
    "rpc_max_connections_per_addr": ("Network", "Incoming client connections at once from one "
                                     "address."),
    "rpc_max_node_connections": ("Network",
                                 "Incoming connections from other nodes at once (each node keeps "
                                 "one open to each other): a cap of their own, so that clients "
                                 "cannot crowd out replication."),
    "client_key_file": ("Client keys",
                        "For a client (the CLI, an application): a file holding its client key, "
                        "the one line `ID:SECRET` that `key create` printed. `BLOCKNODE_KEY=ID:SECRET` "
                        "in the environment wins over it. Unset: the node's admin key file, if "
                        "this is a node's config.", "unset"),
    "client_direct": ("Client keys",
                      "For a client: send blocks larger than the batching size (64 KiB) straight "
                      "to their replicas and read them straight from one (hedged), after "
                      "learning the layout from the node it talks to; that node still "
                      "coordinates small blocks, manifests, and any block whose replicas the "
                      "client cannot reach. Each replica checks the key, its layout and the "
                      "hash, and stamps the reference with its own clock. false: everything "
                      "goes through the node the client talks to."),
    "admin_key_file": ("Client keys",
                       "This node's admin key (every permission), mode 0600: made on the node's "
                       "first start when missing and added to the cluster's keys; an existing file "
                       "(e.g. the one `init-cluster` writes for all its nodes) is added when the "
                       "node starts unless that key was deleted. The CLI run with this config uses "
                       "it. Whoever can write it can make the node accept an admin key: keep it "
                       "like the secret.", "`<metadata_dir>/../admin_key`"),
    "rpc_idle_timeout": ("Network",
                         "An authenticated incoming connection with nothing in flight this long "
                         "is closed (a message that gets no data, or a reply the peer does not "
                         "read, for `rpc_timeout` closes it too)."),
    "replication_factor": ("Storage",
                           "Copies of each block, when there is no cluster file or the cluster file "
                           "does not say."),
    "block_size": ("Storage",
                   "Largest block. Larger data is split into blocks plus a manifest; every node "
                   "and client of a cluster must use the same value."),
    "inline_threshold": ("Storage",
                         "Blocks up to this size are stored in LMDB, committed with their reference "
                         "(no file, no file fsync); 0 keeps every block in a file. At most "
                         "`block_size`."),
    "compression_level": ("Storage",
                          "zstd level of the blocks this node coordinates (kept compressed only "
                          'when that saves more than 10 %), or `"none"`. Replicas store the form '
                          "they receive; reads decompress and verify. Changing it affects new "
                          "writes only: plain and compressed blocks mix. Keep `\"none\"` until "
                          "every node of the cluster supports compression."),
    "data_fsync": ("Storage",
                   "fsync each block file and its directory before acknowledging a write. Off trades "
                   "crash safety for speed."),
    "metadata_fsync": ("Storage",
                       "fsync each LMDB commit. Off trades crash safety (the last commits) for speed."),
    "lmdb_map_size": ("Storage",
                      "Largest size the LMDB environment may grow to (a sparse file: only what is "
                      "used takes disk). Raise it before the metadata outgrows it."),
    "lmdb_max_readers": ("Storage", "LMDB's reader slots (concurrent read transactions)."),
    "gc_delay": ("Background work",
                 "How long a block whose last reference was deleted waits before it is deleted "
                 "(a re-reference within the delay keeps it)."),
    "resync_workers": ("Background work",
                       "Concurrent resync tasks (fetching missing blocks, offloading and deleting "
                       "unneeded ones). `worker set resync-workers N` changes it at run time."),
    "resync_tranquility": ("Background work",
                           "Resync throttle: after each step rest this many times the step's "
                           "duration (0: full speed). `worker set resync-tranquility N`."),
    "scrub_tranquility": ("Background work",
                          "Scrub throttle, as above: tranquility T uses about 1/(T+1) of the disk's "
                          "read speed. `scrub set-tranquility N`."),
    "scrub_interval": ("Background work",
                       "Period of the automatic scrub (every block read and verified), with "
                       f"±{SCRUB_JITTER:.0%} random jitter so that nodes do not scrub together."),
    "anti_entropy_interval": ("Background work",
                              "Period of the reference anti-entropy round with the other replicas."),
    "log_level": ("Logging",
                  "Lowest level `serve` logs to stderr (`--log-level` overrides). INFO: life cycle "
                  "and background outcomes; WARNING: what needs a look; nothing per request at INFO."),
    "log_format": ("Logging",
                   '`"text"`: `TIME LEVEL NODE LOGGER: MESSAGE` lines; `"json"`: one JSON object per '
                   "line (`time`, `level`, `node`, `logger`, `message`) for log shippers "
                   "(`--log-format` overrides)."),
    "admin_api_bind_addr": ("Metrics and health",
                            "Where the admin HTTP listener answers `GET /metrics` (Prometheus) and "
                            "`GET /health` (200, or 503 with the reason when the node cannot serve "
                            "reads and writes at quorum). Also `api_bind_addr` in an `[admin]` "
                            "table, as in Garage. On for the embedded default; in a config file, "
                            "off unless set.",
                            '`"127.0.0.1:3903"` for the embedded default; unset (off) in a config file'),
    "metrics_token": ("Metrics and health",
                      "When set, `/metrics` answers only requests with `Authorization: Bearer "
                      "TOKEN` (`/health` stays open). Also `metrics_token` in `[admin]`.",
                      "unset (no token)"),
}

SECTIONS = ("Identity and paths", "Network", "Client keys", "Storage", "Background work", "Logging",
            "Metrics and health")

# The cluster file: ClusterConfig / ClusterNode field -> meaning (default from the dataclass).
CLUSTER_DOCS: dict[str, str] = {
    "replication_factor": "Copies of each block (on distinct zones where possible).",
    "write_quorum": "Replicas that must hold a block and its reference before a write returns.",
    "nodes": "One `[[nodes]]` table per node, with the fields below.",
}
CLUSTER_NODE_DOCS: dict[str, str] = {
    "id": "The node's id (its config's `node_id`).",
    "addr": 'The `"host:port"` the other nodes and the clients dial (not 0.0.0.0).',
    "zone": "Failure domain (rack, room, site): copies go to distinct zones where possible.",
    "capacity": "Relative weight in the layout (e.g. terabytes); a node with twice the capacity "
                "holds about twice the partitions.",
}
_CLUSTER_DEFAULT_TEXT = {"replication_factor": "the node config's `replication_factor`",
                         "write_quorum": "`replication_factor // 2 + 1`", "nodes": "required",
                         "id": "required", "addr": "required"}


def _seconds(v: float) -> str:
    for unit, n in (("days", 86400), ("h", 3600), ("min", 60)):
        if v >= n and v % n == 0:
            return f"`{v:.0f}` ({v / n:g} {unit})"
    return f"`{v:g}` s"


def _default_text(name: str, value: Any) -> str:
    doc = FIELD_DOCS[name]
    if len(doc) > 2:
        return doc[2]
    if name in SIZE_FIELDS:
        return f'`"{format_size(value)}"` ({value:,} bytes)'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, float):
        return f"`{value:g}`" if "tranquility" in name else _seconds(value)
    return f"`{value!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_reference() -> str:
    """The Markdown reference of the node config and the cluster file (deploy/CONFIG.md)."""
    names = [f.name for f in fields(NodeConfig) if f.name != "source"]
    defaults = NodeConfig()
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m blocknode.config_doc > deploy/CONFIG.md` from",
        "     blocknode/config.py and blocknode/config_doc.py; edit those, not this file",
        "     (tests/unit/test_config_doc.py checks that this file is up to date). -->",
        "",
        "A node reads one TOML file (`serve --config PATH`, or `$BLOCKNODE_CONFIG`). Every field",
        "is optional; with no file at all the node is the embedded default (a single node",
        f"under `./{DEFAULT_ROOT}`, on 127.0.0.1:3901). Unknown fields are refused, and a bad value",
        "is refused with the file, the field and the expected form named. Durations are seconds",
        "(decimals allowed). Sizes are a number of bytes or a string as in Garage:",
        '`"256MiB"`, `"64KiB"`, `"1T"`, `"256M"` — K, M, G, T, P are powers of 1000 (`"1M"` is',
        "1,000,000 bytes) and KiB, MiB, GiB, TiB, PiB powers of 1024 (`\"1MiB\"` is 1,048,576).",
        "",
    ]
    for section in SECTIONS:
        out += [f"## {section}", "", "| field | default | accepts | meaning |", "| --- | --- | --- | --- |"]
        for name in names:
            if FIELD_DOCS[name][0] != section:
                continue
            default = _default_text(name, getattr(defaults, name))
            accepts = _FIELDS[name][1]
            out.append(f"| `{name}` | {_cell(default)} | {_cell(accepts)} | {_cell(FIELD_DOCS[name][1])} |")
        out.append("")
    out += [
        "## The cluster file",
        "",
        "One TOML file, the same on every node (`cluster_file`). It seeds version 1 of the",
        "layout of a new cluster; from then on the layout lives in each node's metadata and",
        "changes with the `layout` commands (a node not listed joins by `layout assign` +",
        "`layout apply`).",
        "",
        "| field | default | meaning |",
        "| --- | --- | --- |",
    ]
    for f in fields(ClusterConfig):
        default = _CLUSTER_DEFAULT_TEXT.get(f.name) or f"`{f.default!r}`"
        out.append(f"| `{f.name}` | {default} | {_cell(CLUSTER_DOCS[f.name])} |")
    out += ["", "In each `[[nodes]]` table:", "", "| field | default | meaning |", "| --- | --- | --- |"]
    for f in fields(ClusterNode):
        default = _CLUSTER_DEFAULT_TEXT.get(f.name) or (
            f"`{f.default!r}`".replace("'", '"') if f.default is not MISSING else "required")
        out.append(f"| `{f.name}` | {default} | {_cell(CLUSTER_NODE_DOCS[f.name])} |")
    out.append("")
    return "\n".join(out)


def main() -> None:
    """Print the reference (``python -m blocknode.config_doc > deploy/CONFIG.md``)."""
    print(config_reference(), end="")


if __name__ == "__main__":
    main()
