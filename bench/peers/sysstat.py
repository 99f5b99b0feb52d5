"""CPU accounting from /proc for the peer comparison (Linux only, stdlib only).

`CpuWindow` measures, over an interval, the CPU seconds of this process (the load
generator), of given process groups (the servers: each was started with
``setsid``, so its group id is its pid and every worker it forks is counted), of
irq/softirq and kernel threads, and what is left: "foreign" load from other
tenants of the machine, so a figure can say how noisy its machine was.
"""

from __future__ import annotations

import os
import time
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_jiffies() -> tuple[int, int, int]:
    """(busy, total, irq+softirq) jiffies summed over all CPUs."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, total, vals[5] + vals[6]


def _stat_fields(pid: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def kernel_threads_cpu_seconds() -> float:
    """CPU seconds of kernel threads (children of kthreadd: jbd2, kworker, ksoftirqd...)."""
    tot = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            rest = _stat_fields(name)
            if rest is not None and (rest[1] == "2" or name == "2"):
                tot += int(rest[11]) + int(rest[12])
    return tot / CLK_TCK


def group_cpu_seconds(pgids: list[int]) -> float:
    """utime+stime (+ reaped children) of every live process whose group is in `pgids`."""
    want = set(pgids)
    tot = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            rest = _stat_fields(name)
            if rest is not None and int(rest[2]) in want:  # field 5 = pgrp
                tot += sum(int(rest[i]) for i in (11, 12, 13, 14))
    return tot / CLK_TCK


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


class CpuWindow:
    """``with CpuWindow(pgids) as w: ...`` then ``w.result()`` -> dict of CPU seconds."""

    def __init__(self, pgids: list[int] | tuple[int, ...] = ()) -> None:
        self.pgids = list(pgids)

    def _sample(self) -> tuple[float, tuple[int, int, int], float, os.times_result, float]:
        return (time.monotonic(), machine_busy_jiffies(), kernel_threads_cpu_seconds(), os.times(),
                group_cpu_seconds(self.pgids) if self.pgids else 0.0)

    def __enter__(self) -> CpuWindow:
        self.s0 = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s1 = self._sample()

    def result(self) -> dict[str, Any]:
        """wall_s, client_cpu_s, server_cpu_s, irq_softirq_s, kernel_threads_s,
        machine_busy_cores and foreign_busy_cores (None under 1 s: /proc ticks at 10 ms)."""
        (t0, m0, k0, me0, g0), (t1, m1, k1, me1, g1) = self.s0, self.s1
        wall = t1 - t0
        me = (me1.user - me0.user) + (me1.system - me0.system)
        grp = max(0.0, g1 - g0)
        irq = (m1[2] - m0[2]) / CLK_TCK
        kth = max(0.0, k1 - k0)
        out: dict[str, Any] = {"wall_s": round(wall, 4), "client_cpu_s": round(me, 3),
                               "server_cpu_s": round(grp, 3) if self.pgids else None,
                               "irq_softirq_s": round(irq, 3), "kernel_threads_s": round(kth, 3),
                               "machine_busy_cores": None, "foreign_busy_cores": None}
        if wall >= 1.0:
            busy = (m1[0] - m0[0]) / CLK_TCK
            out["machine_busy_cores"] = round(busy / wall, 3)
            out["foreign_busy_cores"] = round(max(0.0, busy - me - grp - irq - kth) / wall, 3)
        return out


def wait_quiet(max_wait_s: float, threshold_cores: float = 0.2,
               exclude_pgids: list[int] | tuple[int, ...] = ()) -> dict[str, Any]:
    """Wait until the machine minus `exclude_pgids` was busy under `threshold_cores` for
    one second, or `max_wait_s` passed -> {"waited_s", "busy_cores_at_start", "quiet"}."""
    t0 = time.monotonic()
    while True:
        with CpuWindow(exclude_pgids) as w:
            time.sleep(1.0)
        r = w.result()
        busy = (r["machine_busy_cores"] or 0) - (r["server_cpu_s"] or 0) / r["wall_s"]
        if busy < threshold_cores or time.monotonic() - t0 >= max_wait_s:
            return {"waited_s": round(time.monotonic() - t0, 1),
                    "busy_cores_at_start": round(busy, 3), "quiet": busy < threshold_cores}
