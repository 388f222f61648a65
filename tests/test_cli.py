"""The ``sluice`` command: every command has a --help that starts nothing; the schema, the reads through the
API and the dead-letter commands work on the real servers; errors exit non-zero with a clear message."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import typer
from cassandra.cluster import Session
from typer.testing import CliRunner, Result

from devstack import PROJECT, Profile, Servers
from sluice import cli, keys
from sluice.deadletters import Item, add
from tests.support import TEST_KEY, Service, service_env, start_worker, stored_rows, view, wait_until

SLUICE = Path(sys.executable).with_name("sluice")
DB = 9


def sluice(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """The installed console script, as an operator runs it."""
    return subprocess.run(
        [str(SLUICE), *args], env={**os.environ, **env}, cwd=PROJECT, capture_output=True, text=True, timeout=timeout
    )


def command_paths() -> list[list[str]]:
    """Every command and subcommand of the tree, e.g. ["dlq", "replay"]."""
    paths: list[list[str]] = []

    def walk(command: Any, path: list[str]) -> None:
        paths.append(path)
        # Typer ships its own copy of Click: groups are known by their subcommands, not by click.Group.
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(cli.app), [])
    return paths


def test_the_tree_holds_the_commands_the_issue_names() -> None:
    names = {" ".join(p) for p in command_paths()}
    expected = {"api", "worker", "schema apply", "dlq list", "dlq show", "dlq replay", "dlq purge", "events get"}
    assert expected | {"stats", "dev up", "dev down", "bench"} <= names


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "sluice")
def test_every_command_has_a_help_that_starts_nothing(path: list[str]) -> None:
    result = CliRunner().invoke(cli.app, [*path, "--help"], prog_name="sluice")
    assert result.exit_code == 0, result.output
    assert "usage:" in result.output.lower()
    command: Any = typer.main.get_command(cli.app)
    for name in path:
        command = command.commands[name]
    assert command.get_short_help_str(80).strip(), f"sluice {' '.join(path)} has no one-line description"


def test_the_console_script_and_the_old_entry_points_show_help_without_starting_a_server() -> None:
    top = sluice({}, "--help", timeout=30)
    assert top.returncode == 0, top.stderr
    assert "dlq" in top.stdout
    assert "schema" in top.stdout
    for module in (
        "api",
        "worker",
        "worker.deadletters",
        "worker.liveness",
        "worker.cloudwatch",
        "sluice.schema",
        "devstack",
    ):
        old = subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=PROJECT, capture_output=True, text=True, timeout=30
        )
        assert old.returncode == 0, f"python -m {module} --help: {old.stdout}{old.stderr}"
        assert "Usage: sluice" in old.stdout


def test_unknown_command_and_missing_arguments_are_usage_errors() -> None:
    assert CliRunner().invoke(cli.app, ["no-such-command"]).exit_code == 2
    assert CliRunner().invoke(cli.app, ["events", "get"]).exit_code == 2
    assert CliRunner().invoke(cli.app, ["stats", "not-a-number"]).exit_code == 2


# --- schema ---------------------------------------------------------------------------------------------
def test_schema_apply_twice_is_idempotent(cassandra: Session, profile: Profile) -> None:
    env = service_env(profile)
    for attempt in (1, 2):
        applied = sluice(env, "schema", "apply", "--wait", "30")
        assert applied.returncode == 0, f"attempt {attempt}: {applied.stdout}{applied.stderr}"
    tables = {row.table_name for row in cassandra.execute(
        "SELECT table_name FROM system_schema.tables WHERE keyspace_name = 'sluice'"
    )}  # fmt: skip
    assert {"events_by_id", "events_by_listing_day"} <= tables


def test_schema_apply_fails_clearly_without_cassandra(profile: Profile) -> None:
    env = service_env(profile, SLUICE_CASSANDRA_PORT="1", SLUICE_CASSANDRA_CONTACT_POINTS="127.0.0.1")
    failed = sluice(env, "schema", "apply", "--wait", "0")
    assert failed.returncode == 1
    assert "did not answer" in failed.stdout + failed.stderr


# --- reads through the API ------------------------------------------------------------------------------
def read(api: Service, *args: str, key: str = TEST_KEY) -> Result:
    env = {"SLUICE_API_URL": api.base_url, "SLUICE_API_KEY": key}
    return CliRunner().invoke(cli.app, list(args), env=env, prog_name="sluice")


def test_events_get_and_stats_through_the_api(client: httpx.Client, api: Service, worker: Service) -> None:
    day = dt.datetime.now(dt.UTC).replace(microsecond=0)
    event = view(listing_id=4242, occurred_at=day.isoformat())
    assert client.post("/v1/events", json=event).status_code == 202

    def stored() -> bool:
        return bool(json.loads(read(api, "events", "get", event["event_id"]).stdout or "{}").get("status") == "stored")

    wait_until(stored, 20, "the event to be stored")
    got = read(api, "events", "get", event["event_id"])
    assert got.exit_code == 0, got.output
    assert json.loads(got.stdout)["event"]["listing_id"] == 4242

    stats = read(api, "stats", "4242", "--from", day.date().isoformat(), "--to", day.date().isoformat())
    assert stats.exit_code == 0, stats.output
    assert json.loads(stats.stdout)["views"] == 1
    # The options win over the environment.
    flags = CliRunner().invoke(cli.app, ["stats", "4242", "--api-url", api.base_url, "--api-key", TEST_KEY])
    assert flags.exit_code == 0, flags.output


def test_read_errors_exit_non_zero_with_a_clear_message(api: Service) -> None:
    unknown = read(api, "events", "get", "0b6f3c1e-8a55-4c1e-9a57-5f1d2c3b4aff")
    assert unknown.exit_code == 1
    assert "404" in unknown.stderr
    assert "not_found" in unknown.stderr
    refused = read(api, "events", "get", "0b6f3c1e-8a55-4c1e-9a57-5f1d2c3b4aff", key="wrong-key")
    assert refused.exit_code == 1
    assert "401" in refused.stderr
    assert "API key" in refused.stderr
    keyless = CliRunner().invoke(cli.app, ["stats", "42", "--api-url", api.base_url], env={"SLUICE_API_KEY": ""})
    assert keyless.exit_code == 2
    assert "no API key" in keyless.stderr
    away = CliRunner().invoke(cli.app, ["stats", "42", "--api-url", "http://127.0.0.1:9", "--api-key", "k"])
    assert away.exit_code == 1
    assert "cannot reach the API" in away.stderr


# --- dead letters ---------------------------------------------------------------------------------------
@pytest.fixture
def dlq_db(servers: Servers, profile: Profile) -> Iterator[redis.Redis]:
    client = redis.Redis(port=profile.redis_port, db=DB)
    client.delete(keys.EVENTS_QUEUE, keys.UNACKED, keys.UNACKED_INDEX, keys.DEAD_LETTERS)
    yield client
    client.delete(keys.EVENTS_QUEUE, keys.UNACKED, keys.UNACKED_INDEX, keys.DEAD_LETTERS)
    client.close()


def test_dlq_list_show_replay_purge_round_trip(
    dlq_db: redis.Redis, cassandra: Session, profile: Profile, log_dir: Path
) -> None:
    env = service_env(profile, SLUICE_REDIS_URL=f"redis://127.0.0.1:{profile.redis_port}/{DB}")
    to_replay, to_purge = view(listing_id=4243), view(listing_id=4244)
    add(dlq_db, [Item(to_replay, "test: write failed")], kind="write_failed", task_id=None, attempts=3)
    add(dlq_db, [Item(to_purge, "test: to purge")], kind="write_failed", task_id=None, attempts=1)

    listed = sluice(env, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    assert to_replay["event_id"] in listed.stdout
    assert to_purge["event_id"] in listed.stdout
    assert "attempts=3" in listed.stdout
    assert "2 dead letter(s)" in listed.stderr
    shown = sluice(env, "dlq", "show", to_replay["event_id"])
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["event"] == to_replay

    worker = start_worker(profile, log_dir, name="worker-cli", SLUICE_REDIS_URL=env["SLUICE_REDIS_URL"])
    try:
        replayed = sluice(env, "dlq", "replay", to_replay["event_id"])
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert "replayed 1 event(s)" in replayed.stdout
        wait_until(lambda: stored_rows(cassandra, to_replay["event_id"]) == (1, 1), 30, "the replayed event")
    finally:
        worker.stop()

    purged = sluice(env, "dlq", "purge", to_purge["event_id"])
    assert purged.returncode == 0, purged.stderr
    assert "purged 1 dead letter(s)" in purged.stdout
    assert dlq_db.hlen(keys.DEAD_LETTERS) == 0
    assert stored_rows(cassandra, to_purge["event_id"]) == (0, 0)

    # Errors: an unknown id, no ids at all, ids and --all together.
    missing = sluice(env, "dlq", "show", "no-such-id")
    assert missing.returncode == 1
    assert "no dead letter no-such-id" in missing.stderr
    assert sluice(env, "dlq", "replay").returncode == 2
    assert sluice(env, "dlq", "purge", "x", "--all").returncode == 2
    skipped = sluice(env, "dlq", "replay", "no-such-id")
    assert skipped.returncode == 1
    assert "skipped no-such-id" in skipped.stdout
    # --all on an empty store is not an error.
    assert sluice(env, "dlq", "purge", "--all").stdout.strip() == "no dead letters to purge"
