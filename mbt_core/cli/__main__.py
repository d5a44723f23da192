"""``python -m mbt_core.cli``: the ``mbt`` command."""

import sys

from mbt_core.cli.main import main

sys.exit(main())
