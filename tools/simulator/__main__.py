"""`python -m tools.simulator ...`: the exchange simulator's command line."""

import sys

from tools.simulator.cli import main

sys.exit(main())
