#!/usr/bin/env bash
# GPU benchmark (bench/gpu_step.py): configs/pretrain.py:base, bf16, the full multi-objective
# train step on synthetic in-memory batches, on one lent H100/H200. Prints examples/s, achieved
# TFLOP/s, MFU against 989 TFLOP/s and against a bf16 matmul measured in the same run; writes
# $OUT/gpu.json (else bench/out/gpu.json). A few minutes: compile, then 10 steps.
#
#   bench/gpu.sh                     # on the GPU host
#   bench/gpu.sh --batch=128         # if 256 does not fit (it also halves by itself on OOM)
#   bench/gpu.sh --small             # CPU check at tiny shapes (uses .venv)
#
# The GPU host has jax (CUDA), flax, optax and orbax, no network and no grain/tfds/
# sentencepiece; the script imports none of those. configs/pretrain.py needs ml_collections
# (pure Python): if the host lacks it, the copy in a carried .venv is put on the path.
set -euo pipefail
cd "$(dirname "$0")/.."

small=0
for arg in "$@"; do [[ "$arg" == "--small" ]] && small=1; done

pick_python() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
  if [[ $small == 1 && -x .venv/bin/python ]]; then echo .venv/bin/python; return; fi
  for py in python3 python; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c "import jax" >/dev/null 2>&1; then
      echo "$py"; return
    fi
  done
  echo "bench/gpu.sh: no python with jax found (set PYTHON=...)" >&2
  exit 2
}
PY=$(pick_python)

extra=""
if ! "$PY" -c "import ml_collections" >/dev/null 2>&1; then
  found=""
  for dir in .venv/lib/python3*/site-packages/ml_collections; do
    [[ -d "$dir" ]] && found=$dir && break
  done
  if [[ -z "$found" ]]; then
    echo "bench/gpu.sh: $PY lacks ml_collections (needed by configs/pretrain.py). Carry" \
         ".venv/lib/python3.11/site-packages/ml_collections along, or pip install" \
         "ml_collections" >&2
    exit 2
  fi
  extra=$(mktemp -d)
  ln -s "$PWD/$found" "$extra/ml_collections"
  echo "bench/gpu.sh: using ml_collections from $found" >&2
fi

export PYTHONPATH="$PWD${extra:+:$extra}${PYTHONPATH:+:$PYTHONPATH}"
if [[ $small == 1 ]]; then export JAX_PLATFORMS=cpu; fi
exec "$PY" -m bench.gpu_step "$@"
