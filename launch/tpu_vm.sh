#!/usr/bin/env bash
# Cloud TPU VMs: create, set up, sync, run on all workers, watch, stop, delete.
#
#   launch/tpu_vm.sh up --name=klip-base --zone=us-west4-a --accelerator_type=v5litepod-16 \
#       --bucket=gs://my-klip --spot -- --config.data.data_dir=/mnt/klip/data
#   launch/tpu_vm.sh logs|status|stop|delete --name=klip-base --zone=us-west4-a [--spot]
#
# Commands (each idempotent; --dry_run prints every gcloud command instead of running it):
#   create     the TPU VM, or a queued resource with --queued, --spot or --num_slices > 1
#   sync       copy this checkout (without .venv, .git, data, workdirs) to ~/klip on all workers
#   setup      once per worker: a venv with requirements.txt + jax[tpu]; BUCKET/data mounted
#              at /mnt/klip/data (gcsfuse) for the input pipeline. The workdir is
#              BUCKET/workdirs/NAME, written by Orbax/TensorStore and gcsfs directly, not through
#              the mount (a gcsfuse directory rename is a copy: not atomic)
#   run        the same training command on all workers under launch/supervise.sh, one log per
#              worker in ~/klip-logs (not started twice)
#   up         create, sync, setup, run
#   logs       the end of every worker's log (--follow: follow worker 0's)
#   status     the TPU state and whether each worker trains
#   stop       SIGTERM to training on all workers: it saves a checkpoint and exits
#   delete     the TPU VM or queued resource
#   keepalive  every --poll_s: if the TPU was preempted or failed, delete, re-create, sync, set
#              up and run again (training resumes from the workdir); ends when the run finishes
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMMAND="${1:-}"
if [[ -z "$COMMAND" || "$COMMAND" == -h || "$COMMAND" == --help ]]; then usage; exit 0; fi
shift

NAME="${TPU_NAME:-}"
ZONE="${CLOUDSDK_COMPUTE_ZONE:-us-west4-a}"
PROJECT="${CLOUDSDK_CORE_PROJECT:-}"
ACCELERATOR="v5litepod-16"
RUNTIME="v2-alpha-tpuv5-lite"
NUM_SLICES=1
SPOT=0
QUEUED=0
BUCKET=""
CONFIG="configs/pretrain.py:base"
WORKDIR=""
MAX_RESTARTS=5
LINES=100
FOLLOW=0
POLL_S=300
DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --accelerator_type=*) ACCELERATOR="${1#*=}" ;;
    --runtime_version=*) RUNTIME="${1#*=}" ;;
    --num_slices=*) NUM_SLICES="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --max_restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --lines=*) LINES="${1#*=}" ;;
    --follow) FOLLOW=1 ;;
    --poll_s=*) POLL_S="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option $1 (train flags go after --)" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
TRAIN_ARGS=("$@")
if [[ -z "$NAME" ]]; then echo "tpu_vm.sh: --name (or TPU_NAME) is required" >&2; exit 2; fi
if [[ "$NUM_SLICES" -gt 1 || "$SPOT" == 1 ]]; then QUEUED=1; fi
if [[ -n "$BUCKET" ]]; then WORKDIR="${WORKDIR:-${BUCKET%/}/workdirs/$NAME}"; fi
WORKDIR="${WORKDIR:-/mnt/klip/workdirs/$NAME}"
JAX_VERSION="$(sed -n 's/^jax==//p' "$ROOT/requirements.txt")"
TARBALL="/tmp/klip-$NAME.tgz"
LOGS="\$HOME/klip-logs"
PID_FILE="$LOGS/supervise.pid"

if ! command -v gcloud >/dev/null 2>&1; then
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# note: gcloud is not installed (https://cloud.google.com/sdk/docs/install);" \
      "printing the commands anyway" >&2
  else
    echo "tpu_vm.sh: gcloud is not installed or not on PATH: install the Google Cloud SDK" \
      "(https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login'," \
      "or use --dry_run to print the commands" >&2
    exit 1
  fi
fi

