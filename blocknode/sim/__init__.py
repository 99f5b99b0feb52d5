"""Deterministic simulation of a whole blocknode cluster in one process (issue 11).

``python -m blocknode.sim --seeds N --nodes 5 --jobs 2`` / ``--seed S --trace`` /
``--hours H`` (modules: `run` one seed, `net` the network, `bounds` the memory
budget, `batch` many seeds in worker processes and the table).

What runs: 3–7 real `blocknode.node.Node`s (rf 3, one zone per node modulo 3) —
manager, metadata store on real LMDB, block files, resync, GC, anti-entropy,
scrub, repair, the RPC engine and handshakes — in ONE ``trio.run`` under
``trio.testing.MockClock(autojump_threshold=0)``. Only the seams of
`blocknode.context.NodeContext` are simulated:

- time: ``now_ms`` = a fixed epoch + the mock clock + a per-node skew (±2 s;
  the nemesis changes it, within ``max_clock_skew``);
- randomness: one seeded ``random.Random`` per node (jitter, nonces, key ids),
  the workload and the nemesis from the seed, and Trio's scheduler made
  deterministic (its batch shuffle seeded, as under Hypothesis);
- blocking calls: ``run_sync`` runs inline (no threads: the mock clock and the
  event order stay deterministic);
- network: `blocknode.sim.net` — in-memory streams through
  ``NodeContext.connect`` and a listener served with ``RpcNetwork.serve_listener``;
- disk: block files on a `blocknode.sim.disk.SimDisk` per node, through
  ``NodeContext.fs`` (an in-memory disk that knows what was fsynced: see
  below); the metadata on real LMDB in a temp dir (tmpfs when there is one).
  Both durable as in production: ``data_fsync`` and ``metadata_fsync`` on.

The same seed gives the same run event for event (the event trace's digest;
checked by ``tests/sim``).

Fault kinds (the nemesis, seeded): crash + restart after 2–40 s (at most two
nodes down at once), a power cut in the middle of a node's disk work (the
disk stops after 1–12 more changes and the node is cancelled inside that
call), crash with loss of the data dir or of the metadata dir
(one node per seed: the *victim*), bit flips in the victim's block files,
the victim's disk full (ENOSPC), failing (EIO) or read-only (EROFS) for
5–30 s (after EIO, which takes its data dir out of service, the node is
restarted once the disk is back: the operator's step),
symmetric partitions and one-way link blocks (5–40 s), clogged links (+0.2–3 s
latency), connection resets, clock skew changes. Budget: destructive faults
(disk loss, bit flips) hit one node only, so rf 3 with write quorum 2 must
lose nothing; a loss with a larger budget would be counted apart ("beyond
fault budget").

Crash semantics, honestly: a crash cancels the node's Trio scope and breaks
its streams, and is a *machine* crash for its block files: the SimDisk keeps
what was fsynced (file data by the file's fsync, names by the directory's)
and, seeded, keeps, drops or tears each file's un-synced data and keeps or
reverts each un-synced directory entry (counted as ``lost_unsynced``). With
``data_fsync`` on, the node syncs everything before it answers, so only a
power cut mid-write or a failed write leaves un-synced items. The metadata:
every LMDB commit is fsync'd, so a crash keeps exactly the state at the last
commit (LMDB's guarantee; a commit cut in half and torn LMDB pages are not
simulated — LMDB's copy-on-write pages and meta-page switch are what guard
against them). After a power cut, commits already submitted may still land
(their shielded writer runs on); each depends only on disk changes made
before the cut, which is an order a real crash can produce too. The node's
``finally`` blocks do run on cancellation (the LMDB env is closed), which a
crash would not do; LMDB's on-disk state does not depend on it.

Stream-level faults: TCP cannot silently drop, duplicate or reorder bytes, so
those show up as resets, stalls and delays here (and duplicated requests as
client retries); bytes are delivered in order, in random pieces.

Schedules: the *short* one (`run.SHORT`, `SimConfig.short`; what CI runs 1000 of
and the command line's default) — 16 client operations from 3 clients, a fault
every 1.5 s on average during ~8-30 s of chaos, one round per heal step, a 30 s
GC delay, gossip every 60 s: ~55 simulated seconds, ~0.3-0.6 CPU-s per seed. The
*full* one (`SimConfig` defaults) — 40 operations, a fault every 6 s, two rounds
per heal step, a 60 s GC delay: ~2 simulated minutes.

Layout changes (``--layout-changes``, `blocknode.sim.layout_nemesis`): a spare
node joins with ``bootstrap_peers``; nodes are added, removed and re-weighted
through the admin RPCs during the chaos, sometimes with a crash mid-migration;
the heal waits for the migration to finish, and the checks add "migration
stuck" and "misplaced" (a reference or a live block's copy on a node the final
layout does not give it).

Phases: chaos (workload + nemesis) → heal (partitions and clogs lifted, every
node restarted, retry-now + anti-entropy + resync rounds, a full scrub, rounds) →
quiesce (past the GC delay, rounds) → checks. Checked continuously, during every
phase (safety properties):

- a GC or offload deletion (`LocalBlocks.delete_if_deletable`, wrapped on each
  node instance by `Sim.watch_gc`; also: none sooner than gc_delay after the last
  reference's deletion) of a block the client holds a live
  acknowledged, protected reference to, on a node that is one of its replicas
  (the reference live before the deletion began and still live after it);
- a get returning bytes that do not match the hash;
- the memory budget: every `bounds_every` simulated seconds each running node's
  bounded structures (`bounds.node_bounds`) are within their bounds; with
  `SimConfig.tracemalloc`, the seed's heap peak is under `run.HEAP_BUDGET`;
- a node task stopping or dying on its own.

After healing:

- LOST: a block an acknowledged put stored, with a live reference, is held
  intact (read and verified) by fewer than write-quorum nodes;
- unconverged: a live reference is missing or deleted on one of its replicas;
- not collected: a block all of whose references were deleted (and acked) is
  still on a node, gc_delay + `run.GC_BOUND` after the last deletion;
- rc mismatch: a node's RC differs from its count of live references;

Also checked as they happen (without a checkpoint, so the schedule is unchanged):

- S1 at ack: when a put is acknowledged, a write quorum of its replicas holds an
  intact copy (replicas that crashed, restarted or had a bit flipped meanwhile
  are given the benefit of the doubt);
- S3 at each deletion: a replica never deletes a block while an acknowledged
  live reference to it exists, nor sooner than gc_delay - op timeout - 2×skew
  after the acknowledgement of its last reference's deletion;
- S6 before each client operation: a node's resync workers are never all idle
  while an entry has been due for over 2 s (a lost wake-up);
- scrub coverage: the heal runs `scrub start`, then `scrub cancel` and `scrub
  start` while the first run's step is in a slow read; the second run must
  check every block held throughout it.

Defects (issue 11): ``--defect NAME`` / ``SimConfig.defects`` re-introduce a
fixed defect of the hardening issue behind its test-only switch
(`blocknode.defects`); the README's "caught by the sim" table says which seeds
catch which. Workload options that reach some of them: ``--hot-refs N
--hot-down`` (a popular block's references land while one of its replicas is
down), ``--worker-bug`` (each node's scrub worker raises once: supervision).
After a bit flip the nemesis puts the flipped block again at once, with
another of its replicas down if the fault budget allows (C.10's scenario); a
re-reference prefers a block released just now (consuming the seed's
randomness as before).
"""
