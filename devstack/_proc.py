"""Child processes the launcher owns: started in their own session, logged to a file, stopped politely."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class StackError(RuntimeError):
    """A server could not be set up or did not come up; the message says which step and which log."""


def say(msg: str) -> None:
    print(f"[sluice] {msg}", flush=True)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join("    " + line for line in text[-lines:])


class ManagedProcess:
    """One server process with a pid file, so a later run can find and stop what a crashed run left."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        pid_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        marker: str | None = None,
    ) -> None:
        self.name = name
        # What the command line of this process shows, so a stale pid file is matched to the right process.
        self.marker = marker or str(pid_path.parent)
        self.argv = list(argv)
        self.log_path = log_path
        self.pid_path = pid_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    def start(self) -> None:
        stop_pidfile(self.pid_path, self.name, self.marker)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # A session of its own: Ctrl-C reaches only the launcher, which then stops servers in order.
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        self.pid_path.write_text(str(self.proc.pid))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, check: Callable[[], bool], *, timeout: float, what: str, every: float = 5.0) -> float:
        """Poll ``check`` until it passes; show progress; fail with the log's tail if the process dies."""
        started = time.monotonic()
        next_note = started + every
        while True:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise StackError(
                    f"{self.name} exited (code {code}) while {what}; log: {self.log_path}\n{tail(self.log_path)}"
                )
            if check():
                return time.monotonic() - started
            now = time.monotonic()
            if now - started > timeout:
                self.stop()
                raise StackError(
                    f"{self.name} did not become ready ({what}) within {timeout:.0f} s; "
                    f"log: {self.log_path}\n{tail(self.log_path)}"
                )
            if now >= next_note:
                last = tail(self.log_path, 1).strip()[:120]
                say(f"  {self.name}: still {what} ({now - started:.0f} s) ... {last}")
                next_note = now + every
            time.sleep(0.25)

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                say(f"{self.name} did not stop within {timeout:.0f} s of SIGTERM; killing it")
                self.proc.kill()
                self.proc.wait()
        self.pid_path.unlink(missing_ok=True)
        return self.proc.returncode


def stop_pidfile(pid_path: Path, name: str, marker: str, timeout: float = 60.0) -> None:
    """Stop a process a previous, crashed run left behind (if its pid still names one of ours)."""
    try:
        pid = int(pid_path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    if _is_alive(pid) and _cmdline_mentions(pid, marker):
        say(f"stopping {name} left running by an earlier run (pid {pid})")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _is_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _is_alive(pid):
            os.kill(pid, signal.SIGKILL)
    pid_path.unlink(missing_ok=True)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _cmdline_mentions(pid: int, needle: str) -> bool:
    # Guards against a recycled pid: only stop a process whose command line names our data folder.
    try:
        return needle in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return False
