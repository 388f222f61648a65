"""The clients of one worker process: made on first use in that process, closed when it shuts down.

A Cassandra session holds sockets and I/O threads that must never cross a fork, so each pool process opens
its own after the fork (``worker_process_init`` in worker/app.py) and never uses one it inherited.
"""

from __future__ import annotations

import logging
import os

import redis

from sluice import broker
from sluice.cassandra import Store
from sluice.marks import Marks
from sluice.settings import Settings, get_settings
from worker.writer import EventWriter

log = logging.getLogger("sluice.worker")


class ProcessClients:
    """Clients of the current process, (re)made when first used in a new process."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pid = 0
        self._writer: EventWriter | None = None
        self._redis: redis.Redis | None = None
        self._marks: Marks | None = None

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            # Inherited from a parent across fork: unusable here, and must not be closed from here either.
            self._writer = None
            self._redis = None
            self._marks = None
            self._pid = os.getpid()

    @property
    def writer(self) -> EventWriter:
        self._check_pid()
        if self._writer is None:
            store = Store.open(self._settings)
            self._writer = EventWriter(store, self._settings.write_concurrency)
            log.info("process %d connected to Cassandra at %s", os.getpid(), self._settings.cassandra_contact_points)
        return self._writer

    @property
    def redis(self) -> redis.Redis:
        self._check_pid()
        if self._redis is None:
            self._redis = broker.sync_client(self._settings)
        return self._redis

    @property
    def marks(self) -> Marks:
        self._check_pid()
        if self._marks is None:
            self._marks = Marks(self.redis)
        return self._marks

    def close(self) -> None:
        if self._pid == os.getpid():
            if self._writer is not None:
                self._writer.store.close()
            if self._redis is not None:
                broker.close(self._redis)
        self._writer = None
        self._redis = None
        self._marks = None


clients = ProcessClients(get_settings())
