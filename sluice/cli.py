"""``sluice``: the one command to run and operate Sluice (installed as a console script; ``python -m sluice``).

A thin layer: each command calls the function that does the work (api/server.py, worker/run.py,
sluice/schema.py, sluice/deadletters.py, devstack/, loadtests/). Those are imported inside the commands, so
``sluice --help`` (and a command's ``--help``) stays fast and never starts a server or opens a connection.

Exit codes: 0 done; 1 the command failed (the message says why); 2 a usage error.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

app = typer.Typer(
    name="sluice",
    help="Sluice: buffered event ingestion (HTTP -> Redis -> Cassandra). Run it, inspect it, operate it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain Click help: it reads the same in a terminal, a log and the README, and skips importing rich.
    rich_markup_mode=None,
)
schema_app = typer.Typer(help="The Cassandra schema.", no_args_is_help=True, rich_markup_mode=None)
dlq_app = typer.Typer(
    help="Dead letters: events the worker could not store.", no_args_is_help=True, rich_markup_mode=None
)
events_app = typer.Typer(help="Read events back through the API.", no_args_is_help=True, rich_markup_mode=None)
dev_app = typer.Typer(
    help="The local stack on this machine (what `make up` runs).", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(schema_app, name="schema")
app.add_typer(dlq_app, name="dlq")
app.add_typer(events_app, name="events")
app.add_typer(dev_app, name="dev")

#: Commands that hand all their arguments to a script's own parser, whose --help lists every option.
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"sluice: {message}", err=True)
    raise typer.Exit(code)


# --- services -------------------------------------------------------------------------------------------
@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Listen address [default: SLUICE_API_HOST, 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [default: SLUICE_API_PORT, 8000]")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="uvicorn worker processes [default: SLUICE_API_WORKERS, 1]")
    ] = None,
) -> None:
    """Serve the HTTP API (uvicorn).

    SIGTERM lets the requests in flight finish and the publisher flush first.
    """
    # Through the environment, not arguments: uvicorn's worker processes read the settings again themselves.
    for name, value in (("SLUICE_API_HOST", host), ("SLUICE_API_PORT", port), ("SLUICE_API_WORKERS", workers)):
        if value is not None:
            os.environ[name] = str(value)
    from api.server import serve

    serve()


@app.command(context_settings=PASS_THROUGH)
def worker(
    ctx: typer.Context,
    concurrency: Annotated[
        int | None,
        typer.Option("--concurrency", "-c", min=1, help="pool processes [default: SLUICE_WORKER_CONCURRENCY, 2]"),
    ] = None,
    queues: Annotated[str | None, typer.Option("--queues", "-Q", help="queues to consume [default: events]")] = None,
    pool: Annotated[str | None, typer.Option(help="Celery pool: prefork, solo, threads [default: prefork]")] = None,
    loglevel: Annotated[str | None, typer.Option("--loglevel", "-l", help="[default: SLUICE_LOG_LEVEL, INFO]")] = None,
) -> None:
    """Run a Celery worker on the events queue.

    SIGTERM is a warm shutdown: the batch in flight is stored and acknowledged first. Arguments after `--`
    go to `celery worker` as they are.
    """
    from worker.run import run

    code = run(concurrency=concurrency, queues=queues, pool=pool, loglevel=loglevel, extra=ctx.args)
    if code:
        raise typer.Exit(code)


@app.command()
def liveness(
    max_age: Annotated[float, typer.Option(help="seconds the consumer's heartbeat may be old")] = 60.0,
    file: Annotated[
        str | None, typer.Option(help="the heartbeat file [default: SLUICE_WORKER_HEARTBEAT_FILE]", show_default=False)
    ] = None,
) -> None:
    """Health check: is this worker's consumer loop still turning?

    Exit 0 if the consumer touched its heartbeat file (SLUICE_WORKER_HEARTBEAT_FILE) within --max-age
    seconds, else 1 with the reason.
    """
    from worker.liveness import check, heartbeat_file

    problem = check(Path(file) if file else heartbeat_file(), max_age)
    if problem:
        fail(problem)


@app.command()
def cloudwatch(
    disk: Annotated[str | None, typer.Option(help="publish how full this path's file system is instead")] = None,
) -> None:
    """Publish the queue's metrics to CloudWatch (the ECS sidecar).

    Every SLUICE_CLOUDWATCH_INTERVAL_S seconds, until SIGTERM.
    """
    import asyncio

    from sluice.logs import setup_logging
    from sluice.settings import get_settings
    from worker.cloudwatch import main as publish

    setup_logging()
    raise typer.Exit(asyncio.run(publish(get_settings(), ["--disk", disk] if disk else [])))


# --- schema ---------------------------------------------------------------------------------------------
@schema_app.command("apply")
def schema_apply(
    wait: Annotated[float, typer.Option(help="seconds to wait for Cassandra to answer")] = 60.0,
) -> None:
    """Create the keyspace and tables if missing (idempotent).

    Run once before the services start, never from every replica.
    """
    from sluice.schema import run

    raise typer.Exit(run(wait))


# --- dead letters ---------------------------------------------------------------------------------------
def _redis() -> Any:
    from sluice import broker
    from sluice.settings import get_settings

    return broker.sync_client(get_settings())


@dlq_app.command("list")
def dlq_list() -> None:
    """One line per dead letter: id, when, kind, attempts, reason."""
    from sluice import deadletters

    client = _redis()
    try:
        count = 0
        for entry_id, record in deadletters.entries(client):
            count += 1
            typer.echo(f"{entry_id}  {record.get('failed_at')}  kind={record.get('kind')}  "
                       f"attempts={record.get('attempts')}  {record.get('reason')}")  # fmt: skip
        typer.echo(f"{count} dead letter(s)", err=True)
    finally:
        client.close()


@dlq_app.command("show")
def dlq_show(event_id: Annotated[str, typer.Argument(help="the dead letter's id (its event_id)")]) -> None:
    """The whole record of one dead letter, as JSON."""
    import orjson

    from sluice import deadletters

    client = _redis()
    try:
        shown = deadletters.get(client, event_id)
    finally:
        client.close()
    if shown is None:
        fail(f"no dead letter {event_id}")
    typer.echo(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())


IdsArg = Annotated[
    list[str] | None, typer.Argument(metavar="ID", help="dead-letter ids (event ids)", show_default=False)
]
AllOpt = Annotated[bool, typer.Option("--all", help="every dead letter")]


def _chosen_ids(client: Any, command: str, ids: list[str] | None, every: bool) -> list[str]:
    from sluice import deadletters

    if every and ids:
        fail(f"{command}: give ids or --all, not both", 2)
    if every:
        chosen = list(deadletters.ids(client))
        if not chosen:  # nothing to do is not an error
            typer.echo(f"no dead letters to {command}")
            raise typer.Exit(0)
        return chosen
    if not ids:
        fail(f"{command}: give ids or --all", 2)
    return ids


@dlq_app.command("replay")
def dlq_replay(ids: IdsArg = None, every: AllOpt = False) -> None:
    """Queue dead letters again through the normal path.

    Exit 1 if any was skipped (the reason is printed).
    """
    from sluice import deadletters

    client = _redis()
    try:
        replayed, skipped = deadletters.replay(client, _chosen_ids(client, "replay", ids, every))
    finally:
        client.close()
    typer.echo(f"replayed {len(replayed)} event(s)")
    for entry_id, why in skipped.items():
        typer.echo(f"skipped {entry_id}: {why}")
    if skipped:
        raise typer.Exit(1)


@dlq_app.command("purge")
def dlq_purge(ids: IdsArg = None, every: AllOpt = False) -> None:
    """Delete dead letters for good."""
    from sluice import deadletters

    client = _redis()
    try:
        typer.echo(f"purged {deadletters.purge(client, _chosen_ids(client, 'purge', ids, every))} dead letter(s)")
    finally:
        client.close()


# --- reads through the API ------------------------------------------------------------------------------
ApiUrlOpt = Annotated[str, typer.Option(envvar="SLUICE_API_URL", help="the API's base URL")]
ApiKeyOpt = Annotated[
    str | None, typer.Option(envvar="SLUICE_API_KEY", help="an API key (one of SLUICE_API_KEYS)", show_default=False)
]
DEFAULT_API_URL = "http://127.0.0.1:8000"


def _get(base: str, key: str | None, path: str, query: dict[str, str] | None = None) -> Any:
    """GET a /v1 route; exits 1 with the API's own error message on anything but 200."""
    if not key:
        fail("no API key: pass --api-key or set SLUICE_API_KEY", 2)
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        fail(f"--api-url must be an http(s) URL, not {base!r}", 2)
    url = base.rstrip("/") + path + ("?" + urllib.parse.urlencode(query) if query else "")
    # S310: the scheme is checked above (no file: URLs); urllib rather than httpx, which the image does not hold.
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}", "Accept": "application/json"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            error = json.load(exc)["error"]
            detail = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            detail = exc.reason
        hint = {401: " (is the API key one of the API's SLUICE_API_KEYS?)"}.get(exc.code, "")
        fail(f"GET {path}: {exc.code} {detail}{hint}")
    except (urllib.error.URLError, OSError) as exc:
        fail(f"cannot reach the API at {base}: {getattr(exc, 'reason', exc)} (set --api-url or SLUICE_API_URL)")


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


