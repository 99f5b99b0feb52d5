"""The peer comparison: blocknode and OpenStack Swift, same load generator, one run.

`bench.peers.run` (``python -m bench peers``) orchestrates; `loadgen` is the one
load generator, `backends` the two systems it drives, `sysstat` CPU accounting
from /proc, `report` the tables, `swift/setup.sh` / `swift/stop.sh` bring up and
stop a 3-node Swift 2.30 (Debian packages) on 127.0.0.1.
"""
