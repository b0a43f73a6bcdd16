#!/usr/bin/env bash
# Run a beit_jax job on one machine (CPU, one or several GPUs, or a single TPU VM host).
#
#   launch/single_host.sh CONFIG WORKDIR [--config.key=value ...]
#   launch/single_host.sh configs/dvae_small.py runs/dvae_small --config.total_steps=2000
#
# All local accelerators form the ('data', 'fsdp') mesh (config.mesh). Re-running the same
# command resumes from the latest checkpoint in WORKDIR. Set CPU_DEVICES=N to split a CPU
# into N devices (useful to try a mesh on a laptop).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,10p' "$0"; exit 2
fi
config=$1; workdir=$2; shift 2
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
if [ -n "${CPU_DEVICES:-}" ]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES}"
fi
# GPUs: let XLA grow into memory instead of grabbing 75% up front (kinder to data workers).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec "$python" -m beit_jax.main --config="$config" --workdir="$workdir" "$@"
