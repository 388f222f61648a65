"""Worker liveness: a heartbeat file touched from the consumer's own timer, and the check that reads it.

``celery inspect ping`` proves that a worker answers over the broker, but it costs a broker round trip per
probe and needs the worker's node name. This check proves more, locally: the file is touched by a timer of
the consumer's event loop (the same loop that receives and acknowledges messages), so it goes stale when that
loop is stuck or the consumer has stopped, even while the process itself is still alive.

- ``Heartbeat``: a consumer bootstep (registered in ``worker/app.py``) touching ``SLUICE_WORKER_HEARTBEAT_FILE``
  (default ``/tmp/sluice-worker-heartbeat``) every ``SLUICE_WORKER_HEARTBEAT_S`` seconds (default 10);
- ``sluice liveness --max-age 60`` (sluice/cli.py): exit 0 if the file was touched within the last 60 s,
  else 1 with the reason (the compose healthcheck runs it).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from celery import bootsteps

log = logging.getLogger("sluice.worker.liveness")

DEFAULT_FILE = "/tmp/sluice-worker-heartbeat"  # noqa: S108 - a liveness marker, not a secret; one per container


def heartbeat_file() -> Path:
    return Path(os.environ.get("SLUICE_WORKER_HEARTBEAT_FILE", DEFAULT_FILE))


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


class Heartbeat(bootsteps.StartStopStep):
    """Touch the heartbeat file from the consumer's timer once the consumer has started consuming."""

    # After the step that starts consuming: a fresh file then means "consuming", not merely "imported".
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.path = heartbeat_file()
        self.interval = float(os.environ.get("SLUICE_WORKER_HEARTBEAT_S", "10"))
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        self._beat()
        self.tref = parent.timer.call_repeatedly(self.interval, self._beat)

    def _beat(self) -> None:
        try:
            touch(self.path)
        except OSError as exc:  # a full or read-only disk must not stop the consumer: the check will say so
            log.warning("could not touch the liveness file %s: %s", self.path, exc)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        # A consumer that stopped (shutdown, or a restart after a lost broker connection) is not live.
        self.path.unlink(missing_ok=True)


def check(path: Path, max_age_s: float, now: float | None = None) -> str | None:
    """None when the heartbeat is fresh, else why not."""
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return f"no heartbeat file at {path}: the consumer has not started, or has stopped"
    if age > max_age_s:
        return f"heartbeat {age:.0f} s old (limit {max_age_s:g} s): the consumer's loop is stuck"
    return None


if __name__ == "__main__":
    from sluice.cli import main

    sys.exit(main(["liveness", *sys.argv[1:]]))
