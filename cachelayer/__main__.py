"""``python -m cachelayer``: the same command as the ``cachelayer`` console script."""

import sys

from .cli import main

sys.exit(main())
