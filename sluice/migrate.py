"""Versioned schema migrations: ``sluice/migrations/NNNN_name.cql``, applied in order, each once.

``schema_migrations`` in the keyspace records each migration: its version, name, the checksum of its file,
who applied it and when. :func:`migrate` brings a keyspace to the newest version:

- A migration's file must never change once applied (the checksum is compared on every run, and a change
  is refused with :class:`MigrationError`): a change to the schema is a new migration, so every keyspace,
  whenever it was created, goes through the same statements.
- Two processes starting at once (two schema steps, or a deploy beside a developer) must not run one
  migration's DDL concurrently: concurrent schema changes are not safe in Cassandra. Each migration is
  *claimed* first with a lightweight transaction (``INSERT ... IF NOT EXISTS`` on its version row); the
  process that wins runs it, the others wait for the row to say ``applied``. A claim whose owner died
  (older than ``stale_after_s``) is taken over, again by LWT; that is safe because every statement of a
  migration is idempotent (``IF NOT EXISTS``), so a half-applied migration can be run again from the top.
- The keyspace and ``schema_migrations`` itself are created with ``IF NOT EXISTS`` before any claim can
  exist; that bootstrap is the one step two processes may race on, and only on an empty cluster.
- A keyspace made before migrations existed (it has the event tables but no ``schema_migrations``) is
  upgraded like any other: 0001 creates its tables only if they do not exist, so it records the baseline.

The statements of a file are separated by ``;`` at the end of a line; ``--`` lines are comments;
``${keyspace}`` stands for the keyspace.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any, Final

from cassandra import ConsistencyLevel
from cassandra.cluster import Session
from cassandra.query import SimpleStatement

log = logging.getLogger("sluice.migrate")

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.cql$")
#: A schema change waits this long for every node to agree on it.
SCHEMA_AGREEMENT_S: Final = 60


class MigrationError(RuntimeError):
    """The keyspace's recorded migrations do not match this code's: nothing was changed."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    @property
    def checksum(self) -> str:
        # Of the file as written (line endings normalised, so a checkout on Windows does not "change" it).
        return hashlib.sha256(self.text.replace("\r\n", "\n").encode()).hexdigest()

    def statements(self, keyspace: str) -> list[str]:
        body = "\n".join(line for line in self.text.splitlines() if not line.lstrip().startswith("--"))
        body = Template(body).substitute(keyspace=keyspace)
        return [part.strip() for part in re.split(r";\s*$", body, flags=re.MULTILINE) if part.strip()]


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations of a directory in version order; versions must run 1, 2, 3... without a gap."""
    found: list[Migration] = []
    for path in sorted(directory.iterdir()):
        match = _FILE.match(path.name)
        if match is None:
            if path.suffix == ".cql":
                raise MigrationError(f"{path.name}: a migration is named NNNN_name.cql (lower case)")
            continue
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(f"migration {migration.label}: expected version {expected:04d} (no gaps, no twins)")
    return found


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def wait_for_agreement(session: Session) -> None:
    # Every node must know a change before anyone prepares statements against it or builds on it.
    if not session.cluster.control_connection.wait_for_schema_agreement(wait_time=SCHEMA_AGREEMENT_S):
        raise RuntimeError(f"Cassandra nodes did not reach schema agreement within {SCHEMA_AGREEMENT_S} s")


def bootstrap(session: Session, keyspace: str, replication: dict[str, str | int]) -> None:
    replication_cql = "{" + ", ".join(f"'{k}': '{v}'" for k, v in replication.items()) + "}"
    session.execute(f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication_cql}", timeout=60)
    session.execute(
        f"""CREATE TABLE IF NOT EXISTS {keyspace}.schema_migrations (
            version int PRIMARY KEY,
            name text,
            checksum text,
            state text,
            owner text,
            claimed_at timestamp,
            applied_at timestamp
        )""",
        timeout=60,
    )
    wait_for_agreement(session)


class Migrator:
    """Applies migrations to one keyspace; ``run()`` returns the versions this process applied."""

    def __init__(
        self, session: Session, keyspace: str, migrations: Sequence[Migration], *, owner: str | None = None,
        wait_s: float = 300.0, stale_after_s: float = 600.0, poll_s: float = 0.5,
    ) -> None:  # fmt: skip
        self.session = session
        self.keyspace = keyspace
        self.migrations = list(migrations)
        self.owner = owner or _owner()
        self.wait_s = wait_s
        self.stale_after_s = stale_after_s
        self.poll_s = poll_s
        table = f"{keyspace}.schema_migrations"
        # LWTs and the reads that must see their outcome run at SERIAL: with several replicas, a plain read
        # could miss a claim another process just won.
        self._claim = session.prepare(
            f"INSERT INTO {table} (version, name, checksum, state, owner, claimed_at)"
            " VALUES (?, ?, ?, 'running', ?, ?) IF NOT EXISTS"
        )
        self._take_over = session.prepare(
            f"UPDATE {table} SET owner = ?, claimed_at = ?, checksum = ? WHERE version = ?"
            " IF state = 'running' AND owner = ?"
        )
        self._done = session.prepare(
            f"UPDATE {table} SET state = 'applied', applied_at = ? WHERE version = ? IF owner = ?"
        )
        self._read_one = session.prepare(f"SELECT * FROM {table} WHERE version = ?")
        self._read_one.consistency_level = ConsistencyLevel.SERIAL
        self._read_all = SimpleStatement(f"SELECT * FROM {table}", consistency_level=ConsistencyLevel.SERIAL)

    def recorded(self) -> dict[int, Any]:
        return {row.version: row for row in self.session.execute(self._read_all, timeout=60)}

    def check(self, recorded: dict[int, Any]) -> None:
        """Refuse to go on if a migration this code knows was recorded with another checksum."""
        known = {m.version: m for m in self.migrations}
        for version, row in sorted(recorded.items()):
            migration = known.get(version)
            if migration is None:
                # A newer release migrated this keyspace (a rollback): its migrations only add, so run on.
                log.warning("keyspace %s has migration %04d (%s), which this release does not know",
                            self.keyspace, version, row.name)  # fmt: skip
            elif row.checksum != migration.checksum:
                raise MigrationError(
                    f"migration {migration.label} was {row.state or 'recorded'} in keyspace {self.keyspace} with "
                    f"checksum {row.checksum[:12]}..., but sluice/migrations/{migration.label}.cql now has "
                    f"{migration.checksum[:12]}...: an applied migration must never change; restore the file "
                    "and put the change in a new migration"
                )

    def run(self) -> list[int]:
        self.check(self.recorded())
        applied: list[int] = []
        for migration in self.migrations:
            if self._apply(migration):
                applied.append(migration.version)
        return applied

    def _apply(self, migration: Migration) -> bool:
        """Apply one migration unless it is applied; True if this process applied it."""
        deadline = time.monotonic() + self.wait_s
        claimed = self.session.execute(
            self._claim, (migration.version, migration.name, migration.checksum, self.owner, _now()), timeout=60
        ).one()
        while not claimed.applied:
            row = self.session.execute(self._read_one, (migration.version,), timeout=60).one()
            self.check({migration.version: row})
            if row.state == "applied":
                return False
            claimed_at = row.claimed_at.replace(tzinfo=dt.UTC)
            if (_now() - claimed_at).total_seconds() > self.stale_after_s:
                # Its owner died mid-way (or hangs): its statements are idempotent, so run them again.
                log.warning("taking over migration %s, claimed by %s at %s and never finished",
                            migration.label, row.owner, claimed_at.isoformat())  # fmt: skip
                claimed = self.session.execute(
                    self._take_over,
                    (self.owner, _now(), migration.checksum, migration.version, row.owner),
                    timeout=60,
                ).one()
                continue
            if time.monotonic() > deadline:
                raise MigrationError(
                    f"migration {migration.label} is being applied by {row.owner} since {claimed_at.isoformat()}; "
                    f"gave up waiting after {self.wait_s:.0f} s"
                )
            time.sleep(self.poll_s)
        log.info("applying migration %s to keyspace %s", migration.label, self.keyspace)
        for statement in migration.statements(self.keyspace):
            self.session.execute(statement, timeout=60)
        wait_for_agreement(self.session)
        done = self.session.execute(self._done, (_now(), migration.version, self.owner), timeout=60).one()
        if not done.applied:
            # Another process took the claim over meanwhile (it thought us dead); it will record the migration.
            log.warning("migration %s was taken over by %s while this process applied it",
                        migration.label, done.owner)  # fmt: skip
        return True


def migrate(
    session: Session, keyspace: str, replication: dict[str, str | int], migrations: Sequence[Migration] | None = None,
    **options: Any,
) -> list[int]:  # fmt: skip
    """Bring ``keyspace`` to the newest migration; the versions this process applied (none: it was current)."""
    bootstrap(session, keyspace, replication)
    migrator = Migrator(session, keyspace, discover() if migrations is None else migrations, **options)
    return migrator.run()
