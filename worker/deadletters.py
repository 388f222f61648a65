"""``python -m worker.deadletters``: list, show, replay and purge dead-lettered events (sluice/deadletters.py)."""

from __future__ import annotations

import argparse
import sys

import orjson
import redis

from sluice import deadletters
from sluice.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    """List, show, replay and purge dead-lettered events."""
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
            count = 0
            for entry_id, record in deadletters.entries(client):
                count += 1
                print(f"{entry_id}  {record.get('failed_at')}  kind={record.get('kind')}  "
                      f"attempts={record.get('attempts')}  {record.get('reason')}")  # fmt: skip
            print(f"{count} dead letter(s)", file=sys.stderr)
            return 0
        if args.command == "show":
            shown = deadletters.get(client, args.id)
            if shown is None:
                print(f"no dead letter {args.id}", file=sys.stderr)
                return 1
            print(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
            return 0
        ids = deadletters.ids(client) if args.all else args.ids
        if not ids:
            if args.all:
                print(f"no dead letters to {args.command}")
                return 0
            parser.error(f"{args.command}: give ids or --all")
        if args.command == "purge":
            print(f"purged {deadletters.purge(client, ids)} dead letter(s)")
            return 0
        replayed, skipped = deadletters.replay(client, ids)
        print(f"replayed {len(replayed)} event(s)")
        for entry_id, why in skipped.items():
            print(f"skipped {entry_id}: {why}")
        return 0 if not skipped else 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
