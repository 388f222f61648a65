"""``python -m worker``: kept as ``sluice worker`` (sluice/cli.py), so ``--help`` never starts one."""

from __future__ import annotations

import sys

from sluice.cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
