#!/usr/bin/env bash
# Runs one worker's training command and restarts it when it fails, so that it resumes from
# the latest checkpoint (used on each Cloud TPU worker and each SLURM task).
#
#   launch/supervise.sh --max_restarts=5 --restart_delay_s=90 --pid_file=F -- \
#       python -m klip.train ...
#
# When a worker dies, the others fail fast (klip/distributed.py heartbeats) and restart too;
# the delay should exceed --heartbeat_timeout_s so that they all meet a fresh coordinator.
# SIGTERM (stop, preemption) is passed to the command, which saves and exits; no restart then.
set -euo pipefail

MAX_RESTARTS=5
DELAY=90
PID_FILE=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --max_restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --restart_delay_s=*) DELAY="${1#*=}" ;;
    --pid_file=*) PID_FILE="${1#*=}" ;;
    --) shift; break ;;
    *) echo "supervise.sh: unknown option $1 (the command goes after --)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -eq 0 ]]; then
  echo "supervise.sh: no command given" >&2
  exit 2
fi
child=""
stopping=0
on_term() {
  stopping=1
  echo "supervise.sh: SIGTERM: passing it on to the training process" >&2
  if [[ -n "$child" ]]; then kill -TERM "$child" 2>/dev/null || true; fi
}
trap on_term TERM INT
if [[ -n "$PID_FILE" ]]; then echo "$$" >"$PID_FILE"; fi

attempt=0
while true; do
  "$@" &
  child=$!
  if [[ "$stopping" == 1 ]]; then kill -TERM "$child" 2>/dev/null || true; fi  # TERM came early
  # wait returns early when a trapped signal arrives: wait again until the command is gone
  wait "$child" && rc=0 || rc=$?
  while kill -0 "$child" 2>/dev/null; do
    wait "$child" && rc=0 || rc=$?
  done
  if [[ "$rc" == 0 || "$stopping" == 1 ]]; then exit "$rc"; fi
  if [[ "$attempt" -ge "$MAX_RESTARTS" ]]; then
    echo "supervise.sh: exit status $rc after $attempt restart(s): giving up" >&2
    exit "$rc"
  fi
  attempt=$((attempt + 1))
  echo "supervise.sh: exit status $rc; restart $attempt of $MAX_RESTARTS in ${DELAY} s" >&2
  sleep "$DELAY" & wait $! || true
  if [[ "$stopping" == 1 ]]; then exit 0; fi
done
