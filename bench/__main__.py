"""``python -m bench [--quick]``: the benchmark suite (see :mod:`bench.run`)."""

import sys

from bench.run import main

sys.exit(main())
