"""Logging set-up shared by every Sluice process: one line per record, with the process's role."""

from __future__ import annotations

import logging
import sys

from sluice.settings import get_settings


def setup_logging(level: str | None = None) -> None:
    level = level or get_settings().log_level
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        force=True,
    )
    # The driver logs every reconnection attempt at WARNING; keep them, but silence its chatter below that.
    logging.getLogger("cassandra").setLevel(max(logging.getLogger().level, logging.WARNING))
