#!/usr/bin/env bash
# Every image our compose files and Dockerfile name, available locally; idempotent (present images are kept).
#   1. base images (python:*-slim, redis:*, cassandra:*): pulled from the registry; only where the pull fails
#      is a local stand-in built under the same name, from Debian packages (debootstrap from the mirror apt
#      uses) and, for Cassandra, the Maven Central jars `make setup` fetches;
#   2. our images (sluice:local, sluice-loadtest:local): built from the Dockerfile.
set -euo pipefail
cd "$(dirname "$0")/.."
. containers/lib.sh

CACHE=${SLUICE_CONTAINERS_CACHE:-$PWD/.cache/containers}
LOGS=$CACHE/logs
JARS=${SLUICE_CACHE_DIR:-$PWD/.cache}/cassandra-5.0.8/lib
mkdir -p "$LOGS" "$CACHE/debs"

# The names, read from the files that use them, so the two can never disagree.
PY_IMAGE=$(awk '/^FROM python:/ {print $2; exit}' Dockerfile)
REDIS_IMAGE=$(awk '$1 == "image:" && $2 ~ /^redis:/ {print $2; exit}' compose.yaml)
CASSANDRA_IMAGE=$(awk '$1 == "image:" && $2 ~ /^cassandra:/ {print $2; exit}' compose.yaml)
[ -n "$PY_IMAGE" ] && [ -n "$REDIS_IMAGE" ] && [ -n "$CASSANDRA_IMAGE" ] || die "cannot read the image names"

