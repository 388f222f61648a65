"""Liveness and readiness: ``/healthz`` never touches a dependency; ``/readyz`` asks Redis and Cassandra."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from api.deps import ResourcesDep
from api.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive", operation_id="getHealth")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Redis and Cassandra answer",
    operation_id="getReadiness",
    responses={503: {"description": "A dependency does not answer; the body says which."}},
)
async def readyz(resources: ResourcesDep) -> JSONResponse:
    async def redis_check() -> str:
        await asyncio.wait_for(resources.redis.ping(), timeout=2)
        return "ok"

    async def cassandra_check() -> str:
        store = await resources.cassandra.get()
        version = await asyncio.wait_for(store.ping(), timeout=3)
        return f"ok (Cassandra {version})"

    names = ("redis", "cassandra")
    outcomes = await asyncio.gather(redis_check(), cassandra_check(), return_exceptions=True)
    checks: dict[str, Any] = {}
    for name, outcome in zip(names, outcomes, strict=True):
        checks[name] = outcome if isinstance(outcome, str) else f"failing: {type(outcome).__name__}: {outcome}"
    ready = all(isinstance(o, str) for o in outcomes)
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503
    )
