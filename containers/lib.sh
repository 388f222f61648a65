# Shared helpers for the container tooling: progress lines with elapsed times, so no step is ever silent.
# Sourced, not run.
SLUICE_T0=${SLUICE_T0:-$(date +%s)}
export SLUICE_T0

say() { printf '[containers %4ss] %s\n' "$(( $(date +%s) - SLUICE_T0 ))" "$*"; }
die() { say "FAILED: $*" >&2; exit 1; }

# Run a long command with its output in LOG, printing a heartbeat line every 20 s while it runs and the
# log's tail if it fails. Usage: step "what" LOG cmd args...
step() {
  local what=$1 log=$2; shift 2
  local start; start=$(date +%s)
  say "$what ..."
  "$@" >"$log" 2>&1 &
  local pid=$! next=$(( start + 20 ))
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    local now; now=$(date +%s)
    if (( now >= next )); then
      say "  $what: $(( now - start ))s so far ($(tail -n 1 "$log" 2>/dev/null | cut -c1-100))"
      next=$(( now + 20 ))
    fi
  done
  if ! wait "$pid"; then
    tail -n 40 "$log" >&2
    die "$what (log: $log)"
  fi
  say "$what: done in $(( $(date +%s) - start ))s"
}
