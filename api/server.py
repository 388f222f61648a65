"""``sluice api``: serve the API with uvicorn on SLUICE_API_HOST:SLUICE_API_PORT."""

from __future__ import annotations

import os

import uvicorn

from sluice.logs import setup_logging
from sluice.settings import get_settings


def serve() -> None:
    # prometheus_client needs its multiprocess directory to exist before anything imports it.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    settings = get_settings()
    setup_logging()
    uvicorn.run(
        "api.main:asgi",
        host=settings.api_host,
        port=settings.api_port,
        workers=settings.api_workers,
        loop="uvloop",
        # httptools with the connection limits uvicorn lacks (idle, header and body timeouts, a cap on open
        # connections): api/http.py says what uvicorn does without them.
        http="api.http:GuardedHttpToolsProtocol",
        # Typed int, used as call_later's delay (a float is fine there).
        timeout_keep_alive=settings.http_idle_timeout_s,  # type: ignore[arg-type]
        access_log=False,
        # Let requests in flight finish (and the publisher flush) before the process exits on SIGTERM.
        timeout_graceful_shutdown=20,
        log_config=None,
    )
