"""Node configuration: a TOML file where every field has a default, or no file at all.

Field names follow Garage's where the concept is Garage's (`data_dir`,
`metadata_dir`, `rpc_bind_addr`, `rpc_public_addr`, `rpc_secret`,
`rpc_secret_file`, `replication_factor`, `block_size`, `data_fsync`,
`metadata_fsync`), so an operator who knows Garage feels at home.

With no file, the embedded default is a single node keeping everything under
``./blocknode-data`` and listening on loopback. Relative paths in a config file
are relative to the file's directory. A bad value raises `ConfigError` naming the
file, the field and the expected form; an unknown field is refused (a typo would
otherwise silently fall back to a default).

`data_dir` is one directory (a string) or several: an array of tables
``{ path = "/mnt/hdd1", capacity = "2T" }`` (`capacity` is required unless
``read_only = true``; sizes as `blocknode.sizes` reads them). `compression_level` is a
zstd level (an integer) or ``"none"``.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from blocknode.cluster_config import DEFAULT_REPLICATION_FACTOR, ClusterConfig, ClusterNode
from blocknode.errors import ConfigError, UnknownNode
from blocknode.logs import FORMATS as LOG_FORMATS
from blocknode.logs import LEVELS as LOG_LEVELS
from blocknode.protocol import DEFAULT_BLOCK_SIZE
from blocknode.sizes import SIZE_FORMS, parse_size

DEFAULT_ROOT = "blocknode-data"
DEFAULT_PORT = 3901
DEFAULT_ADMIN_PORT = 3903  # Garage's admin API port
MiB = 1024 * 1024
DEFAULT_COMPRESSION_LEVEL = 1
ZSTD_LEVEL_MIN, ZSTD_LEVEL_MAX = -131072, 22


@dataclass(frozen=True)
class DataDir:
    """One data directory: where block files go, weighted by `capacity` (bytes;
    None for the single-string form); a `read_only` one is read, never written,
    and emptied by `repair rebalance`."""

    path: str
    capacity: int | None = None
    read_only: bool = False


@dataclass(frozen=True)
class NodeConfig:
    """Every setting of one node. Durations are seconds (floats allowed)."""

    node_id: str = "node1"
    data_dir: str | tuple[DataDir, ...] = f"{DEFAULT_ROOT}/data"
    metadata_dir: str = f"{DEFAULT_ROOT}/meta"
    rpc_bind_addr: str = f"127.0.0.1:{DEFAULT_PORT}"
    rpc_public_addr: str | None = None
    rpc_secret: str | None = field(default=None, repr=False)  # 64 hex chars; or rpc_secret_file
    rpc_secret_file: str | None = None  # default: <root>/rpc_secret, made on first start
    client_key_file: str | None = None  # the client key (ID:SECRET) a client uses; BLOCKNODE_KEY wins
    client_direct: bool = True  # a client sends large blocks to (and reads them from) the replicas itself
    admin_key_file: str | None = None  # default: <root>/admin_key, made on first start
    allow_world_readable_secrets: bool = False  # accept a secret file readable by group/others
    cluster_file: str | None = None  # none: a single-node cluster of this node
    # "host:port" of nodes of an existing cluster: a node with no layout yet (not listed in
    # its cluster file, or without one) fetches the cluster's layout from them (`bootstrap`)
    bootstrap_peers: tuple[str, ...] = ()
    zone: str = "default"
    replication_factor: int = DEFAULT_REPLICATION_FACTOR
    block_size: int = DEFAULT_BLOCK_SIZE
    inline_threshold: int = 16 * 1024  # blocks up to this size live in LMDB
    data_fsync: bool = True
    metadata_fsync: bool = True
    lmdb_map_size: int = 16 * 1024 * MiB
    lmdb_max_readers: int = 126
    gc_delay: float = 600.0
    rpc_timeout: float = 30.0
    need_block_timeout: float = 5.0
    connect_timeout: float = 5.0
    hedge_delay: float = 0.05
    group_commit_rounds: int = 4  # small-block batches of different clients stored at once (0: off)
    max_clock_skew: float = 5.0  # a reference version further ahead of this node's clock is refused
    block_ram_buffer_max: int = 256 * MiB
    rpc_handshake_timeout: float = 2.0
    rpc_idle_timeout: float = 300.0
    rpc_max_connections: int = 1024
    rpc_max_connections_per_addr: int = 128
    rpc_max_handshakes: int = 64
    rpc_max_node_connections: int = 256
    resync_workers: int = 1
    resync_tranquility: float = 2.0
    scrub_tranquility: float = 4.0
    scrub_interval: float = 30 * 24 * 3600.0
    anti_entropy_interval: float = 600.0
    log_level: str = "info"  # debug, info, warning, error (`serve --log-level` overrides)
    log_format: str = "text"  # text, or json: one object per line (`serve --log-format` overrides)
    compression_level: int | None = DEFAULT_COMPRESSION_LEVEL  # zstd level; None: "none"
    # The admin HTTP listener (/metrics, /health): on for the embedded default, off
    # unless set in a config file (`[admin] api_bind_addr` there, as in Garage).
    admin_api_bind_addr: str | None = f"127.0.0.1:{DEFAULT_ADMIN_PORT}"
    metrics_token: str | None = field(default=None, repr=False)  # bearer token for /metrics
    source: str = field(default="<embedded default>", compare=False)

    @property
    def public_addr(self) -> str:
        """The address other nodes and clients use to reach this node."""
        return self.rpc_public_addr or self.rpc_bind_addr

    @property
    def secret_file(self) -> str:
        """Where the cluster secret is read from (or created, for the default)."""
        if self.rpc_secret_file:
            return self.rpc_secret_file
        return str(Path(self.metadata_dir).parent / "rpc_secret")

    @property
    def data_dirs(self) -> tuple[DataDir, ...]:
        """The data directories (the string form is one directory)."""
        if isinstance(self.data_dir, str):
            return (DataDir(self.data_dir),)
        return self.data_dir

    @property
    def admin_key_path(self) -> str:
        """This node's admin key file (made on the node's first start when missing)."""
        if self.admin_key_file:
            return self.admin_key_file
        return str(Path(self.metadata_dir).parent / "admin_key")


# field name -> (validator, expected form for the error message)
def _is_str(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _is_opt_str(v: Any) -> bool:
    return v is None or _is_str(v)


def _is_addr(v: Any) -> bool:
    if not isinstance(v, str) or ":" not in v:
        return False
    host, _, port = v.rpartition(":")
    return bool(host) and port.isdigit() and 0 <= int(port) < 65536


def _is_opt_addr(v: Any) -> bool:
    return v is None or _is_addr(v)


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_nonneg_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v >= 0


def _is_pos_num(v: Any) -> bool:
    return _is_nonneg_num(v) and v > 0


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_secret(v: Any) -> bool:
    if v is None:
        return True
    if not isinstance(v, str) or len(v) != 64:
        return False
    try:
        bytes.fromhex(v)
    except ValueError:
        return False
    return True


def _is_level(v: Any) -> bool:
    if v == "none":
        return True
    return (isinstance(v, int) and not isinstance(v, bool)
            and ZSTD_LEVEL_MIN <= v <= ZSTD_LEVEL_MAX)


def _is_data_dir(v: Any) -> bool:
    return _is_str(v) or (isinstance(v, list) and bool(v))  # a list is checked by _data_dirs


_FIELDS: dict[str, tuple[Any, str]] = {
    "node_id": (_is_str, "a non-empty string"),
    "data_dir": (_is_data_dir, "a directory path, or an array of "
                 "{ path, capacity, read_only } tables"),
    "metadata_dir": (_is_str, "a directory path"),
    "rpc_bind_addr": (_is_addr, 'an address "host:port"'),
    "rpc_public_addr": (_is_opt_addr, 'an address "host:port"'),
    "rpc_secret": (_is_secret, "64 hex characters (32 bytes), e.g. from `openssl rand -hex 32`"),
    "rpc_secret_file": (_is_opt_str, "a file path"),
    "allow_world_readable_secrets": (_is_bool, "true or false"),
    "cluster_file": (_is_opt_str, "a file path"),
    "bootstrap_peers": (lambda v: isinstance(v, list), 'an array of addresses "host:port"'),
    "client_key_file": (_is_opt_str, "a file path"),
    "client_direct": (_is_bool, "true or false"),
    "admin_key_file": (_is_opt_str, "a file path"),
    "zone": (_is_str, "a non-empty string"),
    "replication_factor": (_is_pos_int, "an integer >= 1"),
    "block_size": (_is_pos_int, f"a size > 0: a number of bytes, or a string such as {SIZE_FORMS}"),
    "inline_threshold": (lambda v: _is_pos_int(v) or v == 0,
                         f"a size >= 0: a number of bytes, or a string such as {SIZE_FORMS}"),
    "data_fsync": (_is_bool, "true or false"),
    "metadata_fsync": (_is_bool, "true or false"),
    "lmdb_map_size": (_is_pos_int, f"a size > 0: a number of bytes, or a string such as {SIZE_FORMS}"),
    "lmdb_max_readers": (_is_pos_int, "an integer >= 1"),
    "gc_delay": (_is_nonneg_num, "a number of seconds >= 0"),
    "rpc_timeout": (_is_pos_num, "a number of seconds > 0"),
    "need_block_timeout": (_is_pos_num, "a number of seconds > 0"),
    "connect_timeout": (_is_pos_num, "a number of seconds > 0"),
    "hedge_delay": (_is_nonneg_num, "a number of seconds >= 0"),
    "group_commit_rounds": (lambda v: _is_pos_int(v) or v == 0, "an integer >= 0"),
    "max_clock_skew": (lambda v: _is_nonneg_num(v) and v >= 0.01, "a number of seconds >= 0.01"),
    "block_ram_buffer_max": (_is_pos_int,
                             f"a size > 0: a number of bytes, or a string such as {SIZE_FORMS}"),
    "rpc_handshake_timeout": (_is_pos_num, "a number of seconds > 0"),
    "rpc_idle_timeout": (_is_pos_num, "a number of seconds > 0"),
    "rpc_max_connections": (_is_pos_int, "an integer >= 1"),
    "rpc_max_connections_per_addr": (_is_pos_int, "an integer >= 1"),
    "rpc_max_handshakes": (_is_pos_int, "an integer >= 1"),
    "rpc_max_node_connections": (_is_pos_int, "an integer >= 1"),
    "resync_workers": (_is_pos_int, "an integer >= 1"),
    "resync_tranquility": (_is_nonneg_num, "a number >= 0"),
    "scrub_tranquility": (_is_nonneg_num, "a number >= 0"),
    "scrub_interval": (_is_pos_num, "a number of seconds > 0"),
    "anti_entropy_interval": (_is_pos_num, "a number of seconds > 0"),
    "log_level": (lambda v: v in LOG_LEVELS, " or ".join(f'"{x}"' for x in LOG_LEVELS)),
    "log_format": (lambda v: v in LOG_FORMATS, " or ".join(f'"{x}"' for x in LOG_FORMATS)),
    "admin_api_bind_addr": (_is_opt_addr, 'an address "host:port"'),
    "metrics_token": (_is_opt_str, "a non-empty string (a bearer token)"),
    "compression_level": (_is_level, f'a zstd level (an integer from {ZSTD_LEVEL_MIN} to '
                          f'{ZSTD_LEVEL_MAX}, e.g. 1 or 3) or "none"'),
}
_PATH_FIELDS = ("data_dir", "metadata_dir", "rpc_secret_file", "cluster_file", "client_key_file",
                "admin_key_file")
# Byte sizes: an integer, or a string such as "256M" or "1MiB" (`blocknode.sizes`), as in Garage.
SIZE_FIELDS = frozenset({"block_size", "inline_threshold", "lmdb_map_size", "block_ram_buffer_max"})
# Fields whose values no message may show, however malformed they are.
_SECRET_FIELDS = frozenset({"rpc_secret", "metrics_token"})
# The `[admin]` table of a config file (Garage's form): its keys and the fields they set.
ADMIN_TABLE = {"api_bind_addr": "admin_api_bind_addr", "metrics_token": "metrics_token"}


def _describe_secret(v: Any) -> str:
    """What a bad secret looks like, without showing any of it."""
    if not isinstance(v, str):
        return f"a value of type {type(v).__name__}"
    if len(v) != 64:
        return f"a string of {len(v)} characters"
    return "64 characters that are not all hex digits"

assert set(_FIELDS) == {f.name for f in fields(NodeConfig)} - {"source"}


def _abs(path: str, base_dir: Path | None) -> str:
    if base_dir is None or os.path.isabs(path):
        return path
    return str((base_dir / path).resolve())


def _bootstrap_peers(value: list[Any], *, source: str) -> tuple[str, ...]:
    """Validate `bootstrap_peers`: each entry an address "host:port", none twice."""
    for i, addr in enumerate(value):
        if not _is_addr(addr):
            raise ConfigError(f"{source}: field 'bootstrap_peers', entry {i}: expected an "
                              f'address "host:port", got {addr!r}')
    if len(set(value)) != len(value):
        dup = next(a for a in value if value.count(a) > 1)
        raise ConfigError(f"{source}: field 'bootstrap_peers': {dup!r} is listed twice")
    return tuple(value)


def _data_dirs(value: list[Any], *, source: str, base_dir: Path | None) -> tuple[DataDir, ...]:
    """Validate the array form of `data_dir`."""
    out: list[DataDir] = []
    for i, d in enumerate(value):
        where = f"{source}: field 'data_dir', entry {i}"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a table {{ path, capacity, read_only }}, got {d!r}")
        for key in d:
            if key not in ("path", "capacity", "read_only"):
                raise ConfigError(f"{where}: unknown field {key!r} (known: capacity, path, read_only)")
        path, cap, ro = d.get("path"), d.get("capacity"), d.get("read_only", False)
        if not _is_str(path):
            raise ConfigError(f"{where}: field 'path': expected a directory path, got {path!r}")
        if not _is_bool(ro):
            raise ConfigError(f"{where}: field 'read_only': expected true or false, got {ro!r}")
        capacity: int | None = None
        if cap is not None:
            capacity = (cap if isinstance(cap, int) and not isinstance(cap, bool)
                        else parse_size(cap) if isinstance(cap, str) else None)
            if capacity is None or capacity <= 0:
                raise ConfigError(f"{where}: field 'capacity': expected a size > 0: a number of "
                                  f"bytes, or a string such as {SIZE_FORMS}; got {cap!r}")
        elif not ro:
            raise ConfigError(f"{where}: field 'capacity': required (e.g. \"2T\") unless "
                              "read_only = true")
        out.append(DataDir(_abs(path, base_dir), capacity, ro))
    real = [os.path.realpath(d.path) for d in out]
    if len(set(real)) != len(real):
        raise ConfigError(f"{source}: field 'data_dir': a directory is listed twice")
    if all(d.read_only for d in out):
        raise ConfigError(f"{source}: field 'data_dir': at least one directory must be writable "
                          "(not read_only)")
    return tuple(out)


def _flatten_admin(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The `[admin]` table's keys as the flat fields they stand for."""
    table = raw.get("admin")
    if table is None:
        return raw
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: field 'admin': expected a table [admin] with "
                          f"{', '.join(ADMIN_TABLE)}, got {table!r}")
    out = {k: v for k, v in raw.items() if k != "admin"}
    for key, value in table.items():
        flat = ADMIN_TABLE.get(key)
        if flat is None:
            raise ConfigError(f"{source}: [admin]: unknown field {key!r} "
                              f"(known: {', '.join(sorted(ADMIN_TABLE))})")
        if flat in out:
            raise ConfigError(f"{source}: [admin] {key} and {flat} both set: keep one")
        out[flat] = value
    return out


