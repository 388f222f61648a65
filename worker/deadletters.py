"""``python -m worker.deadletters``: kept as ``sluice dlq`` (sluice/cli.py; the records: sluice/deadletters.py)."""

from __future__ import annotations

import sys

from sluice.cli import main

if __name__ == "__main__":
    sys.exit(main(["dlq", *sys.argv[1:]]))
