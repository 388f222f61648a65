#!/usr/bin/env bash
# Send a file of events, one JSON object per line, through the Python client (no curl): batched, gzip'ed,
# retried with the same ids. Prints "N accepted, M rejected"; each rejection goes to stderr with the API's
# reason, and the exit status is 1 if any event was rejected.
#
#   examples/send-jsonl.sh events.jsonl                         # to the `make up` API, with its key
#   SLUICE_API_KEY=... examples/send-jsonl.sh - https://sluice.example < events.jsonl
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
file=${1:?usage: $0 FILE.jsonl|- [BASE_URL]}
url=${2:-http://127.0.0.1:8000}
key=${SLUICE_API_KEY:-$(cat "$here/.data/dev/api-key")}
export SLUICE_API_KEY=$key
cd "$here"
exec .venv/bin/python - "$file" "$url" <<'PY'
import os
import sys

import orjson

from sluice.client import Client

path, url = sys.argv[1], sys.argv[2]
with open(0 if path == "-" else path, "rb") as lines, Client(url, os.environ["SLUICE_API_KEY"]) as client:
    for line in lines:
        if line.strip():
            client.send(orjson.loads(line))
    result = client.flush()
for r in result.rejected:
    print(f"{r.event_id} {r.status} {r.code} {r.message}", file=sys.stderr)
print(f"{len(result.accepted)} accepted, {len(result.rejected)} rejected")
sys.exit(1 if result.rejected else 0)
PY
