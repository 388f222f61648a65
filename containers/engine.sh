#!/usr/bin/env bash
# A Docker engine and compose v2 on a machine that has neither; idempotent, and quick when both are there.
#   engine.sh engine    Debian's docker.io (apt-get), started by hand (these machines have no systemd);
#   engine.sh compose   compose v2: not a Debian package, so it is built once from its Go module and cached in
#                       .cache/containers/tools/, then installed as a CLI plugin;
#   engine.sh           both. `make containers` runs the compose part beside the image builds (they need
#                       only the engine), which hides most of the first build's minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
. containers/lib.sh

COMPOSE_VERSION=${COMPOSE_VERSION:-v2.40.3}
CACHE=${SLUICE_CONTAINERS_CACHE:-$PWD/.cache/containers}
LOGS=$CACHE/logs
mkdir -p "$CACHE/tools" "$LOGS"

engine_up() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
what=${1:-all}
case $what in engine|compose|all) ;; *) die "usage: engine.sh [engine|compose|all]" ;; esac

if [ "$what" != compose ]; then
if ! command -v dockerd >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || die "no Docker engine; as root run: apt-get install -y docker.io"
  step "apt-get update" "$LOGS/apt-update.log" apt-get update
  step "apt-get install docker.io" "$LOGS/apt-docker.log" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends docker.io
fi

if ! engine_up; then
  [ "$(id -u)" = 0 ] || die "the Docker engine is not running; start dockerd as root"
  say "starting dockerd (log: $LOGS/dockerd.log)"
  # setsid: the engine outlives this script and the make that ran it.
  setsid dockerd >"$LOGS/dockerd.log" 2>&1 </dev/null &
  for _ in $(seq 60); do engine_up && break; sleep 1; done
  engine_up || { tail -n 30 "$LOGS/dockerd.log" >&2; die "dockerd did not answer within 60 s"; }
fi
say "engine: Docker $(docker version --format '{{.Server.Version}}')"
fi
[ "$what" = engine ] && exit 0

PLUGIN_DIR=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
if ! docker compose version >/dev/null 2>&1; then
  BIN=$CACHE/tools/docker-compose-$COMPOSE_VERSION
  if [ ! -x "$BIN" ]; then
    command -v go >/dev/null 2>&1 || die "compose v2 is missing and there is no Go toolchain to build it"
    export GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build GOFLAGS=-modcacherw
    step "go mod download compose $COMPOSE_VERSION" "$LOGS/compose-download.log" \
      go mod download -json "github.com/docker/compose/v2@$COMPOSE_VERSION"
    SRC=$(sed -n 's/^\t"Dir": "\(.*\)",$/\1/p' "$LOGS/compose-download.log")
    [ -d "$SRC" ] || die "no module folder in $LOGS/compose-download.log"
    # `go install pkg@version` refuses modules with replace directives: build inside a copy of the module.
    rm -rf "$CACHE/go/compose-src" && cp -r "$SRC" "$CACHE/go/compose-src" && chmod -R u+w "$CACHE/go/compose-src"
    step "go build compose $COMPOSE_VERSION (about 4 min on 2 cores, once)" "$LOGS/compose-build.log" \
      bash -c "cd '$CACHE/go/compose-src' && CGO_ENABLED=0 go build -trimpath -ldflags \
        '-s -w -X github.com/docker/compose/v2/internal.Version=$COMPOSE_VERSION' -o '$BIN.tmp' ./cmd && mv '$BIN.tmp' '$BIN'"
  fi
  mkdir -p "$PLUGIN_DIR" && install -m 0755 "$BIN" "$PLUGIN_DIR/docker-compose"
fi
say "compose: $(docker compose version --short)"
