"""``python -m flows.cli``: the same as the ``atr`` entry point."""

import sys

from . import main

sys.exit(main())
