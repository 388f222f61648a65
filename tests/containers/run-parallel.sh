#!/usr/bin/env bash
# The container suite (make container-test) as two pytest processes at once. Each group brings up its own compose
# projects (their own containers, volumes, networks and host ports: see conftest.py), so they share no server;
# run one after the other they took about 14 minutes, which `make test` cannot afford on top of the rest.
#   ring    tests/containers/test_ring.py                      three Cassandra nodes
#   stacks  the images, the one-node stack, liveness, the HA queue (one stack at a time, in this order)
# Every line is prefixed with its group; each group's whole output is also kept in build/containers/suite-*.log.
# Extra pytest arguments (PYTEST_ARGS, or this script's) go to both groups.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
mkdir -p build/containers

group() {
    local name=$1
    shift
    .venv/bin/pytest -m containers -p no:cacheprovider -s -v "$@" 2>&1 \
        | tee "build/containers/suite-$name.log" | sed -u "s/^/[$name] /"
    return "${PIPESTATUS[0]}"
}

started=$(date +%s)
group ring tests/containers/test_ring.py "$@" &
ring=$!
group stacks tests/containers/test_images.py tests/containers/test_compose.py tests/containers/test_liveness.py \
    tests/containers/test_ha.py "$@" &
stacks=$!
wait "$ring"; ring_rc=$?
wait "$stacks"; stacks_rc=$?
echo "[containers] suite done in $(($(date +%s) - started)) s: ring exit $ring_rc, stacks exit $stacks_rc"
# pytest's 5 is "no tests collected": a group that a -k filter empties is not a failure.
for rc in "$ring_rc" "$stacks_rc"; do
    if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then exit 1; fi
done
[ "$ring_rc" = 0 ] || [ "$stacks_rc" = 0 ] || exit 1
