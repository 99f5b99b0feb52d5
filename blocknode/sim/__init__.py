"""Deterministic simulation of a whole blocknode cluster in one process (issue 11).

``python -m blocknode.sim --seeds N --nodes 5`` / ``--seed S --trace``.

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
- disk: a temp dir per node (real LMDB, real files).

The same seed gives the same run event for event (the event trace's digest;
checked by ``tests/sim``).

Fault kinds (the nemesis, seeded): crash + restart after 2–40 s (at most two
nodes down at once), crash with loss of the data dir or of the metadata dir
(one node per seed: the *victim*), bit flips in the victim's block files,
symmetric partitions and one-way link blocks (5–40 s), clogged links (+0.2–3 s
latency), connection resets, clock skew changes. Budget: destructive faults
(disk loss, bit flips) hit one node only, so rf 3 with write quorum 2 must
lose nothing; a loss with a larger budget would be counted apart ("beyond
fault budget").

Crash semantics, honestly: a crash cancels the node's Trio scope and breaks
its streams; the process survives, so everything written to the page cache
(un-fsynced files, LMDB commits without fsync) survives too — this is a
*process* crash (kill -9), not a machine crash. Lost un-fsynced writes,
renames not yet directory-synced, torn pages, ENOSPC/EIO and a read-only
disk are not simulated (they need an in-memory disk behind the storage
seam). The node's ``finally`` blocks do run on cancellation (the LMDB env is
closed), which kill -9 would not do; LMDB's on-disk state does not depend on it.

Stream-level faults: TCP cannot silently drop, duplicate or reorder bytes, so
those show up as resets, stalls and delays here (and duplicated requests as
client retries); bytes are delivered in order, in random pieces.

Layout changes (``--layout-changes``, `blocknode.sim.layout_nemesis`): a spare
node joins with ``bootstrap_peers``; nodes are added, removed and re-weighted
through the admin RPCs during the chaos, sometimes with a crash mid-migration;
the heal waits for the migration to finish, and the checks add "migration
stuck" and "misplaced" (a reference or a live block's copy on a node the final
layout does not give it).

Phases: chaos (workload + nemesis) → heal (partitions and clogs lifted, every
node restarted, retry-now + anti-entropy + resync rounds, a full scrub) →
quiesce (past the GC delay) → checks:

- LOST: a block an acknowledged put stored, with a live reference, is held
  intact (read and verified) by fewer than write-quorum nodes;
- unconverged: a live reference is missing or deleted on one of its replicas;
- not collected: a block all of whose references were deleted (and acked) is
  still on a node, gc_delay + `run.GC_BOUND` after the last deletion;
- a get returned bytes that do not match the hash (checked on every get);
- rc mismatch: a node's RC differs from its count of live references;
- a node task stopped or died on its own.
"""
