#!/usr/bin/env bash
# Starts N training processes on this machine, each with its own CPU devices (the local
# multi-process mode of klip/distributed.py), one log per process.
#
#   launch/local.sh --num_processes=2 --devices_per_process=2 --log_dir=logs/local -- \
#       --config=configs/pretrain.py:smoke --workdir=workdirs/smoke2
#
# If a process fails, the others are stopped at once and, while --max_restarts allows, all of
# them start again on a fresh port and resume from the workdir's latest checkpoint. SIGTERM or
# SIGINT is passed on to every process (each saves and exits) and ends the launcher.
set -euo pipefail

usage() {
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  echo "options: --num_processes=N --devices_per_process=D --log_dir=DIR --port=P"
  echo "         --max_restarts=R --python=PYTHON --dry_run"
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NUM_PROCESSES=2
DEVICES=2
LOG_DIR="logs/local"
PORT=""
MAX_RESTARTS=0
DRY_RUN=0
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  PYTHON=python3
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; fi
fi

while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_processes=*) NUM_PROCESSES="${1#*=}" ;;
    --devices_per_process=*) DEVICES="${1#*=}" ;;
    --log_dir=*) LOG_DIR="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --max_restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (train flags go after --)" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
TRAIN_ARGS=("$@")
# glibc's huge pages for XLA:CPU's per-step temporaries (klip/host_memory.py), kept with any
# other tunables the caller set.
TUNABLES="${GLIBC_TUNABLES:-}"
if [[ ":$TUNABLES" != *":glibc.malloc.hugetlb="* ]]; then
  TUNABLES="${TUNABLES:+$TUNABLES:}glibc.malloc.hugetlb=1"
fi

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

command_for() {  # sets CMD: process $1 joining the coordinator on port $2
  CMD=(env JAX_PLATFORMS=cpu XLA_FLAGS= GLIBC_TUNABLES="$TUNABLES" PYTHONUNBUFFERED=1 "$PYTHON" -m klip.train
       --coordinator_address="127.0.0.1:$2" --num_processes="$NUM_PROCESSES" --process_id="$1"
       --num_cpu_devices="$DEVICES" "${TRAIN_ARGS[@]}")
}

if [[ "$DRY_RUN" == 1 ]]; then
  port="${PORT:-$(free_port)}"
  echo "cd $(printf '%q' "$ROOT") && mkdir -p $(printf '%q' "$LOG_DIR")"
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    command_for "$i" "$port"
    printf '%q ' "${CMD[@]}"
    echo "> $(printf '%q' "$LOG_DIR/process_$i.log") 2>&1 &"
  done
  echo "wait  # on a failure: stop the others, restart all (max $MAX_RESTARTS)"
  exit 0
fi

cd "$ROOT"
mkdir -p "$LOG_DIR"
PIDS=()
stop_all() {  # signal $1 to every process still running
  local pid
  for pid in "${PIDS[@]}"; do kill "-$1" "$pid" 2>/dev/null || true; done
}
TERMINATING=0
on_signal() {
  TERMINATING=1
  echo "local.sh: passing SIGTERM to ${#PIDS[@]} process(es)" >&2
  stop_all TERM
}
trap on_signal TERM INT

attempt=0
while true; do
  port="${PORT:-$(free_port)}"
  PIDS=()
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    command_for "$i" "$port"
    "${CMD[@]}" >>"$LOG_DIR/process_$i.log" 2>&1 &
    PIDS+=("$!")
  done
  echo "local.sh: $NUM_PROCESSES process(es) x $DEVICES CPU devices, port $port, logs in $LOG_DIR" >&2
  failed=""
  remaining=("${PIDS[@]}")
  while [[ ${#remaining[@]} -gt 0 ]]; do
    set +e
    wait -n -p done_pid "${remaining[@]}" 2>/dev/null
    rc=$?
    set -e
    if [[ -z "${done_pid:-}" ]]; then
      # Bash drops a job killed by a signal from its job table once it has reported it, and
      # `wait -n` then answers "no such job" for that pid forever; `wait PID` still returns
      # the status bash saved. Without a dead pid here, a trapped signal interrupted the wait.
      for pid in "${remaining[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
          done_pid="$pid"
          set +e
          wait "$pid"
          rc=$?
          set -e
          break
        fi
      done
      if [[ -z "${done_pid:-}" ]]; then continue; fi
    fi
    next=()
    for pid in "${remaining[@]}"; do [[ "$pid" != "$done_pid" ]] && next+=("$pid"); done
    remaining=("${next[@]+"${next[@]}"}")
    if [[ "$rc" != 0 && -z "$failed" ]]; then
      for ((i = 0; i < NUM_PROCESSES; i++)); do
        if [[ "${PIDS[$i]}" == "$done_pid" ]]; then failed="process $i exited with status $rc"; fi
      done
      echo "local.sh: $failed (log: $LOG_DIR); stopping the others" >&2
      stop_all KILL
    fi
    unset done_pid
  done
  if [[ -z "$failed" ]]; then exit 0; fi
  if [[ "$TERMINATING" == 1 || "$attempt" -ge "$MAX_RESTARTS" ]]; then
    echo "local.sh: giving up: $failed" >&2
    exit 1
  fi
  attempt=$((attempt + 1))
  echo "local.sh: restart $attempt of $MAX_RESTARTS: resuming from the latest checkpoint" >&2
done