quote() {  # one argument, shell-quoted only where needed (--flag='value' for flags)
  local prefix="" value="$1"
  if [[ "$value" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    prefix="${BASH_REMATCH[1]}"
    value="${BASH_REMATCH[2]}"
  fi
  if [[ "$value" =~ ^[A-Za-z0-9_./:=@,+%-]*$ ]]; then printf '%s%s' "$prefix" "$value"; else
    printf "%s'%s'" "$prefix" "${value//\'/\'\\\'\'}"; fi
}

run() {  # prints a command so it can be pasted, then runs it unless --dry_run
  local line="" arg
  for arg in "$@"; do line+="$(quote "$arg") "; done
  echo "${line% }"
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

LOCATION=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then LOCATION+=(--project="$PROJECT"); fi
NODES=("$NAME")
if [[ "$NUM_SLICES" -gt 1 ]]; then
  NODES=()
  for ((i = 0; i < NUM_SLICES; i++)); do NODES+=("$NAME-$i"); done
fi

on_workers() {  # runs a shell command on every worker of every slice
  if [[ "$NUM_SLICES" -gt 1 ]]; then
    run gcloud compute tpus queued-resources ssh "$NAME" "${LOCATION[@]}" --node=all \
      --worker=all --command="$1"
  else
    run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$1"
  fi
}

if [[ "$QUEUED" == 1 ]]; then
  DESCRIBE=(gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}"
            --format='value(state.state)')
else
  DESCRIBE=(gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" --format='value(state)')
fi

read_state() {  # sets STATE: the TPU's state, empty if it does not exist; DRY_RUN in a dry run
  if [[ "$DRY_RUN" == 1 ]]; then run "${DESCRIBE[@]}"; STATE=DRY_RUN; return; fi
  STATE="$("${DESCRIBE[@]}" 2>/dev/null || true)"
}

do_create() {
  read_state
  if [[ -n "$STATE" && "$STATE" != DRY_RUN ]]; then
    echo "# $NAME exists ($STATE): not created again"
    return
  fi
  if [[ "$QUEUED" == 1 ]]; then
    local create=(gcloud compute tpus queued-resources create "$NAME" "${LOCATION[@]}"
                  --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME")
    if [[ "$NUM_SLICES" -gt 1 ]]; then
      create+=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
    else
      create+=(--node-id="$NAME")
    fi
    if [[ "$SPOT" == 1 ]]; then create+=(--spot); fi
    run "${create[@]}"
    echo "# wait until the queued resource is ACTIVE:"
    read_state
    until [[ "$STATE" =~ ^(ACTIVE|DRY_RUN)$ ]]; do sleep 30; read_state; done
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
  fi
}

do_sync() {
  run tar -czf "$TARBALL" -C "$ROOT" --exclude=./.venv --exclude=./.git --exclude=./.cache \
    --exclude=./data --exclude=./workdirs --exclude=./logs .
  local node
  for node in "${NODES[@]}"; do
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$node:klip.tgz" "${LOCATION[@]}" --worker=all
  done
  on_workers "mkdir -p ~/klip && tar -xzf ~/klip.tgz -C ~/klip"
}

do_setup() {
  local venv="cd ~/klip && if [ ! -f .venv/klip-setup-done ]; then python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION' && touch .venv/klip-setup-done; fi"
  if [[ -z "$BUCKET" ]]; then
    echo "# no --bucket: the workdir $WORKDIR must be a directory every worker shares"
    on_workers "$venv"
    return
  fi
  local gcsfuse="command -v gcsfuse >/dev/null || { echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }"
  # Only BUCKET/data is mounted: the input pipeline reads POSIX paths (klip/data/dataset.py).
  local mount="mountpoint -q /mnt/klip/data || { sudo mkdir -p /mnt/klip/data && sudo chown -R \"\$USER\" /mnt/klip && gcsfuse --implicit-dirs --only-dir=data ${BUCKET#gs://} /mnt/klip/data; }"
  on_workers "{ $venv; } && { $gcsfuse; } && { $mount; }"
}

train_command() {
  local args=(.venv/bin/python -m klip.train --config="$CONFIG" --workdir="$WORKDIR")
  if [[ "$NUM_SLICES" -gt 1 ]]; then args+=(--config.mesh.slice="$NUM_SLICES"); fi
  args+=("${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")
  local line="" arg
  for arg in "${args[@]}"; do line+="$(quote "$arg") "; done
  echo "${line% }"
}

do_run() {
  on_workers "cd ~/klip && mkdir -p $LOGS && if [ -f $PID_FILE ] && kill -0 \$(cat $PID_FILE) 2>/dev/null; then echo \"\$(hostname): already training\"; else nohup launch/supervise.sh --max_restarts=$MAX_RESTARTS --pid_file=$PID_FILE -- $(train_command) > $LOGS/train-\$(hostname).log 2>&1 < /dev/null & fi"
}

do_logs() {
  if [[ "$FOLLOW" == 1 ]]; then
    run gcloud compute tpus tpu-vm ssh "${NODES[0]}" "${LOCATION[@]}" --worker=0 \
      --command="tail -F $LOGS/train-*.log"
  else
    on_workers "for f in $LOGS/train-*.log; do echo \"== \$f\"; tail -n $LINES \"\$f\"; done"
  fi
}

do_status() {
  run "${DESCRIBE[@]}"
  on_workers "if [ -f $PID_FILE ] && kill -0 \$(cat $PID_FILE) 2>/dev/null; then echo \"\$(hostname): training\"; else echo \"\$(hostname): not training\"; fi; tail -n 1 $LOGS/train-*.log"
}

do_stop() {
  on_workers "if [ -f $PID_FILE ]; then kill -TERM \$(cat $PID_FILE) 2>/dev/null || true; fi"
}

do_delete() {
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
  fi
}

do_up() { do_create; do_sync; do_setup; do_run; }

finished() {  # worker 0 of the first slice logged the end of the run
  run gcloud compute tpus tpu-vm ssh "${NODES[0]}" "${LOCATION[@]}" --worker=0 \
    --command="grep -q 'KLIP run finished' $LOGS/train-*.log"
}

do_keepalive() {
  while true; do
    read_state
    case "$STATE" in
      ACTIVE|READY|CREATING|PROVISIONING|ACCEPTED|WAITING_FOR_RESOURCES) ;;
      *)
        echo "# if $NAME is preempted, failed or gone: re-create it; training resumes from $WORKDIR"
        if [[ -n "$STATE" ]]; then do_delete; fi
        do_up ;;
    esac
    if [[ "$DRY_RUN" == 1 ]]; then
      finished
      echo "sleep $POLL_S  # and again, until the run has finished"
      return
    fi
    if finished >/dev/null 2>&1; then echo "# the run finished" >&2; return; fi
    sleep "$POLL_S"
  done
}

case "$COMMAND" in
  create) do_create ;;
  sync) do_sync ;;
  setup) do_setup ;;
  run) do_run ;;
  up) do_up ;;
  logs) do_logs ;;
  status) do_status ;;
  stop) do_stop ;;
  delete) do_delete ;;
  keepalive) do_keepalive ;;
  *) echo "tpu_vm.sh: unknown command $COMMAND" >&2; usage >&2; exit 2 ;;
esac
