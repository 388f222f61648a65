"""``python -m api``: kept as ``sluice api`` (sluice/cli.py), so ``--help`` never starts one."""

from __future__ import annotations

import sys

from sluice.cli import main

sys.exit(main(["api", *sys.argv[1:]]))
