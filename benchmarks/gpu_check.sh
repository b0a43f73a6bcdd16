#!/usr/bin/env bash
# The GPU check of issue 15 §3, in one command on a machine with an NVIDIA GPU:
#
#   bash benchmarks/gpu_check.sh                 # venv .venv-gpu, created + `.[gpu]` if missing
#   VENV=/path/to/venv bash benchmarks/gpu_check.sh   # a venv that already has jax[cuda12]
#   PY=python3 bash benchmarks/gpu_check.sh      # any Python with the project's dependencies
#
# BEiT-B MIM pretraining step (benchmarks/pretrain_step_throughput.py) in bfloat16 at
# global batch 64 and 128, with the DALL-E tokenizer in the step and without it (ViT +
# AdamW alone), through both attention paths (einsum; dot_product = cuDNN's fused kernel
# where it takes the case): img/s, MFU against the card's dense bf16 peak (FLOPs per image
# counted from the step's jaxpr, matmuls and convolutions), peak device memory
# (memory_stats()['peak_bytes_in_use'], one process per row so each peak is its own). Then,
# time left, one attention block alone through einsum / XLA / cuDNN
# (benchmarks/attention_paths.py). Rows past BUDGET_S seconds (default 300, install not
# counted) are skipped, and a row that fails prints its error and the others still run.
# Compiled programs are cached in JAX_COMPILATION_CACHE_DIR, so a rerun shows small
# "compile s" figures.
# What it decides: attention='auto' picks dot_product on GPU by expectation
# (beit_jax/models/attention.py); if einsum wins here, change `resolve` there.
#
# SMOKE=1 runs the same loop on whatever JAX sees (CPU included) with a 32 px test model
# and the compact tokenizer, in the venv .venv unless VENV says otherwise: a check of this
# script, not of a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

fail() { echo "gpu_check: $*" >&2; exit 1; }

SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  PY=${PY:-"${VENV:-.venv}/bin/python"}
  COMMON=(--variants=test --image_size=32 --patch_size=8 --vocab_size=64 --dtype=bfloat16 --steps=2)
  BATCHES=(4 8)
  TOKENIZERS=(none compact)
  ATTENTION_ARGS=(--batch_size=4 --width=32 --heads=2 --image_size=32 --patch_size=8 --paths=einsum,dot_product_xla)
else
  COMMON=(--variants=base --dtype=bfloat16 --steps=10 --require_gpu)
  BATCHES=(64 128)
  TOKENIZERS=(none dall_e)
  ATTENTION_ARGS=(--batch_size=64 --paths=einsum,dot_product_xla,dot_product_cudnn)
fi

# 1. A GPU, before anything is installed.
if [ "$SMOKE" = 1 ]; then
  :
elif command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L 2>/dev/null | grep -q "^GPU" || fail "nvidia-smi lists no GPU. Run this on a machine with an NVIDIA GPU."
elif [ ! -e /dev/nvidia0 ]; then
  fail "no NVIDIA GPU visible (no nvidia-smi, no /dev/nvidia0). Run this on a machine with an NVIDIA GPU."
fi

# 2. A Python whose JAX sees it: PY if given (any environment with the project's
# dependencies), else the venv VENV, created and given the project's `gpu` extra
# (jax[cuda12]) when its JAX sees no GPU.
VENV=${VENV:-.venv-gpu}
jax_sees_gpu() { "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" >/dev/null 2>&1; }
if [ "$SMOKE" = 1 ]; then
  :
elif [ -n "${PY:-}" ]; then
  jax_sees_gpu || fail "JAX of PY=$PY sees no GPU: $("$PY" -c 'import jax; print(jax.devices())' 2>&1 | tail -1)"
else
  PY="$VENV/bin/python"
  if ! jax_sees_gpu; then
    if [ ! -x "$PY" ]; then
      BASE_PY=$(command -v python3.11 || command -v python3) || fail "no python3 to create $VENV."
      "$BASE_PY" -m venv "$VENV" || fail "could not create the venv $VENV."
    fi
    echo "gpu_check: installing the project with its gpu extra into $VENV (pip install -e '.[gpu]')"
    "$PY" -m pip install --quiet --retries 1 --timeout 30 -e ".[gpu]" \
      || fail "pip install -e '.[gpu]' failed (no network here? set VENV or PY to one that has it)."
    jax_sees_gpu || fail "JAX in $VENV sees no GPU: $("$PY" -c 'import jax; print(jax.devices())' 2>&1 | tail -1)"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # beit_jax from this tree, installed or not.

# 3. The table.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/beit_jax_gpu_check_cache}
BUDGET_S=${BUDGET_S:-300}
LOG=${TMPDIR:-/tmp}/beit_jax_gpu_check.log
: > "$LOG"
START=$SECONDS
header=()
for batch in "${BATCHES[@]}"; do
  for tokenizer in "${TOKENIZERS[@]}"; do
    for attention in einsum dot_product; do
      row="batch $batch, tokenizer $tokenizer, attention $attention"
      if (( SECONDS - START > BUDGET_S - 30 )); then
        echo "skipped ($row): past the ${BUDGET_S} s budget"
        continue
      fi
      timeout 240 "$PY" benchmarks/pretrain_step_throughput.py "${COMMON[@]}" "${header[@]}" \
        --batch_size="$batch" --tokenizer="$tokenizer" --attention="$attention" 2>>"$LOG"
      rc=$?
      if (( rc == 2 )); then fail "JAX sees no GPU (see $LOG)."; fi
      if (( rc != 0 )); then
        echo "FAILED ($row, rc $rc): $(grep -v '^\s*$' "$LOG" | tail -1)"
      else
        header=(--no_header)
      fi
    done
  done
done
if (( SECONDS - START < BUDGET_S - 45 )); then
  echo
  timeout 90 "$PY" benchmarks/attention_paths.py "${ATTENTION_ARGS[@]}" --dtypes=bfloat16 \
    --repeats=20 2>>"$LOG" \
    || echo "FAILED (attention block): $(grep -v '^\s*$' "$LOG" | tail -1)"
fi
echo
echo "gpu_check: $((SECONDS - START)) s; stderr in $LOG. attention='auto' = dot_product on GPU" \
  "(beit_jax/models/attention.py resolve): keep it if dot_product's img/s beats einsum's above."