# The Debian mirror apt is configured with (deb822 or one-line sources), else Debian's own.
MIRROR=$(sed -n 's/^URIs: *\(http[^ ]*debian\/*\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
MIRROR=${MIRROR:-$(awk '$1 == "deb" && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm

have() { docker image inspect "$1" >/dev/null 2>&1; }

# debootstrap a minimal Debian with PACKAGES into a fresh folder and import it as NAME.
import_rootfs() {
  local name=$1 packages=$2 root=$CACHE/rootfs/${1//[:\/]/_}
  shift 2
  command -v debootstrap >/dev/null 2>&1 || step "apt-get install debootstrap" "$LOGS/apt-debootstrap.log" \
    env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap
  rm -rf "$root" && mkdir -p "$root"
  step "debootstrap $SUITE + $packages" "$LOGS/debootstrap-${name//[:\/]/_}.log" \
    debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$packages" "$SUITE" "$root" "$MIRROR"
  # Any extra set-up inside the new root (a command and its arguments).
  if [ $# -gt 0 ]; then chroot "$root" "$@" >>"$LOGS/debootstrap-${name//[:\/]/_}.log" 2>&1; fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/*
  step "docker import $name" "$LOGS/import-${name//[:\/]/_}.log" \
    bash -c "tar -C '$root' -c . | docker import -c 'ENV LANG=C.UTF-8' \
      -c 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
      -c 'LABEL org.sluice.standin=true' -c 'LABEL org.sluice.standin.hash=${STANDIN_HASH:-}' \
      ${IMPORT_CHANGES:-} - '$name'"
  rm -rf "$root"
}

standin_python() {
  # Debian's Python 3.11 as a venv at /usr/local: pip and /usr/local/bin/python3.11 where the official image
  # has them. Debian's own ca-certificates, as in the official image (never this machine's extra CAs).
  IMPORT_CHANGES="-c 'CMD [\"python3\"]'" import_rootfs "$PY_IMAGE" python3,python3-venv,ca-certificates \
    python3 -m venv /usr/local
}

standin_redis() {
  have sluice-standin/redis-base:sentinel || import_rootfs sluice-standin/redis-base:sentinel redis-server,redis-sentinel
  step "docker build $REDIS_IMAGE (stand-in)" "$LOGS/build-redis.log" \
    docker build --label org.sluice.standin=true --label "org.sluice.standin.hash=$STANDIN_HASH" \
      -t "$REDIS_IMAGE" containers/standin/redis
}

standin_cassandra() {
  [ -d "$JARS" ] || die "no Cassandra jars in $JARS: run make setup (or set SLUICE_CACHE_DIR)"
  have sluice-standin/cassandra-base:latest || import_rootfs sluice-standin/cassandra-base:latest openjdk-17-jre-headless
  local ctx=$CACHE/ctx-cassandra
  rm -rf "$ctx" && cp -r containers/standin/cassandra "$ctx" && cp -r "$JARS" "$ctx/lib"
  step "docker build $CASSANDRA_IMAGE (stand-in)" "$LOGS/build-cassandra.log" \
    docker build --label org.sluice.standin=true --label "org.sluice.standin.hash=$STANDIN_HASH" \
      -t "$CASSANDRA_IMAGE" "$ctx"
  rm -rf "$ctx"
}

# What a stand-in is made from: an image built from older files is rebuilt (pulled images carry no such label).
standin_hash() {
  {
    declare -f "$1"
    if [ -d "containers/standin/$3" ]; then
      (cd "containers/standin/$3" && find . -type f -print0 | sort -z | xargs -0 sha256sum)
    fi
  } | sha256sum | cut -c1-16
}

base_image() {
  local image=$1 standin=$2 hash; hash=$(standin_hash "$2" "$image" "$3")
  if have "$image"; then
    local labels standin_label label
    labels='{{index .Config.Labels "org.sluice.standin"}} {{index .Config.Labels "org.sluice.standin.hash"}}'
    read -r standin_label label <<<"$(docker image inspect --format "$labels" "$image")"
    if [ "$standin_label" != true ] || [ "$label" = "$hash" ]; then say "$image: present"; return; fi
    say "$image: a stand-in from older files ($label, now $hash); rebuilding it"
    STANDIN_HASH=$hash "$standin"
    return
  fi
  if timeout 120 docker pull "$image" >"$LOGS/pull.log" 2>&1; then say "$image: pulled"; return; fi
  say "$image: pull failed ($(tail -n 1 "$LOGS/pull.log" | cut -c1-90)); building a local stand-in"
  STANDIN_HASH=$hash "$standin"
}

base_image "$PY_IMAGE" standin_python python
base_image "$REDIS_IMAGE" standin_redis redis
base_image "$CASSANDRA_IMAGE" standin_cassandra cassandra

# Our images. The builder stages may need a CA bundle to reach PyPI (SLUICE_BUILD_CA_FILE, else SSL_CERT_FILE);
# it goes into containers/build-ca/, which only those stages read.
ca=${SLUICE_BUILD_CA_FILE:-${SSL_CERT_FILE:-}}
rm -f containers/build-ca/ca.crt
if [ -n "$ca" ] && [ -f "$ca" ]; then cp "$ca" containers/build-ca/ca.crt; fi
step "docker build sluice:local (runtime)" "$LOGS/build-runtime.log" \
  docker build --target runtime -t sluice:local .
step "docker build sluice-loadtest:local (loadtest)" "$LOGS/build-loadtest.log" \
  docker build --target loadtest -t sluice-loadtest:local .
for image in "$PY_IMAGE" "$REDIS_IMAGE" "$CASSANDRA_IMAGE" sluice:local sluice-loadtest:local; do
  say "  $(docker image inspect --format '{{index .RepoTags 0}}  {{.Size}} bytes' "$image")"
done

# The same local API key `make up` uses (.data/dev/api-key), so the README's curl lines work on either path.
KEY_FILE=.data/dev/api-key
if [ ! -s "$KEY_FILE" ]; then
  mkdir -p "$(dirname "$KEY_FILE")"
  (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(24))' >"$KEY_FILE")
fi
say "ready. The API key is in $KEY_FILE: $(cat "$KEY_FILE")"
say "  export SLUICE_API_KEYS=\$(cat $KEY_FILE); docker compose up -d --wait --scale worker=3"
