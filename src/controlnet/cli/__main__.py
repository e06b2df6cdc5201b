"""``python -m controlnet.cli``: the ``controlnet`` command."""

import sys

from . import entry

sys.exit(entry())
