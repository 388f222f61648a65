"""Summarise a py-spy profile recorded with ``--format raw`` (collapsed stacks): where the CPU goes.

    .venv/bin/py-spy record --pid PID --duration 10 --format raw -o build/profile-api.txt
    .venv/bin/python -m loadtests.pyspy_summary build/profile-api.txt [--top 25] [--group module]

Prints the share of samples per thread, the functions with the most *inclusive* time (on the stack at
all) and the most *self* time (the frame actually running), and, with ``--group``, the same per module/package,
which is what decides an optimisation: "pydantic validation", "kombu publish", "cassandra driver".
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")

#: Frame file prefixes folded into one label with --group.
GROUPS = (
    ("pydantic", "pydantic"),
    ("fastapi", "fastapi"),
    ("starlette", "starlette"),
    ("uvicorn", "uvicorn"),
    ("anyio", "anyio (threadpool)"),
    ("kombu", "kombu"),
    ("celery", "celery"),
    ("redis", "redis-py"),
    ("cassandra", "cassandra-driver"),
    ("billiard", "billiard (celery pool)"),
    ("concurrent/futures", "thread pool"),
    ("threading", "threading"),
    ("asyncio", "asyncio"),
    ("api/", "api/"),
    ("worker/", "worker/"),
    ("sluice/", "sluice/"),
    ("json", "json"),
    ("logging", "logging"),
)


def frame_label(frame: str, group: bool) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    if not group:
        return f"{m['func']} ({m['file']})"
    path = m["file"] or ""
    for prefix, label in GROUPS:
        if path.startswith(prefix) or f"/{prefix}" in path:
            return label
    return path.split("/", 1)[0] or m["func"]


def summarise(path: Path, top: int, group: bool) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        # With --subprocesses py-spy prefixes "process PID:cmd" frames (parent, then child): count the innermost.
        procs = [f.split(":", 1)[0] for f in frames if f.startswith("process ")]
        threads[procs[-1] if procs else _root(frames)] += count
        labels = [frame_label(f, group) for f in frames if not f.startswith(("process", "thread"))]
        for label in set(labels):
            inclusive[label] += count
        if labels:
            own[labels[-1]] += count
    out = [f"{path}: {total} samples"]
    out.append("\nby process (with --subprocesses) or root frame:")
    out += [f"  {100 * n / total:5.1f}%  {name[:110]}" for name, n in threads.most_common(8)]
    out.append(f"\ninclusive (on the stack), top {top}:")
    out += [f"  {100 * n / total:5.1f}%  {name[:110]}" for name, n in inclusive.most_common(top)]
    out.append(f"\nself (running), top {top}:")
    out += [f"  {100 * n / total:5.1f}%  {name[:110]}" for name, n in own.most_common(top)]
    return "\n".join(out)


def callers(path: Path, needle: str, depth: int, top: int) -> str:
    """Which call paths (the ``depth`` frames above it) lead to frames whose label contains ``needle``."""
    paths: Counter[str] = Counter()
    total = hits = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [frame_label(f, False) for f in stack.split(";") if f and not f.startswith(("process", "thread"))]
        for i, label in enumerate(frames):
            if needle in label:
                hits += count
                paths[" <- ".join(reversed(frames[max(0, i - depth) : i + 1]))] += count
                break
    out = [f"{needle}: on the stack in {100 * hits / max(1, total):.1f}% of {total} samples; via:"]
    out += [f"  {100 * n / max(1, total):5.1f}%  {p[:300]}" for p, n in paths.most_common(top)]
    return "\n".join(out)


def _root(frames: list[str]) -> str:
    for frame in frames:
        if "_bootstrap" not in frame and "runpy" not in frame:
            return frame_label(frame, False)
    return frame_label(frames[0], False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.pyspy_summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("profile", type=Path, help="a py-spy --format raw file")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--group", action="store_true", help="fold frames into packages/modules")
    parser.add_argument("--callers", metavar="TEXT", help="show the call paths into frames containing TEXT")
    parser.add_argument("--depth", type=int, default=3, help="frames of call path shown with --callers (3)")
    args = parser.parse_args(argv)
    if args.callers:
        print(callers(args.profile, args.callers, args.depth, args.top))
    else:
        print(summarise(args.profile, args.top, args.group))
    return 0


if __name__ == "__main__":
    sys.exit(main())
