#!/bin/sh
# The official image turns protected mode off (other containers reach Redis over the network, not loopback);
# Debian's build keeps it on, so say it here. Arguments after ours override it.
set -e
if [ "${1:-}" = redis-server ]; then
  shift
  case "${1:-}" in
    ""|-*) exec redis-server --protected-mode no "$@" ;;
    *) conf=$1; shift; exec redis-server "$conf" --protected-mode no "$@" ;;
  esac
fi
exec "$@"
