"""``python -m scarletstore``: the command line, as the ``scarletstore`` script."""

import sys

from .cli import run

sys.exit(run())
