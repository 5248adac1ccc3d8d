"""``python -m bench.ha_live``: the Home Assistant live run (see :mod:`bench.ha_live.run`)."""

import sys

from bench.ha_live.run import main

sys.exit(main())
