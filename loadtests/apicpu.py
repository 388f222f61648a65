"""The API's CPU per single-event request, with nothing else running: an A/B of an API change, without the noise.

    .venv/bin/python -m loadtests.apicpu [--rate 1000] [--seconds 10] [--rounds 3]

A private ``redis-server`` (``appendfsync always``, as the stack's) and one API process (``sluice api``), each
on a free port, and the bench's load generator (loadtests/loadgen.py) sending ``POST /v1/events`` at a fixed
rate over 64 keep-alive connections. No worker and no Cassandra: the queue and the marks are deleted every
50 ms, so the API never sees a backlog (and publishes as it does while workers keep up). Each round prints the
API process's CPU time (user + system, from ``/proc``) per answered request; the last line is their median.

Why beside ``sluice bench``'s cpu phase: there every role shares two cores with Cassandra, whose JIT compilers
are busy for minutes after a stack starts, and the API's figure moved by a fifth between rounds of the same
code (docs/performance.md, eighth steps). Here the API's own cost is all that is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

from loadtests.benchparts import EventFactory
from loadtests.loadgen import generate

PROJECT = Path(__file__).resolve().parent.parent
KEY = "apicpu-key-0123456789"
#: What the queue holds (sluice/keys.py): emptied as it fills.
_QUEUE_KEYS = ("sluice.events", "sluice:queued", "sluice:queued_index")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{what} exited with {process.returncode}; its log: {log}\n{log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not answer on port {port} within 30 s; its log: {log}")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000, help="single events per second (1000)")
    parser.add_argument("--seconds", type=float, default=10, help="length of each round (10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds after a 3 s warm-up (3)")
    args = parser.parse_args(argv)
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        sys.exit("redis-server is not installed: `make setup` installs it")
    with tempfile.TemporaryDirectory(prefix="sluice-apicpu-") as tmp:
        root = Path(tmp)
        redis_port, api_port = _free_port(), _free_port()
        print(f"[apicpu] redis on {redis_port}, API on {api_port}, files in {root}", flush=True)
        redis_log, api_log = root / "redis.log", root / "api.log"
        server = subprocess.Popen(
            [redis_server, "--port", str(redis_port), "--dir", str(root), "--appendonly", "yes",
             "--appendfsync", "always", "--save", "", "--logfile", str(redis_log)],
        )  # fmt: skip
        env = os.environ | {
            "SLUICE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "SLUICE_API_KEYS": KEY,
            "SLUICE_API_PORT": str(api_port),
            "SLUICE_CASSANDRA_PORT": str(_free_port()),  # never reached: single events need no Cassandra
            "SLUICE_LOG_LEVEL": "WARNING",
            "PROMETHEUS_MULTIPROC_DIR": str(root / "metrics"),  # as the stack runs it
        }
        api = None
        stop = threading.Event()
        try:
            _wait_for_port(redis_port, server, "redis-server", redis_log)
            with api_log.open("wb") as log:
                api = subprocess.Popen([sys.executable, "-m", "sluice", "api"], env=env, cwd=PROJECT, stdout=log,
                                       stderr=subprocess.STDOUT)  # fmt: skip
            _wait_for_port(api_port, api, "the API", api_log)
            client = redis.Redis(port=redis_port)

            def empty_the_queue() -> None:
                while not stop.wait(0.05):
                    client.delete(*_QUEUE_KEYS)

            threading.Thread(target=empty_the_queue, daemon=True).start()
            factory = EventFactory("127.0.0.1", api_port, KEY, listings=1000)
            warm_up, _ = factory.single(int(args.rate * 3), args.rate)
            print(f"[apicpu] warm-up: 3 s at {args.rate:g}/s", flush=True)
            asyncio.run(generate("127.0.0.1", api_port, warm_up, connections=64, rate=args.rate, max_seconds=10))
            figures = []
            for n in range(1, args.rounds + 1):
                requests, _ = factory.single(int(args.rate * args.seconds), args.rate)
                before = _cpu_s(api.pid)
                result = asyncio.run(generate("127.0.0.1", api_port, requests, connections=64, rate=args.rate,
                                              max_seconds=args.seconds + 10))  # fmt: skip
                ms = (_cpu_s(api.pid) - before) * 1000 / max(result.ok, 1)
                figures.append(ms)
                print(f"[apicpu] round {n}: {result.ok:,} answered 202 of {len(requests):,}, p99 "
                      f"{result.quantile_ms(0.99):.1f} ms; API CPU {ms:.3f} ms per request", flush=True)  # fmt: skip
            print(f"[apicpu] median of {len(figures)} rounds: API CPU {statistics.median(figures):.3f} ms per request "
                  f"at {args.rate:g}/s", flush=True)  # fmt: skip
        finally:
            stop.set()
            for process in (api, server):
                if process is not None:
                    process.terminate()
                    process.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
