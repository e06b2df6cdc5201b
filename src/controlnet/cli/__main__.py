"""``python -m controlnet.cli``: the ``controlnet`` command."""

import sys

from . import main

sys.exit(main())
