"""``python -m simulator``: serve the simulated upstream (``--help`` lists the options)."""

import sys

from simulator.server import main

sys.exit(main())