def config_from_dict(raw: dict[str, Any], *, source: str, base_dir: Path | None = None) -> NodeConfig:
    """Validate a parsed TOML table into a `NodeConfig`; `ConfigError` names the bad field."""
    values: dict[str, Any] = {}
    raw = _flatten_admin(raw, source)
    for key, value in raw.items():
        if key not in _FIELDS:
            raise ConfigError(f"{source}: unknown field {key!r} (known fields: {', '.join(sorted(_FIELDS))})")
        check, expected = _FIELDS[key]
        given = value
        if key in SIZE_FIELDS and isinstance(value, str):
            size = parse_size(value)
            value = size if size is not None else value
        if not check(value):
            got = _describe_secret(value) if key in _SECRET_FIELDS else repr(given)
            raise ConfigError(f"{source}: field {key!r}: expected {expected}, got {got}")
        if key == "rpc_secret_file" and isinstance(value, str) and _is_secret(value.strip()):
            raise ConfigError(f"{source}: field 'rpc_secret_file': expected a file path, got what "
                              "looks like the secret itself (put the value in rpc_secret)")
        if key in ("client_key_file", "admin_key_file") and isinstance(value, str) and ":" in value \
                and _is_secret(value.rpartition(":")[2].strip()):
            raise ConfigError(f"{source}: field {key!r}: expected a file path, got what looks "
                              "like a key itself (put the key in a file, or in BLOCKNODE_KEY)")
        if key == "bootstrap_peers":
            value = _bootstrap_peers(value, source=source)
        elif key == "data_dir" and isinstance(value, list):
            value = _data_dirs(value, source=source, base_dir=base_dir)
        elif key == "compression_level" and value == "none":
            value = None
        elif key in _PATH_FIELDS and value is not None and base_dir is not None:
            value = str((base_dir / value).resolve()) if not os.path.isabs(value) else value
        values[key] = value
    values.setdefault("admin_api_bind_addr", None)  # off unless the file configures it
    cfg = replace(NodeConfig(), source=source, **values)
    if base_dir is not None:
        # Defaults of path fields are relative to the config file too.
        fixes = {k: str((base_dir / getattr(cfg, k)).resolve()) for k in ("data_dir", "metadata_dir")
                 if k not in values and isinstance(getattr(cfg, k), str)}
        cfg = replace(cfg, **fixes)
    if cfg.inline_threshold > cfg.block_size:
        raise ConfigError(f"{source}: field 'inline_threshold': expected at most block_size "
                          f"({cfg.block_size}), got {cfg.inline_threshold}")
    return cfg


