#!/usr/bin/env bash
# One GPU (or one TPU VM host): install the accelerator extra once, then run any config.
#
#   python3.11 -m venv .venv && .venv/bin/pip install -e ".[gpu]"      # once (CUDA 12 wheels)
#   launch/single_gpu.sh configs/pretrain_base.py runs/beit_base \
#     --config.input.batch_size=256 --config.tokenizer.path=runs/dall_e
#
# bf16 compute is the default on GPU (config.model.dtype=auto); lower the batch (and lr)
# to fit memory, or turn on per-block rematerialisation with --config.model.remat=True.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,9p' "$0"; exit 2; }
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
exec "$(dirname "$0")/single_host.sh" "$@"
