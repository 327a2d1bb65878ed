"""``python -m forvalue.bindings.cli``: the ``forvalue`` command."""

import sys

from .commands import main

sys.exit(main())
