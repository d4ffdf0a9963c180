"""`python -m tools.simulator ...`: the exchange simulator's command line."""

import sys

from tools.simulator.server import main

sys.exit(main())