@events_app.command("get")
def events_get(
    event_id: Annotated[str, typer.Argument(help="the event_id")],
    api_url: ApiUrlOpt = DEFAULT_API_URL,
    api_key: ApiKeyOpt = None,
) -> None:
    """Where an event is (stored, queued, dead_lettered), as JSON.

    Exit 1 if the API has never seen it (404) or refuses the key (401).
    """
    _print_json(_get(api_url, api_key, f"/v1/events/{urllib.parse.quote(event_id, safe='')}"))


@app.command()
def stats(
    listing: Annotated[int, typer.Argument(help="the listing_id")],
    from_: Annotated[str | None, typer.Option("--from", help="first UTC day, YYYY-MM-DD [default: to - 6]")] = None,
    to: Annotated[str | None, typer.Option(help="last UTC day, inclusive [default: today]")] = None,
    api_url: ApiUrlOpt = DEFAULT_API_URL,
    api_key: ApiKeyOpt = None,
) -> None:
    """Counts per event type and UTC day of one listing, as JSON."""
    query = {k: v for k, v in (("from", from_), ("to", to)) if v is not None}
    _print_json(_get(api_url, api_key, f"/v1/listings/{listing}/stats", query))


# --- the local stack ------------------------------------------------------------------------------------
ProfileOpt = Annotated[str, typer.Option(help="dev, test or chaos: ports and data folder (.data/<profile>)")]


