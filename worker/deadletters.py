"""The dead-letter store: events the worker gave up on, kept in Redis with the reason, never dropped."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import uuid
from collections.abc import Iterable
from typing import Any, cast

import orjson
import redis
from celery import Celery

from sluice import keys
from sluice.events import event_id_of
from sluice.metrics import DEAD_LETTERS
from sluice.queue import WRITE_EVENTS, make_celery
from sluice.settings import get_settings


def add(
    client: redis.Redis,
    items: Iterable[tuple[Any, str]],
    *,
    task_id: str | None,
    attempts: int,
    kind: str = "write_failed",
) -> int:
    """Record each ``(raw event, reason)``; keyed by event id, so dead-lettering twice keeps one entry.

    ``kind`` (write_failed, invalid_event, malformed_task, undecodable, unknown_task, ...) labels the metric."""
    now = dt.datetime.now(dt.UTC).isoformat()
    mapping: dict[str, bytes] = {}
    for raw, reason in items:
        key = event_id_of(raw) or f"unkeyed-{uuid.uuid4()}"
        record = {"event": raw, "reason": reason, "task_id": task_id, "attempts": attempts, "failed_at": now}
        mapping[key] = orjson.dumps(record, default=str)
    if mapping:
        client.hset(keys.DEAD_LETTERS, mapping=mapping)
        DEAD_LETTERS.labels(kind).inc(len(mapping))
    return len(mapping)


def entries(client: redis.Redis) -> dict[str, dict[str, Any]]:
    found = cast("dict[bytes, bytes]", client.hgetall(keys.DEAD_LETTERS))
    return {k.decode(): orjson.loads(v) for k, v in found.items()}


def get(client: redis.Redis, entry_id: str) -> dict[str, Any] | None:
    raw = cast("bytes | None", client.hget(keys.DEAD_LETTERS, entry_id))
    return None if raw is None else cast("dict[str, Any]", orjson.loads(raw))


def replay(client: redis.Redis, celery: Celery, ids: list[str]) -> tuple[list[str], list[str]]:
    """Queue the dead-lettered events again through the normal path; returns (replayed, skipped).

    The worker writes them with the same event-derived timestamps as any other delivery, so an event
    that was in fact stored before stays stored once.
    """
    replayed: list[str] = []
    skipped: list[str] = []
    for entry_id in ids:
        record = get(client, entry_id)
        if record is None:
            skipped.append(entry_id)
            continue
        event = record.get("event")
        if not isinstance(event, dict) or "message_body" in event or "args" in event:
            skipped.append(entry_id)  # a raw message, not an event: inspect it with `show`
            continue
        celery.send_task(WRITE_EVENTS, args=[[event], time.time()], kwargs={"request_ids": [f"replay:{entry_id}"]})
        client.hdel(keys.DEAD_LETTERS, entry_id)
        replayed.append(entry_id)
    return replayed, skipped


def main(argv: list[str] | None = None) -> int:
    """``python -m worker.deadletters``: list, show, replay and purge dead-lettered events."""
    parser = argparse.ArgumentParser(prog="python -m worker.deadletters", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="one line per dead letter: id, when, attempts, reason")
    show = commands.add_parser("show", help="the whole record of one dead letter, as JSON")
    show.add_argument("id")
    for name, what in (("replay", "queue again through the normal path"), ("purge", "delete for good")):
        cmd = commands.add_parser(name, help=f"{what}: the given ids, or --all")
        cmd.add_argument("ids", nargs="*")
        cmd.add_argument("--all", action="store_true")
    args = parser.parse_args(argv)

    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=settings.redis_socket_timeout_s)
    try:
        if args.command == "list":
            found = entries(client)
            for entry_id, record in sorted(found.items(), key=lambda kv: str(kv[1].get("failed_at"))):
                print(
                    f"{entry_id}  {record.get('failed_at')}  attempts={record.get('attempts')}  {record.get('reason')}"
                )
            print(f"{len(found)} dead letter(s)", file=sys.stderr)
            return 0
        if args.command == "show":
            shown = get(client, args.id)
            if shown is None:
                print(f"no dead letter {args.id}", file=sys.stderr)
                return 1
            print(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
            return 0
        ids = list(entries(client)) if args.all else args.ids
        if not ids:
            parser.error(f"{args.command}: give ids or --all")
        if args.command == "purge":
            removed = client.hdel(keys.DEAD_LETTERS, *ids)
            print(f"purged {removed} dead letter(s)")
            return 0
        celery = make_celery(settings)
        try:
            replayed, skipped = replay(client, celery, ids)
        finally:
            celery.close()
        print(
            f"replayed {len(replayed)} event(s)"
            + (f"; skipped {len(skipped)}: {', '.join(skipped)}" if skipped else "")
        )
        return 0 if not skipped else 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
