"""Metrics and health: what a node exposes on its admin HTTP listener.

Each `Node` owns one `NodeMetrics`: a `prometheus_client.CollectorRegistry` of
its own (never the global one: several nodes run in one test or simulation
process) holding

- the event metrics, updated where the event happens (`Node.dispatch` counts
  every request by who sent it, kind and outcome, its payload bytes and its
  duration; put and get latency; quorum failures);
- `NodeCollector`, which reads the node's existing state at scrape time (block
  store, resync, GC, scrub, anti-entropy, workers, peers, connections, RAM
  budgets, LMDB map use): nothing to keep in step with the code that changes
  that state, which only keeps plain counters (`manager.hedged_reads`,
  `resync.deleted`, ...).

`health_problem(node)` is the `/health` answer: None when the node can serve
reads and writes at quorum (its foundations are sound and, for every
partition, at least `write_quorum` of its nodes are up), else the reason.

`serve_admin_http` is the listener (`admin_api_bind_addr`): HTTP/1.1 parsed by
`h11` (the sans-I/O HTTP library: it does the protocol, we do the I/O on Trio
streams, so no second event loop or framework), answering

    GET /metrics   the Prometheus text exposition (`generate_latest`); with
                   `metrics_token` set, only with ``Authorization: Bearer TOKEN``
    GET /health    200 ``ok``, or 503 and the reason (no token: load balancers
                   and systemd probes ask it)

Metric names follow the Prometheus conventions (``blocknode_…_total`` for
counters, ``_seconds``, ``_bytes``); README's "Metrics" lists them, and
``deploy/grafana-dashboard.json`` graphs the main ones.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import h11
import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from blocknode.errors import (
    BlockCorrupted,
    BlocknodeError,
    BlockNotFound,
    Forbidden,
    ProtocolError,
    QuorumError,
    RpcTimeout,
)

if TYPE_CHECKING:
    from blocknode.node import Node

log = logging.getLogger(__name__)

__all__ = ["NodeCollector", "NodeMetrics", "health_problem", "outcome_of", "serve_admin_http"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0)
PUT_KINDS = frozenset({"client_put", "client_put_many", "client_put_direct"})
GET_KINDS = frozenset({"client_get", "client_get_direct"})
_MAX_CHILDREN = 4096
OTHER_KIND = "other"  # the label of a kind no handler knows (never the raw string: cardinality)


def outcome_of(exc: BaseException) -> str:
    """The `outcome` label of a failed request (a small fixed set)."""
    if isinstance(exc, trio.Cancelled):
        return "cancelled"
    for cls, name in ((QuorumError, "quorum_failed"), (BlockNotFound, "not_found"),
                      (BlockCorrupted, "corrupt"), (Forbidden, "forbidden"),
                      (ProtocolError, "bad_request"), (RpcTimeout, "timeout"),
                      (BlocknodeError, "error")):
        if isinstance(exc, cls):
            return name
    return "internal"


class NodeMetrics:
    """One node's registry and its event metrics (see module docstring)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "blocknode_requests", "Requests this node handled, by source (client or node), "
            "kind and outcome (ok, not_found, quorum_failed, bad_request, forbidden, ...)",
            ["source", "kind", "outcome"], registry=r)
        self.request_seconds = Histogram(
            "blocknode_request_duration_seconds", "Time to handle a request, by source and kind",
            ["source", "kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.received_bytes = Counter(
            "blocknode_request_received_bytes", "Payload bytes received in requests, by source",
            ["source"], registry=r)
        self.sent_bytes = Counter(
            "blocknode_reply_sent_bytes", "Payload bytes sent in replies, by source of the request",
            ["source"], registry=r)
        self.put_seconds = Histogram(
            "blocknode_put_duration_seconds", "Client puts: time to store at the write quorum",
            buckets=LATENCY_BUCKETS, registry=r)
        self.get_seconds = Histogram(
            "blocknode_get_duration_seconds", "Client gets: time to read a verified copy",
            buckets=LATENCY_BUCKETS, registry=r)
        self.quorum_failures = Counter(
            "blocknode_quorum_failures", "Requests that failed because too few nodes answered, "
            "by kind", ["kind"], registry=r)
        r.register(NodeCollector(node))
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def request(self, *, from_node: bool, kind: str, known: bool,
                data: bytes | None) -> _RequestTimer:
        """Measure one request: ``with m.request(...) as replied: ...; replied(reply_data)``."""
        source = "node" if from_node else "client"
        if data:
            self._child(self.received_bytes, source).inc(len(data))
        return _RequestTimer(self, source, kind if known else OTHER_KIND, kind)

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: prometheus_client's `labels()` costs ≈ 10 µs
        (validation, a lock), and every request would call it three or four times."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            if len(self._children) >= _MAX_CHILDREN:  # labels come from fixed sets; belt and braces
                return metric.labels(*labels)
            child = self._children[key] = metric.labels(*labels)
        return child

    def count_quorum_failures(self, kind: str, n: int) -> None:
        """Items of a batch request (`kind`) that failed for want of a quorum."""
        if n:
            self.quorum_failures.labels(kind).inc(n)

    def exposition(self) -> bytes:
        """The Prometheus text format of everything."""
        return generate_latest(self.registry)


class _RequestTimer:
    """The context of `NodeMetrics.request`: counts the outcome and the duration on exit;
    calling it with the reply's data counts the bytes sent."""

    __slots__ = ("m", "source", "label", "kind", "start")

    def __init__(self, m: NodeMetrics, source: str, label: str, kind: str) -> None:
        self.m, self.source, self.label, self.kind = m, source, label, kind
        self.start = 0.0

    def __enter__(self) -> Callable[[bytes | None], None]:
        self.start = time.perf_counter()
        return self

    def __call__(self, out: bytes | None) -> None:
        if out:
            self.m._child(self.m.sent_bytes, self.source).inc(len(out))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> None:
        m, source, label = self.m, self.source, self.label
        if exc is not None:
            outcome = outcome_of(exc)
            if outcome == "quorum_failed":
                m._child(m.quorum_failures, label).inc()
            m._child(m.requests, source, label, outcome).inc()
            return
        m._child(m.requests, source, label, "ok").inc()
        elapsed = time.perf_counter() - self.start
        m._child(m.request_seconds, source, label).observe(elapsed)
        if self.kind in PUT_KINDS:
            m.put_seconds.observe(elapsed)
        elif self.kind in GET_KINDS:
            m.get_seconds.observe(elapsed)


def _g(name: str, doc: str, value: float | None = None, labels: list[str] | None = None
       ) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value, labels=labels)


