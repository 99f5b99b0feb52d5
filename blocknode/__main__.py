"""`python -m blocknode`: the command line (see `blocknode.cli`)."""

import sys

from blocknode.cli import main

sys.exit(main())
