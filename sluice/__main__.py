"""``python -m sluice``: the ``sluice`` command (sluice/cli.py), for where the console script is not on PATH."""

from __future__ import annotations

import sys

from sluice.cli import main

sys.exit(main())