def _dev(command: str, profile: str) -> None:
    from devstack import PROFILES, StackError, run, say

    if profile not in PROFILES:
        fail(f"no profile {profile!r}; one of {', '.join(sorted(PROFILES))}", 2)
    commands = {"up": run.up, "servers": run.servers_only, "fetch": run.fetch, "down": run.down}
    try:
        code = commands[command](PROFILES[profile])
    except StackError as exc:
        say(f"error: {exc}")
        code = 1
    raise typer.Exit(code)


@dev_app.command("up")
def dev_up(profile: ProfileOpt = "dev") -> None:
    """Redis, Cassandra, schema, API and a worker, in the foreground.

    Ctrl-C (or SIGTERM) stops it all in order: API, worker, Cassandra, Redis.
    """
    _dev("up", profile)


@dev_app.command("down")
def dev_down(profile: ProfileOpt = "dev") -> None:
    """Stop what a crashed run left behind."""
    _dev("down", profile)


@dev_app.command("servers")
def dev_servers(profile: ProfileOpt = "dev") -> None:
    """Only Redis and Cassandra, in the foreground.

    For iterating on tests with SLUICE_TEST_REUSE_SERVERS=1 (and --profile test).
    """
    _dev("servers", profile)


@dev_app.command("fetch")
def dev_fetch(profile: ProfileOpt = "dev") -> None:
    """Fetch Cassandra's jars (once); check Java and redis-server."""
    _dev("fetch", profile)


# --- load -----------------------------------------------------------------------------------------------
@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """How far the pipeline goes on this machine (--help: options).

    Writes build/bench/summary.json.
    """
    from loadtests.bench import main as bench_main

    raise typer.Exit(bench_main(ctx.args))


@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def loadtest(ctx: typer.Context) -> None:
    """Locust at a fixed rate, then the exactly-once check.

    --help lists its options.
    """
    from loadtests.loadtest import main as loadtest_main

    raise typer.Exit(loadtest_main(ctx.args))


@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def chaos(ctx: typer.Context) -> None:
    """Random faults under load, then the exactly-once check.

    --help lists its options.
    """
    from loadtests.chaos import main as chaos_main

    raise typer.Exit(chaos_main(ctx.args))


def main(argv: list[str] | None = None) -> int:
    """The console script; returns the exit code instead of exiting when called with ``argv``."""
    try:
        app(args=argv, prog_name="sluice", standalone_mode=True)
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
