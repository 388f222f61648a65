# syntax=docker/dockerfile:1
#
# One image for the Sluice API and worker; the `sluice` command picks the role:
#   docker run IMAGE                                   -> API     (sluice api, the default CMD)
#   docker run IMAGE sluice worker                     -> Celery worker
#   docker run IMAGE sluice schema apply               -> one-shot schema step
#   docker run IMAGE sluice cloudwatch                 -> queue-depth publisher (sidecar in ECS)
#   docker run IMAGE sluice --help                     -> the rest (dead letters, reads through the API)
# Targets: `runtime` (the default, last stage) and `loadtest` (adds the dev group for locust; compose only).
# No secret is baked in: every SLUICE_* secret comes from the environment at run time.

# ---- builder: resolve the locked dependencies into /opt/venv; nothing of this stage but the venv ships ----
FROM python:3.11.13-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/opt/venv

# Where PyPI is reached only through a TLS-inspecting proxy, `make containers` puts that CA bundle in
# containers/build-ca/ca.crt; elsewhere the folder holds only a README. Only the builder stages read it: no
# later stage copies /tmp/build-ca, so the runtime image never holds it (tests/containers checks).
COPY containers/build-ca/ /tmp/build-ca/
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN if [ -f /tmp/build-ca/ca.crt ]; then export PIP_CERT=/tmp/build-ca/ca.crt; fi \
 && pip install uv==0.13.8

# /app, where the runtime image keeps the code: the project's editable install (below) points there.
WORKDIR /app
# Only the lock and the project file: this layer (the slow one) is rebuilt only when dependencies change.
COPY pyproject.toml uv.lock ./
RUN if [ -f /tmp/build-ca/ca.crt ]; then export SSL_CERT_FILE=/tmp/build-ca/ca.crt; fi \
 && uv sync --frozen --no-install-project --no-default-groups

# ---- builder-loadtest: the same plus the `dev` group (locust) for the compose `loadtest` profile ----
FROM builder AS builder-loadtest
RUN if [ -f /tmp/build-ca/ca.crt ]; then export SSL_CERT_FILE=/tmp/build-ca/ca.crt; fi \
 && uv sync --frozen --no-install-project --no-default-groups --group dev

# ---- builder-app: the project itself, installed (editable, at /app) for the `sluice` console script ----
FROM builder AS builder-app
# An editable install is a path (/app, where the runtime stage puts the code) and the bin/sluice script: it
# needs no code, only the readme the project's metadata names, so code changes never rebuild this layer.
COPY README.md ./
RUN if [ -f /tmp/build-ca/ca.crt ]; then export SSL_CERT_FILE=/tmp/build-ca/ca.crt; fi \
 && uv sync --frozen --no-default-groups

# ---- base: the runtime OS layer shared by both final targets ----
FROM python:3.11.13-slim-bookworm AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    SLUICE_API_HOST=0.0.0.0 \
    SLUICE_API_PORT=8000 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/sluice-metrics

# A fixed, numeric, unprivileged user: orchestrators can check runAsNonRoot against the uid.
RUN groupadd --system --gid 10001 sluice \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin sluice

WORKDIR /app

# ---- loadtest: locust against the API (docker compose --profile loadtest up) ----
FROM base AS loadtest
COPY --from=builder-loadtest /opt/venv /opt/venv
COPY sluice/ sluice/
COPY loadtests/ loadtests/
USER 10001:10001
EXPOSE 8089
HEALTHCHECK NONE
CMD ["locust", "-f", "loadtests/locustfile.py", "--host", "http://api:8000"]

# ---- runtime: API, worker, schema step and CloudWatch publisher (the default target) ----
FROM base AS runtime
COPY --from=builder-app /opt/venv /opt/venv
# Code is owned by root and read-only for the service user; it is imported from PYTHONPATH=/app.
COPY sluice/ sluice/
COPY api/ api/
COPY worker/ worker/
# Only the Cassandra discovery helper of infra/ runs in a container (the init container of the Cassandra task).
COPY infra/__init__.py infra/cassandra_discovery.py infra/
USER 10001:10001
EXPOSE 8000
# The API's liveness; the worker's task definition / compose service replaces it with its own check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SLUICE_API_PORT', '8000'), timeout=4)"]
# Exec form: sluice (python) is PID 1's child under the orchestrator's init (compose `init: true`, ECS
# initProcessEnabled), so SIGTERM goes straight to uvicorn / Celery for a graceful or warm shutdown.
CMD ["sluice", "api"]
