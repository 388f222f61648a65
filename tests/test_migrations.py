"""Versioned migrations (sluice/migrate.py) on the real Cassandra, each test in a keyspace of its own."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal

import pytest
from cassandra.cluster import Session

from sluice.cassandra import EVENT_COLUMNS, apply_schema, connect
from sluice.migrate import Migration, MigrationError, Migrator, discover, migrate
from sluice.settings import Settings

REPLICATION: dict[str, str | int] = {"class": "SimpleStrategy", "replication_factor": 1}

#: What sluice.cassandra.schema_statements created before migrations existed (main at b9a9819), verbatim but
#: for the keyspace name (KS): the keyspace an existing deployment has, which the migrations upgrade in place.
_COLUMNS = """
        type text,
        user_id bigint,
        check_in date,
        check_out date,
        guests int,
        total_price decimal,
        currency text,
        accepted_at timestamp"""
PRE_MIGRATION = [
    "CREATE KEYSPACE IF NOT EXISTS KS WITH replication = {'class': 'SimpleStrategy', 'replication_factor': '1'}",
    """CREATE TABLE IF NOT EXISTS KS.events_by_id (
        event_id uuid PRIMARY KEY,
        listing_id bigint,
        occurred_at timestamp,
        day date,"""
    + _COLUMNS
    + """
        )""",
    """CREATE TABLE IF NOT EXISTS KS.events_by_listing_day (
        listing_id bigint,
        day date,
        occurred_at timestamp,
        event_id uuid,"""
    + _COLUMNS
    + """,
        PRIMARY KEY ((listing_id, day), occurred_at, event_id)
        ) WITH CLUSTERING ORDER BY (occurred_at ASC, event_id ASC)
          AND compaction = {'class': 'TimeWindowCompactionStrategy',
                             'compaction_window_unit': 'DAYS', 'compaction_window_size': 1}""",
]


@pytest.fixture
def keyspace(cassandra: Session) -> Iterator[str]:
    name = f"mig_{uuid.uuid4().hex[:12]}"
    yield name
    cassandra.execute(f"DROP KEYSPACE IF EXISTS {name}", timeout=60)


def columns(session: Session, keyspace: str, table: str) -> dict[str, str]:
    rows = session.execute(
        "SELECT column_name, type FROM system_schema.columns WHERE keyspace_name = %s AND table_name = %s",
        (keyspace, table),
    )
    return {row.column_name: row.type for row in rows}


def recorded(session: Session, keyspace: str) -> dict[int, tuple[str, str, str]]:
    rows = session.execute(f"SELECT version, name, checksum, state FROM {keyspace}.schema_migrations")
    return {row.version: (row.name, row.checksum, row.state) for row in rows}


def test_the_migrations_on_disk_are_numbered_and_idempotent() -> None:
    migrations = discover()
    assert [m.label for m in migrations[:2]] == ["0001_initial", "0002_search"]
    for migration in migrations:
        for statement in migration.statements("ks"):
            # Re-running a migration a dead process left half-done must be safe.
            assert "IF NOT EXISTS" in statement.upper(), (migration.label, statement)


def test_a_fresh_keyspace_migrates_to_the_newest_version_and_a_second_run_does_nothing(
    cassandra: Session, keyspace: str
) -> None:
    head = discover()
    assert migrate(cassandra, keyspace, REPLICATION) == [m.version for m in head]
    assert recorded(cassandra, keyspace) == {m.version: (m.name, m.checksum, "applied") for m in head}
    for table in ("events_by_id", "events_by_listing_day"):
        assert set(EVENT_COLUMNS) <= set(columns(cassandra, keyspace, table))
    applied_at = {r.version: r.applied_at for r in cassandra.execute(f"SELECT * FROM {keyspace}.schema_migrations")}

    assert migrate(cassandra, keyspace, REPLICATION) == []
    again = {r.version: r.applied_at for r in cassandra.execute(f"SELECT * FROM {keyspace}.schema_migrations")}
    assert again == applied_at, "a second run must not touch what is applied"


def test_a_keyspace_from_before_migrations_is_upgraded_in_place(
    cassandra: Session, keyspace: str, settings: Settings
) -> None:
    for statement in PRE_MIGRATION:
        cassandra.execute(statement.replace("KS", keyspace), timeout=60)
    event_id = uuid.uuid4()
    cassandra.execute(
        f"INSERT INTO {keyspace}.events_by_id (event_id, type, listing_id, user_id, occurred_at, day, check_in,"
        " check_out, guests, total_price, currency) VALUES (%s, 'booking', 42, 7, %s, %s, %s, %s, 2, %s, 'EUR')",
        (event_id, dt.datetime(2026, 11, 25, 8, 30), dt.date(2026, 11, 25), dt.date(2026, 12, 1),
         dt.date(2026, 12, 4), Decimal("449.70")),
    )  # fmt: skip
    assert "query" not in columns(cassandra, keyspace, "events_by_id")

    # The entry point the schema step, make up and the tests use.
    apply_schema(cassandra, settings.model_copy(update={"cassandra_keyspace": keyspace}))

    assert {v: state for v, (_, _, state) in recorded(cassandra, keyspace).items()} == {1: "applied", 2: "applied"}
    for table in ("events_by_id", "events_by_listing_day"):
        assert columns(cassandra, keyspace, table)["result_count"] == "int"
    row = cassandra.execute(f"SELECT * FROM {keyspace}.events_by_id WHERE event_id = %s", (event_id,)).one()
    assert (row.guests, row.total_price, row.query) == (2, Decimal("449.70"), None), "the old rows stay as they were"


def test_a_changed_migration_is_refused_and_nothing_runs(cassandra: Session, keyspace: str) -> None:
    initial, search, *_ = discover()
    assert migrate(cassandra, keyspace, REPLICATION, [initial]) == [1]
    edited = Migration(initial.version, initial.name, initial.text + "\n-- an innocent-looking edit\n")
    with pytest.raises(MigrationError, match=r"migration 0001_initial was applied .* with checksum .* now has"):
        migrate(cassandra, keyspace, REPLICATION, [edited, search])
    assert "query" not in columns(cassandra, keyspace, "events_by_id"), "no later migration may run after a refusal"
    assert set(recorded(cassandra, keyspace)) == {1}


def test_two_processes_starting_at_once_apply_each_migration_once(settings: Settings, keyspace: str) -> None:
    head = discover()
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def run(name: str) -> None:
        cluster, session = connect(settings)  # a connection of its own, like a second process
        try:
            start.wait()
            results[name] = migrate(session, keyspace, REPLICATION, owner=name, poll_s=0.1)
        except BaseException as exc:
            errors.append(exc)
        finally:
            cluster.shutdown()

    threads = [threading.Thread(target=run, args=(f"p{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    applied = sorted(version for versions in results.values() for version in versions)
    assert applied == [m.version for m in head], f"each migration applied exactly once: {results}"


def test_a_claim_left_by_a_dead_process_is_taken_over(cassandra: Session, keyspace: str) -> None:
    initial, *_ = discover()
    migrate(cassandra, keyspace, REPLICATION, [])  # the keyspace and schema_migrations only
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    cassandra.execute(
        f"INSERT INTO {keyspace}.schema_migrations (version, name, checksum, state, owner, claimed_at)"
        " VALUES (1, %s, %s, 'running', 'dead-host:1', %s)",
        (initial.name, initial.checksum, long_ago),
    )
    migrator = Migrator(cassandra, keyspace, [initial], owner="me", stale_after_s=60, poll_s=0.1)
    assert migrator.run() == [1]
    row = cassandra.execute(f"SELECT owner, state FROM {keyspace}.schema_migrations WHERE version = 1").one()
    assert (row.owner, row.state) == ("me", "applied")


def test_a_live_claim_is_waited_for_then_reported(cassandra: Session, keyspace: str) -> None:
    initial, *_ = discover()
    migrate(cassandra, keyspace, REPLICATION, [])
    cassandra.execute(
        f"INSERT INTO {keyspace}.schema_migrations (version, name, checksum, state, owner, claimed_at)"
        " VALUES (1, %s, %s, 'running', 'busy-host:2', %s)",
        (initial.name, initial.checksum, dt.datetime.now(dt.UTC)),
    )
    migrator = Migrator(cassandra, keyspace, [initial], owner="me", wait_s=1.5, poll_s=0.2)
    with pytest.raises(MigrationError, match="being applied by busy-host:2"):
        migrator.run()
    assert "events_by_id" not in {
        row.table_name
        for row in cassandra.execute(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", (keyspace,)
        )
    }, "the waiting process must not run the migration beside its owner"
