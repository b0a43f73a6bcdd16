#!/usr/bin/env bash
# Run a beit_jax job on a Cloud TPU VM pod slice (every host runs the same command).
#
#   launch/tpu_pod.sh create                       # make the slice ($TPU_NAME, $ZONE, $ACCELERATOR, $TPU_VERSION)
#   launch/tpu_pod.sh setup                        # copy this checkout to every host, install [tpu,gcs]
#   launch/tpu_pod.sh run CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_pod.sh delete                       # tear the slice down
#
# e.g. TPU_NAME=beit ZONE=us-east5-a ACCELERATOR=v5p-64 launch/tpu_pod.sh create
#      launch/tpu_pod.sh run configs/pretrain_base.py gs://BUCKET/beit_base \
#        --config.tokenizer.path=gs://BUCKET/dall_e --config.data.data_dir=gs://BUCKET/tfds
#
# On a pod every host is one JAX process: beit_jax.main sees TPU_WORKER_HOSTNAMES and calls
# jax.distributed.initialize() (--distributed=auto), each host reads its own slice of the
# data, and Orbax writes the checkpoints together. WORKDIR and the data must be on storage
# every host sees (a gs:// bucket). Re-running `run` resumes from the latest checkpoint.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v5p-32}
TPU_VERSION=${TPU_VERSION:-v2-alpha-tpuv5}
REMOTE_DIR=${REMOTE_DIR:-beit_jax}
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}
cmd=${1:-}; shift || true
case "$cmd" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="$TPU_VERSION" ;;
  setup)
    cd "$(dirname "$0")/.."
    git archive --format=tar.gz -o /tmp/beit_jax_src.tar.gz HEAD
    gcloud compute tpus tpu-vm scp /tmp/beit_jax_src.tar.gz "$TPU_NAME":/tmp/ \
      --zone="$ZONE" --worker=all
    ssh_all "mkdir -p $REMOTE_DIR && tar -xzf /tmp/beit_jax_src.tar.gz -C $REMOTE_DIR && \
      cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu,gcs]'" ;;
  run)
    [ $# -ge 2 ] || { sed -n '2,16p' "$0"; exit 2; }
    config=$1; workdir=$2; shift 2
    extra=$(printf ' %q' "$@")
    ssh_all "cd $REMOTE_DIR && .venv/bin/python -m beit_jax.main --config=$config \
      --workdir=$workdir$extra 2>&1 | tee -a /tmp/beit_jax.log" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet ;;
  *)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
