#!/usr/bin/env bash
# Submits and manages launch/slurm.sbatch jobs; --dry_run prints every command instead.
#
#   launch/slurm.sh submit --nodes=4 --gpus_per_node=8 -- --config=configs/pretrain.py:base \
#       --workdir=/shared/workdirs/base --config.data.data_dir=/shared/data
#   launch/slurm.sh logs|status|stop|cancel --job=JOBID
#
# Commands: submit (sbatch), logs (the end of every task's log), status (squeue and sacct),
# stop (SIGTERM to the tasks: they save a checkpoint and exit), cancel (scancel).
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

COMMAND="${1:-}"
if [[ -z "$COMMAND" || "$COMMAND" == -h || "$COMMAND" == --help ]]; then usage; exit 0; fi
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODES=2
GPUS=8
TIME="24:00:00"
PARTITION=""
JOB=""
LINES=100
DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --gpus_per_node=*) GPUS="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --job=*) JOB="${1#*=}" ;;
    --lines=*) LINES="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; break ;;
    *) echo "slurm.sh: unknown option $1 (train flags go after --)" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if ! command -v sbatch >/dev/null 2>&1; then
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# note: SLURM (sbatch) is not installed here; printing the commands anyway" >&2
  else
    echo "slurm.sh: sbatch is not on PATH: run this on a SLURM login node, or use --dry_run" >&2
    exit 1
  fi
fi

quote() {  # one argument, shell-quoted only where needed (globs stay globs)
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%*-]*$ ]]; then printf '%s' "$1"; else
    printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

run() {  # prints a command so it can be pasted, then runs it unless --dry_run
  local line="" arg
  for arg in "$@"; do line+="$(quote "$arg") "; done
  echo "${line% }"
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

need_job() {
  if [[ -z "$JOB" ]]; then echo "slurm.sh: $COMMAND needs --job=JOBID" >&2; exit 2; fi
}

case "$COMMAND" in
  submit)
    args=(sbatch --nodes="$NODES" --ntasks-per-node="$GPUS" --gpus-per-node="$GPUS"
          --time="$TIME")
    if [[ -n "$PARTITION" ]]; then args+=(--partition="$PARTITION"); fi
    cd "$ROOT"
    run "${args[@]}" launch/slurm.sbatch "$@" ;;
  logs)
    need_job
    run tail -n "$LINES" "$ROOT"/logs/*-"$JOB"-task*.log ;;
  status)
    need_job
    run squeue --job="$JOB"
    run sacct --jobs="$JOB" --format=JobID,State,Elapsed,NodeList,ExitCode ;;
  stop)
    need_job
    run scancel --signal=TERM "$JOB" ;;  # the tasks only: no requeue
  cancel)
    need_job
    run scancel "$JOB" ;;
  *) echo "slurm.sh: unknown command $COMMAND" >&2; usage >&2; exit 2 ;;
esac