def _c(name: str, doc: str, value: float | None = None, labels: list[str] | None = None
       ) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value, labels=labels)


class NodeCollector(Collector):
    """The node's state, read at scrape time from what it keeps anyway."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Any]:  # noqa: C901 - one flat list of metrics
        n = self.node
        info = InfoMetricFamily("blocknode_build", "The node's id, version and hash implementation")
        from blocknode import __version__, fastpath
        info.add_metric([], {"node_id": n.node_id, "version": __version__,
                             "fast_path": fastpath.IMPLEMENTATION})
        yield info
        problem = health_problem(n)
        yield _g("blocknode_healthy", "1 when the node can serve reads and writes at quorum "
                 "(/health answers 200)", 0.0 if problem else 1.0)
        yield _g("blocknode_uptime_seconds", "Seconds since the node started",
                 time.monotonic() - n.started_monotonic)

        # ---- block store
        try:
            counts = n.meta.counts()
        except Exception:  # noqa: BLE001 - the metadata store failing: health says so
            counts = {}
        dirs = n.files.dir_status()
        yield _g("blocknode_blocks", "Blocks stored on this node (files and inline)", n.blocks.count())
        yield _g("blocknode_inline_blocks", "Small blocks stored inline in LMDB",
                 counts.get("inline_blocks", 0))
        yield _g("blocknode_rc_entries", "Block reference-count entries", counts.get("rc_entries", 0))
        yield _g("blocknode_refs", "References (live and deleted) kept here", counts.get("refs", 0))
        yield _g("blocknode_block_bytes", "Bytes of block files in the data directories",
                 sum(d["bytes"] or 0 for d in dirs))
        by_dir = [
            (_g("blocknode_data_dir_blocks", "Block files per data directory", labels=["path"]),
             lambda d: d["blocks"]),
            (_g("blocknode_data_dir_bytes", "Bytes of block files per data directory", labels=["path"]),
             lambda d: d["bytes"]),
            (_g("blocknode_data_dir_free_bytes", "Free bytes on each data directory's filesystem",
                labels=["path"]), lambda d: d["free"]),
            (_g("blocknode_data_dir_capacity_bytes", "Configured capacity of each data directory",
                labels=["path"]), lambda d: d["capacity"]),
            (_g("blocknode_data_dir_up", "1 when the data directory is in service", labels=["path"]),
             lambda d: 1 if d["state"] == "ok" else 0),
            (_c("blocknode_data_dir_errors", "I/O errors per data directory", labels=["path"]),
             lambda d: d["errors"]),
        ]
        for fam, get in by_dir:
            for d in dirs:
                v = get(d)
                if v is not None:
                    fam.add_metric([d["path"]], v)
            yield fam
        yield _c("blocknode_blocks_quarantined", "Corrupt copies found and quarantined (files "
                 "renamed .corrupted, inline entries dropped)",
                 sum(d["corrupted"] or 0 for d in dirs) + n.blocks.inline_corrupted)

        # ---- client path
        yield _c("blocknode_hedged_reads", "Reads that also asked the next node because the "
                 "first was slow (hedge_delay)", getattr(n.manager, "hedged_reads", 0))

        # ---- resync and GC
        rs = n.resync
        yield _g("blocknode_resync_queue_length", "Blocks queued for resync",
                 counts.get("resync_queue", 0))
        yield _g("blocknode_resync_errored_blocks", "Blocks whose last resync failed (block "
                 "list-errors)", counts.get("errors", 0))
        yield _c("blocknode_resync_processed", "Resyncs completed", rs.done)
        yield _c("blocknode_resync_errors", "Resyncs that failed (retried with backoff)", rs.failed)
        yield _c("blocknode_resync_retries", "Resyncs of a block that had failed before",
                 getattr(rs, "retries", 0))
        moved = _c("blocknode_resync_bytes", "Block bytes moved by resync: fetched here from "
                   "other nodes, or offloaded to them", labels=["direction"])
        for direction in ("fetched", "offloaded"):
            moved.add_metric([direction], getattr(rs, "bytes_moved", {}).get(direction, 0))
        yield moved
        yield _g("blocknode_resync_workers", "Resync worker tasks (resync-workers)", rs.workers)
        yield _g("blocknode_resync_tranquility", "Resync tranquility", rs.tranquility)
        yield _c("blocknode_gc_deleted_blocks", "Unneeded blocks deleted here",
                 getattr(rs, "deleted", 0))
        yield _c("blocknode_gc_offloaded_blocks", "Blocks sent to another write node before "
                 "being deleted here", getattr(rs, "offloaded", 0))

        # ---- scrub
        st = n.scrub.status()
        yield _g("blocknode_scrub_running", "1 while a scrub runs", 1 if st["state"] == "running" else 0)
        yield _g("blocknode_scrub_progress_ratio", "Progress of the current (or last) scrub, 0 to 1",
                 st["progress"])
        yield _g("blocknode_scrub_blocks_checked", "Blocks checked by the current (or last) scrub",
                 st["blocks_checked"])
        yield _c("blocknode_scrub_checked_bytes", "Block bytes read and verified by scrubs",
                 getattr(n.scrub, "bytes_checked", 0))
        yield _g("blocknode_scrub_corruptions", "Corrupt blocks found by the current (or last) scrub",
                 st["corruptions"])
        yield _g("blocknode_scrub_tranquility", "Scrub tranquility", st["tranquility"])
        if st.get("last_completed"):
            yield _g("blocknode_scrub_last_completed_timestamp_seconds",
                     "When the last scrub completed (Unix time)", st["last_completed"] / 1000)

        # ---- anti-entropy
        ae = n.anti_entropy
        yield _c("blocknode_anti_entropy_rounds", "Anti-entropy rounds done", ae.rounds)
        merged = _c("blocknode_anti_entropy_refs_merged", "References merged by anti-entropy: "
                    "into this node (here) or into its peers (there)", labels=["direction"])
        for direction in ("here", "there"):
            merged.add_metric([direction], getattr(ae, "merged", {}).get(direction, 0))
        yield merged

        # ---- workers
        busy = _g("blocknode_worker_busy", "1 while the worker is doing something", labels=["worker"])
        errs = _c("blocknode_worker_errors", "Errors each worker's steps raised", labels=["worker"])
        for w in n.workers.rows():
            busy.add_metric([w["name"]], 0 if w.get("state") in ("idle", "paused", "done") else 1)
            errs.add_metric([w["name"]], w.get("errors") or 0)
        yield busy
        yield errs

        # ---- peers and connections
        up = _g("blocknode_peer_up", "1 when the node is connected and answering", labels=["peer"])
        lat = _g("blocknode_peer_latency_seconds", "Ping round trip to each node (EWMA)",
                 labels=["peer"])
        for p in n.net.peer_status():
            up.add_metric([p["id"]], 1 if p["up"] else 0)
            if p["latency"] is not None:
                lat.add_metric([p["id"]], p["latency"])
        yield up
        yield lat
        cs = n.net.connection_status()
        conns = _g("blocknode_connections", "Incoming connections now, by kind of peer",
                   labels=["kind"])
        for kind in ("clients", "nodes", "handshaking"):
            conns.add_metric([kind.rstrip("s") if kind != "handshaking" else kind], cs[kind])
        yield conns
        yield _c("blocknode_connections_refused", "Connections refused by the connection caps",
                 cs["refused"])
        yield _c("blocknode_handshake_failures", "Incoming handshakes that failed",
                 cs["handshake_failures"])

        # ---- RAM budgets
        used = _g("blocknode_ram_buffer_used_bytes", "Block bytes held in RAM, by budget "
                  "(block_ram_buffer_max is split between them)", labels=["budget"])
        cap = _g("blocknode_ram_buffer_max_bytes", "Size of each RAM budget", labels=["budget"])
        net = n.net
        for name, b, u in (("send", net.budget, "used"), ("client", net.client_budget, "used"),
                           ("reply", net.reply_budget, "used"),
                           ("receive", net.receive_budget, "committed"),
                           ("client_receive", net.client_receive_budget, "committed")):
            used.add_metric([name], getattr(b, u, 0))
            cap.add_metric([name], b.max_bytes)
        yield used
        yield cap

        # ---- LMDB
        with contextlib.suppress(Exception):
            size, in_use = n.meta.env.map_usage()
            yield _g("blocknode_lmdb_map_size_bytes", "LMDB map size (lmdb_map_size)", size)
            yield _g("blocknode_lmdb_map_used_bytes", "LMDB map bytes in use (pages up to the "
                     "last one written)", in_use)


def health_problem(node: Node) -> str | None:
    """Why the node cannot serve reads and writes at quorum, or None (see module docstring)."""
    if node.addr is None:
        return "the node is starting"
    problem = node.foundations_problem()
    if problem is not None:
        return problem
    layout = node.layout
    from blocknode.layout import PARTITION_COUNT
    wq = layout.write_quorum
    up = {nid: node.net.is_up(nid) for nid in layout.node_ids}
    short = 0
    for p in range(PARTITION_COUNT):
        if sum(1 for nid in layout.partition_nodes(p) if up.get(nid)) < wq:
            short += 1
    if short:
        down = sorted(nid for nid, ok in up.items() if not ok)
        return (f"{short} of {PARTITION_COUNT} partitions have fewer than write_quorum={wq} "
                f"nodes up (down: {', '.join(down)})")
    return None


# ------------------------------------------------------------------ HTTP

MAX_REQUEST_HEAD = 16 * 1024
IDLE_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 64


def _response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
              extra: list[tuple[str, str]] | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
               ("Cache-Control", "no-store"), *(extra or [])]
    return status, headers, body


def handle_http(node: Node, method: str, target: str, headers: dict[str, str],
                token: str | None) -> tuple[int, list[tuple[str, str]], bytes]:
    """The answer to one admin HTTP request: (status, headers, body)."""
    path = target.split("?", 1)[0]
    if path not in ("/metrics", "/health"):
        return _response(404, b"not found: try /metrics or /health\n")
    if method not in ("GET", "HEAD"):
        return _response(405, b"method not allowed\n", extra=[("Allow", "GET, HEAD")])
    if path == "/health":
        problem = health_problem(node)
        if problem is None:
            return _response(200, b"ok\n")
        return _response(503, f"unavailable: {problem}\n".encode())
    if token is not None:
        given = headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                                 token.encode()):
            return _response(401, b"a bearer token is required (metrics_token)\n",
                             extra=[("WWW-Authenticate", 'Bearer realm="blocknode metrics"')])
    return _response(200, node.metrics.exposition(), CONTENT_TYPE_LATEST)


async def _http_connection(stream: trio.SocketStream, node: Node, token: str | None) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    try:
        while True:
            with trio.move_on_after(IDLE_TIMEOUT_S) as idle:
                event = conn.next_event()
                while event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(16384))
                    event = conn.next_event()
            if idle.cancelled_caught or isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                return
            method = event.method.decode("ascii", "replace")
            target = event.target.decode("ascii", "replace")
            headers = {k.decode("ascii", "replace").lower(): v.decode("latin-1")
                       for k, v in event.headers}
            # A GET has no body worth reading; drain whatever there is up to the end.
            with trio.move_on_after(IDLE_TIMEOUT_S):
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(16384))
                    elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                        break
            status, out_headers, body = handle_http(node, method, target, headers, token)
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=out_headers)))
            if method != "HEAD":
                await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        with contextlib.suppress(h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            status, out_headers, body = _response(exc.error_status_hint, b"bad request\n")
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=out_headers)))
            await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass
    finally:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.aclose()


async def serve_admin_http(node: Node, addr: str, token: str | None, *,
                           task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on `addr` ("host:port") and answer /metrics and /health until cancelled;
    `task_status.started(bound address)`."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    listeners = await trio.open_tcp_listeners(int(port), host=host)
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await stream.aclose()
            return
        try:
            await _http_connection(stream, node, token)
        finally:
            limiter.release()

    sockname = listeners[0].socket.getsockname()
    bound = f"{sockname[0]}:{sockname[1]}" if ":" not in sockname[0] else f"[{sockname[0]}]:{sockname[1]}"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handler, listeners)
        log.info("admin API listening on %s (/metrics, /health)", bound)
        task_status.started(bound)
