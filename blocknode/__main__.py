"""`python -m blocknode`: the command line (see `blocknode.cli`)."""

import sys

from blocknode.cli import PROG_MODULE, main

sys.exit(main(prog=PROG_MODULE))
