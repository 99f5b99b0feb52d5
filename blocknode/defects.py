"""Test-only switches that re-introduce fixed defects, one at a time (issue 11).

Each name below is a defect of the hardening issue (issue 9), fixed on main;
the code at the exact place of its fix checks ``NAME in ACTIVE`` and, when the
switch is on, behaves as it did before the fix. `ACTIVE` is empty in every
real node: only the simulation (``python -m blocknode.sim --defect NAME``,
``SimConfig.defects``) and tests set it, through `active`, which restores it.
That is how the README's "caught by the sim" table is measured: which seeds
of the simulation catch which defect, and which invariant fires.

The check is a frozenset membership, on paths where it costs nothing next to
the work around it (an LMDB commit, an RPC, a disk read).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

__all__ = ["ACTIVE", "DEFECTS", "active", "on"]

DEFECTS: dict[str, str] = {
    "c8-ae-unpaged": "C.8: an anti-entropy exchange carries every ref of a range in one "
                     "message head, and a failed range abandons the rest of the round with that peer",
    "c9-absent-rc-deletable": "C.9: a block held with no RC record is deletable at once, and a "
                              "replica that still references it does not stop the deletion",
    "c10-reput-unverified": "C.10: a put over a copy already held answers 'already stored' "
                            "without verifying it",
    "c11-ref-without-lock": "C.11: references are applied without the block lock (racing a "
                            "deletion between its check and its unlink)",
    "c12-plain-notify": "C.12: the resync worker's wake-up ignores its snapshot (a commit "
                        "between the queue check and the wait is lost)",
    "c13-scrub-stale-step": "C.13: a scrub step of a cancelled run goes on with its stale batch "
                            "in the new run",
    "a3-no-supervision": "A.3: an exception in a worker step reaches the node's nursery",
    "e-put-one-replica": "E: a put is acknowledged after one replica (found on the single-block "
                         "path; re-introduced on the batched path too, which the sim's small "
                         "blocks take)",
    "e-gc-ignores-delay": "E: GC deletes a block as soon as its RC is zero, ignoring gc_delay",
}
"""Every switch, with the defect it re-introduces."""

ACTIVE: frozenset[str] = frozenset()
"""The defects re-introduced right now (empty: the fixed code)."""


def on(name: str) -> bool:
    """True when defect `name` is re-introduced (a frozenset membership)."""
    return name in ACTIVE


@contextmanager
def active(names: Iterable[str]) -> Iterator[frozenset[str]]:
    """Re-introduce the defects `names` for the duration of the block (tests and the sim)."""
    global ACTIVE
    wanted = frozenset(names)
    unknown = sorted(wanted - DEFECTS.keys())
    if unknown:
        raise ValueError(f"unknown defect(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(DEFECTS))})")
    saved = ACTIVE
    ACTIVE = wanted
    try:
        yield wanted
    finally:
        ACTIVE = saved
