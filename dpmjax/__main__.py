"""``python -m dpmjax``: the command line of :mod:`dpmjax.cli`."""

import sys

from .cli import main

sys.exit(main())
