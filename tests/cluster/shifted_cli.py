"""The command line on a machine whose clock is off: ``python -m tests.cluster.shifted_cli
SECONDS ARGS...`` runs ``blocknode ARGS...`` with `time.time` and `time.time_ns` shifted
by SECONDS (the clock a misconfigured client machine would have)."""

from __future__ import annotations

import sys
import time


def main() -> int:
    shift = float(sys.argv[1])
    real_time, real_time_ns = time.time, time.time_ns
    time.time = lambda: real_time() + shift  # type: ignore[assignment]
    time.time_ns = lambda: real_time_ns() + int(shift * 1e9)  # type: ignore[assignment]
    from blocknode.cli import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
