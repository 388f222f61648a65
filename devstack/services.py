"""The one launcher of Sluice's own services: the API and workers as child processes.

``make up`` (``sluice dev up``), the test suite (tests/support.py), the load test and the bench
(loadtests/stack.py) and the chaos run all start their API and workers here, so that how a service is started,
logged, waited for and stopped is written once:

- each service is ``python -m sluice api|worker`` (the ``sluice`` command) in a session of its own, so Ctrl-C
  reaches only the launcher, which then stops the services in order, and a SIGKILL can take a whole worker
  pool at once (its process group);
- its output goes to ``<log_dir>/<name>.log`` (and, with ``echo``, to our stdout with the name in front);
- a pid file in ``run_dir`` (when given) lets a later run stop what a run killed hard left behind;
- ready means: the API answers ``/healthz``; a worker's log says `` ready.`` (Celery's own line);
- stopping is SIGTERM (uvicorn's graceful shutdown, Celery's warm shutdown), a wait, then SIGKILL of the
  process group.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Literal

from devstack import PROJECT
from devstack._proc import StackError, say

Role = Literal["api", "worker"]

#: A service's command line, as /proc shows it: ``python -m sluice worker`` or ``.../bin/sluice worker``.
_SERVICE_CMDLINE = re.compile(r"(?:-m sluice|/sluice) (api|worker)\b")


def service_argv(role: Role, args: Iterable[str] = ()) -> list[str]:
    """The command line of one service: the ``sluice`` command, run by this interpreter.

    ``python -m sluice`` rather than the console script: it needs only this checkout on ``sys.path``, not
    an installed entry point, and it runs on the same interpreter as the launcher.
    """
    return [sys.executable, "-m", "sluice", role, *args]


def service_role(cmdline: str) -> str | None:
    """``"api"`` or ``"worker"`` when a process's command line is one of our services, else None."""
    m = _SERVICE_CMDLINE.search(cmdline)
    return m.group(1) if m else None


class Service:
    """One API or worker process, started at construction."""

    def __init__(
        self,
        name: str,
        role: Role,
        env: Mapping[str, str],
        log_dir: Path,
        *,
        args: Iterable[str] = (),
        run_dir: Path | None = None,
        echo: bool = False,
        base_url: str = "",
    ) -> None:
        self.name = name
        self.role = role
        self.base_url = base_url
        self.log_path = log_dir / f"{name}.log"
        self.pid_path = run_dir / f"{name}.pid" if run_dir is not None else None
        log_dir.mkdir(parents=True, exist_ok=True)
        # Logs are appended across runs: log_text() reads only what this process wrote.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log: IO[bytes] = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            service_argv(role, args),
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            cwd=PROJECT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if echo else self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._echo: threading.Thread | None = None
        if echo:
            self._echo = threading.Thread(target=self._tee, daemon=True)
            self._echo.start()
        if self.pid_path is not None:
            self.pid_path.parent.mkdir(parents=True, exist_ok=True)
            self.pid_path.write_text(str(self.proc.pid))

    def _tee(self) -> None:
        # The foreground mode of `make up`: every line to the terminal with the service's name, and to its log.
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            self._log.write(line)
            self._log.flush()
            sys.stdout.write(f"{self.name:6s} | {line.decode(errors='replace')}")
            sys.stdout.flush()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def check_alive(self, what: str) -> None:
        """Raise StackError with the log's tail if the process has exited."""
        if not self.alive():
            self.stop()  # closes its log file and pid file
            tail = "\n".join("    " + line for line in self.log_text().splitlines()[-30:])
            raise StackError(f"the {self.name} exited with code {self.proc.returncode} while {what}:\n{tail}")

    def wait_ready(self, timeout: float) -> float:
        """Wait until the service is ready (see the module's doc); returns the seconds it took."""
        started = time.monotonic()
        check: Callable[[], bool] = self._api_answers if self.role == "api" else self._worker_ready
        while not check():
            self.check_alive("starting")
            if time.monotonic() - started > timeout:
                self.stop()
                tail = "\n".join("    " + line for line in self.log_text().splitlines()[-30:])
                raise StackError(f"the {self.name} was not ready within {timeout:.0f} s; log {self.log_path}:\n{tail}")
            time.sleep(0.2)
        return time.monotonic() - started

    def _api_answers(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _worker_ready(self) -> bool:
        return " ready." in self.log_text()

    def signal(self, sig: signal.Signals) -> None:
        """Send a signal; SIGKILL goes to the whole process group (a worker's pool dies with its parent)."""
        if not self.alive():
            return
        if sig == signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL of the process group after ``timeout`` seconds; returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                say(f"{self.name} did not stop within {timeout:.0f} s of SIGTERM; killing its process group")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._echo is not None:
            self._echo.join(timeout=5)
        self._log.close()
        if self.pid_path is not None:
            self.pid_path.unlink(missing_ok=True)
        return self.proc.returncode


def start_api(
    name: str,
    env: Mapping[str, str],
    log_dir: Path,
    *,
    port: int,
    run_dir: Path | None = None,
    echo: bool = False,
    timeout: float = 60.0,
) -> Service:
    """Start ``sluice api`` on 127.0.0.1:``port`` and wait until it answers ``/healthz``."""
    api = Service(
        name, "api", {**env, "SLUICE_API_PORT": str(port)}, log_dir,
        run_dir=run_dir, echo=echo, base_url=f"http://127.0.0.1:{port}",
    )  # fmt: skip
    api.wait_ready(timeout)
    return api


def start_worker(
    name: str,
    env: Mapping[str, str],
    log_dir: Path,
    *,
    args: Iterable[str] = (),
    run_dir: Path | None = None,
    echo: bool = False,
    timeout: float = 90.0,
    wait: bool = True,
) -> Service:
    """Start ``sluice worker`` and (unless ``wait`` is false) wait until Celery logs that it is ready."""
    worker = Service(name, "worker", env, log_dir, args=args, run_dir=run_dir, echo=echo)
    if wait:
        worker.wait_ready(timeout)
    return worker


def stop_services(services: Iterable[Service], timeout: float = 60.0) -> None:
    """Stop APIs first (they stop taking events and flush their publisher), then workers (warm shutdown)."""
    ordered = sorted(services, key=lambda s: s.role != "api")
    for service in ordered:
        if service.alive():
            say(f"stopping {service.name} (pid {service.pid}, SIGTERM)")
        service.stop(timeout)


def apply_schema(env: Mapping[str, str]) -> None:
    """``sluice schema apply`` against the servers ``env`` names, as its own process (it waits for Cassandra)."""
    say("applying the Cassandra schema (sluice schema apply)")
    argv = [sys.executable, "-m", "sluice", "schema", "apply"]
    if subprocess.run(argv, env={**os.environ, **env}, cwd=PROJECT, check=False).returncode != 0:
        raise StackError("sluice schema apply failed (its log is above)")


def stop_leftovers(run_dir: Path, timeout: float = 30.0) -> None:
    """Stop services a previous run of ours left behind, found by their pid files in ``run_dir``.

    Only a pid whose command line is still one of our services is stopped: a pid file can outlive its
    process and its number be reused by someone else's.
    """
    for pid_file in run_dir.glob("*.pid"):
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pid_file.unlink(missing_ok=True)
            continue
        if service_role(cmdline(pid)) is not None:
            say(f"stopping {pid_file.stem} left running by an earlier run (pid {pid})")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while cmdline(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError):
                if cmdline(pid):
                    os.killpg(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)


def cmdline(pid: int) -> str:
    """A process's command line with spaces between its arguments; empty when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