def load_config(path: str | os.PathLike[str] | None) -> NodeConfig:
    """Load a node config file, or return the embedded default when `path` is None."""
    if path is None:
        return NodeConfig()
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    return config_from_dict(raw, source=str(p), base_dir=p.resolve().parent)


def resolve_config_path(cli_value: str | None) -> str | None:
    """The config path a command uses: `--config`, else `BLOCKNODE_CONFIG`, else None."""
    return cli_value or os.environ.get("BLOCKNODE_CONFIG") or None


def find_default_root(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The nearest `DEFAULT_ROOT` directory: in `start` (default: the working
    directory) or in one of its parents, like git finds `.git`; None if none."""
    here = Path(start).resolve() if start is not None else Path.cwd()
    for d in (here, *here.parents):
        if (d / DEFAULT_ROOT).is_dir():
            return d / DEFAULT_ROOT
    return None


def default_config_at(root: str | os.PathLike[str]) -> NodeConfig:
    """The embedded default node, keeping everything under the directory `root`."""
    root = Path(root).absolute()
    return replace(NodeConfig(), data_dir=str(root / "data"), metadata_dir=str(root / "meta"),
                   source=f"<embedded default, {root}>")


def load_cluster_file(path: str | os.PathLike[str], *,
                      default_rf: int = DEFAULT_REPLICATION_FACTOR) -> ClusterConfig:
    """Load and validate a cluster file (see `blocknode.cluster_config`)."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"cluster file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cluster file {p} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cluster file {p} is not valid TOML: {exc}") from None
    return cluster_from_dict(raw, source=str(p), default_rf=default_rf)


def cluster_from_dict(raw: dict[str, Any], *, source: str,
                      default_rf: int = DEFAULT_REPLICATION_FACTOR) -> ClusterConfig:
    """Validate a parsed cluster table; `ConfigError` names the bad field."""
    known = {"replication_factor", "write_quorum", "nodes"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{source}: unknown field {key!r} (known: {', '.join(sorted(known))})")
    rf = raw.get("replication_factor", default_rf)
    if not _is_pos_int(rf):
        raise ConfigError(f"{source}: field 'replication_factor': expected an integer >= 1, got {rf!r}")
    wq = raw.get("write_quorum")
    if wq is not None and not _is_pos_int(wq):
        raise ConfigError(f"{source}: field 'write_quorum': expected an integer >= 1, got {wq!r}")
    nodes_raw = raw.get("nodes")
    if not isinstance(nodes_raw, list) or not nodes_raw:
        raise ConfigError(f"{source}: field 'nodes': expected a non-empty array of [[nodes]] tables")
    nodes = []
    for i, n in enumerate(nodes_raw):
        where = f"{source}: nodes[{i}]"
        if not isinstance(n, dict):
            raise ConfigError(f"{where}: expected a table with id, addr, zone, capacity")
        for key in n:
            if key not in ("id", "addr", "zone", "capacity"):
                raise ConfigError(f"{where}: unknown field {key!r} (known: addr, capacity, id, zone)")
        nid, addr = n.get("id"), n.get("addr")
        zone, cap = n.get("zone", "default"), n.get("capacity", 1)
        if not _is_str(nid):
            raise ConfigError(f"{where}: field 'id': expected a non-empty string, got {nid!r}")
        if not _is_addr(addr):
            raise ConfigError(f"{where}: field 'addr': expected an address \"host:port\", got {addr!r}")
        if not _is_str(zone):
            raise ConfigError(f"{where}: field 'zone': expected a non-empty string, got {zone!r}")
        if not _is_pos_int(cap):
            raise ConfigError(f"{where}: field 'capacity': expected an integer > 0, got {cap!r}")
        nodes.append(ClusterNode(id=nid, addr=addr, zone=zone, capacity=cap))
    return ClusterConfig(nodes=tuple(nodes), replication_factor=rf, write_quorum=wq)


def cluster_of(cfg: NodeConfig, *, member: bool = True) -> ClusterConfig:
    """The cluster this node belongs to: its cluster file, or a single node of itself.

    `member`: the node must be listed in the file (False for a running node: a node
    not listed joins the cluster by `layout assign` + `layout apply`)."""
    if cfg.cluster_file:
        cluster = load_cluster_file(cfg.cluster_file, default_rf=cfg.replication_factor)
        if not member:
            return cluster
        try:
            cluster.node(cfg.node_id)
        except UnknownNode:
            raise ConfigError(
                f"{cfg.source}: field 'node_id': {cfg.node_id!r} is not listed in cluster file "
                f"{cfg.cluster_file}"
            ) from None
        return cluster
    return ClusterConfig(
        nodes=(ClusterNode(id=cfg.node_id, addr=cfg.public_addr, zone=cfg.zone),),
        replication_factor=cfg.replication_factor,
    )


def check_private_file(path: str | os.PathLike[str], what: str, *,
                       allow_world_readable: bool = False) -> None:
    """Refuse a secret or key file that users other than its owner may access.

    Any permission bit for group or others (mode & 0o077) is refused with a
    `ConfigError` saying how to fix it, as Garage does for its secret files;
    `allow_world_readable` (the `allow_world_readable_secrets` config field)
    accepts it. `FileNotFoundError` passes through for the caller.
    """
    st = os.stat(path)
    if allow_world_readable or not st.st_mode & 0o077:
        return
    mode = stat.S_IMODE(st.st_mode)
    who = " and ".join(w for w, bits in (("its group", 0o070), ("other users", 0o007))
                       if st.st_mode & bits)
    raise ConfigError(
        f"{what} {path} is accessible to {who} (mode {mode:04o}, expected 0600): "
        f"run `chmod 600 {path}`, or set allow_world_readable_secrets = true in the "
        "node config to accept it"
    )


def load_or_create_secret(cfg: NodeConfig, *, create: bool) -> bytes:
    """The 32-byte cluster secret: `rpc_secret`, else the secret file.

    With `create` (the node itself, on first start) a missing secret file is made
    with 32 random bytes, written atomically with mode 0600.
    """
    if cfg.rpc_secret:
        return bytes.fromhex(cfg.rpc_secret)
    path = Path(cfg.secret_file)
    try:
        check_private_file(path, "cluster secret file",
                           allow_world_readable=cfg.allow_world_readable_secrets)
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if not create:
            raise ConfigError(
                f"no cluster secret: {path} does not exist (start the node once to create it, "
                "or set rpc_secret / rpc_secret_file)"
            ) from None
        path.parent.mkdir(parents=True, exist_ok=True)
        text = os.urandom(32).hex()
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (text + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return bytes.fromhex(text)
    except UnicodeDecodeError:  # its message would quote a byte of the secret
        raise ConfigError(f"cluster secret file {path}: expected 64 hex characters, "
                          "found bytes that are not ASCII") from None
    except OSError as exc:
        raise ConfigError(f"cluster secret file {path} cannot be read: {exc.strerror or exc}") from None
    if not _is_secret(text):
        raise ConfigError(f"cluster secret file {path}: expected 64 hex characters, "
                          f"got {_describe_secret(text)}")
    return bytes.fromhex(text)
