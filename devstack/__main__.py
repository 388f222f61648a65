"""``python -m devstack ARGS``: the same as ``sluice dev ARGS`` (kept for scripts that still call it)."""

from __future__ import annotations

import sys

from sluice.cli import main

if __name__ == "__main__":
    sys.exit(main(["dev", *sys.argv[1:]]))
