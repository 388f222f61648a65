"""What the load test and the benchmark share: paths, the API key, loopback-only targets, event shapes."""

from __future__ import annotations

import ipaddress
import itertools
import math
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn
from urllib.parse import urlsplit

PROJECT = Path(__file__).resolve().parent.parent
BUILD = PROJECT / "build"
#: The dev profile's API (devstack.PROFILES["dev"], which loadtests.stack starts), shifted like every port by
#: SLUICE_PORT_OFFSET; not imported from devstack, which the loadtest image does not hold.
DEFAULT_HOST = f"http://127.0.0.1:{8000 + int(os.environ.get('SLUICE_PORT_OFFSET', '0'))}"
DEFAULT_API_KEY = "dev-key"
API_KEY_ENV = "SLUICE_LOADTEST_API_KEY"
API_KEY_FILE = PROJECT / ".data" / "dev" / "api-key"

CURRENCIES = ("EUR", "USD", "GBP", "CHF", "SEK")
OFFSETS = ("Z", "+01:00", "+02:00", "-05:00", "+05:30")


def say(msg: str) -> None:
    print(f"[sluice] {msg}", flush=True)


def resolve_api_key(explicit: str | None) -> str:
    """--api-key, else $SLUICE_LOADTEST_API_KEY, else .data/dev/api-key, else "dev-key"."""
    if explicit:
        return explicit
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    try:
        key = API_KEY_FILE.read_text().strip()
    except OSError:
        key = ""
    return key or DEFAULT_API_KEY


def loopback_target(url: str) -> tuple[str, int]:
    """(host, port) of ``url``, refusing anything that is not a loopback address: load never leaves the box."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise SystemExit(f"--host must be an http:// URL on this machine, not {url!r}")
    port = parts.port or 80
    try:
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise SystemExit(f"cannot resolve {parts.hostname!r}: {exc}") from None
    for info in infos:
        if not ipaddress.ip_address(info[4][0]).is_loopback:
            raise SystemExit(f"refusing to send load to {url}: {info[4][0]} is not a loopback address")
    return parts.hostname, port


def raise_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so the same ``finally`` blocks stop what we started."""

    def handler(_signum: int, _frame: FrameType | None) -> NoReturn:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, handler)


def ignore_signals() -> None:
    """While cleaning up, a second Ctrl-C must not abandon half-stopped servers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Zipf:
    """Listing popularity: rank r is drawn with weight 1/r**s (a few listings get most views).

    Ranks map to spread-out listing ids through a bijection, so popular listings are not just the small ids.
    """

    def __init__(self, n: int, s: float = 1.07, base: int = 0, rng: random.Random | None = None) -> None:
        self.n = n
        self.base = base
        self._ranks = range(n)
        self._cum = list(itertools.accumulate(1.0 / math.pow(r + 1, s) for r in range(n)))
        self._rng = rng or random.Random()

    def listing(self) -> int:
        rank = self._rng.choices(self._ranks, cum_weights=self._cum)[0]
        return self.base + (rank * 7_919) % self.n + 1

    def many(self, k: int) -> list[int]:
        ranks = self._rng.choices(self._ranks, cum_weights=self._cum, k=k)
        return [self.base + (rank * 7_919) % self.n + 1 for rank in ranks]


def iso_at(epoch_ms: int, offset: str) -> str:
    """RFC 3339 for an instant (epoch milliseconds) in one of a few fixed offsets."""
    hours = 0 if offset == "Z" else int(offset[:3])
    minutes = 0 if offset == "Z" else int(offset[0] + offset[4:6])
    local_s = epoch_ms // 1000 + hours * 3600 + minutes * 60
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(local_s))
    return f"{stamp}.{epoch_ms % 1000:03d}{offset}"


def make_event(
    event_id: str, kind: str, listing_id: int, user_id: int, epoch_ms: int, rng: random.Random
) -> dict[str, Any]:
    """One valid event of contract v1 (a view, or a booking with a stay in the coming months)."""
    event: dict[str, Any] = {
        "event_id": event_id,
        "type": kind,
        "listing_id": listing_id,
        "user_id": user_id,
        "occurred_at": iso_at(epoch_ms, rng.choice(OFFSETS)),
    }
    if kind == "booking":
        start_day = epoch_ms // 86_400_000 + rng.randint(1, 120)
        nights = rng.randint(1, 14)
        event |= {
            "check_in": time.strftime("%Y-%m-%d", time.gmtime(start_day * 86_400)),
            "check_out": time.strftime("%Y-%m-%d", time.gmtime((start_day + nights) * 86_400)),
            "guests": rng.randint(1, 6),
            "total_price": f"{nights * rng.uniform(40, 400):.2f}",
            "currency": rng.choice(CURRENCIES),
        }
    return event


def accepted_line(event: dict[str, Any]) -> str:
    """One accepted event in the files the exactly-once check reads: the event as sent, one JSON per line (the
    checker compares every stored field with it)."""
    import json

    return json.dumps(event, separators=(",", ":")) + "\n"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest-rank; NaN when empty."""
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def code_state() -> dict[str, Any]:
    """The commit measured, and the files changed on top of it (the tree is shared and changes under us)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=PROJECT, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.rstrip("\n")

    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "modified_files": dirty}


def command_line(name: str) -> str:
    """How this run was started, for its summary: ``sluice NAME ARGS``, whether through the CLI or ``python -m``."""
    args = sys.argv[1:]
    if args[:1] == [name]:  # sluice NAME ARGS
        args = args[1:]
    return " ".join(["sluice", name, *args])
