"""Multi-process start-up: `jax.distributed.initialize()` when the job has several processes.

One `python -m beit_jax.main` process runs per host (TPU VM pods) or per GPU (Slurm), all
with the same command. They must call `jax.distributed.initialize` before JAX touches a
backend; afterwards `jax.devices()` lists every device of the job, each process feeds its
own slice of the data (`data/pipeline.py` shards by `jax.process_index()`), global batches
are assembled with `jax.make_array_from_process_local_data`, Orbax writes checkpoints
collectively, and only process 0 writes metrics and metadata.

When to initialise (`--distributed`):
  auto  (default) if coordinator flags are given, or the environment is a multi-process
        job: a Slurm step with more than one task (`SLURM_NTASKS` > 1), a Cloud TPU pod
        slice (`TPU_WORKER_HOSTNAMES` lists more than one host, or
        `MEGASCALE_COORDINATOR_ADDRESS` is set), or `BEIT_JAX_DISTRIBUTED=1`; otherwise not
        (one process: a laptop, one GPU machine, a single TPU VM host);
  on    always, letting JAX detect the cluster (TPU pods, Slurm, Open MPI);
  off   never.
Explicit `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` work anywhere,
including several processes on one CPU machine (collectives over gloo).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
from absl import logging

from beit_jax.training import console

MODES = ("auto", "on", "off")


def cluster_hint(env: Mapping[str, str]) -> str | None:
  """The kind of multi-process job the environment describes, or None."""
  if env.get("BEIT_JAX_DISTRIBUTED", "") in ("1", "true", "yes"):
    return "BEIT_JAX_DISTRIBUTED=1"
  try:
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
      return f"Slurm ({env['SLURM_NTASKS']} tasks)"
  except ValueError:
    pass
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1:
    return f"TPU pod ({len(hosts)} hosts)"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "TPU multislice"
  return None


def should_initialize(
  mode: str, coordinator_address: str | None, env: Mapping[str, str]
) -> tuple[bool, str]:
  """(initialise?, why) for a `--distributed` mode."""
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}; choose one of {MODES}.")
  if mode == "off":
    return False, "--distributed=off"
  if coordinator_address:
    return True, f"coordinator {coordinator_address}"
  if mode == "on":
    return True, "--distributed=on (cluster auto-detected by JAX)"
  hint = cluster_hint(env)
  return (hint is not None), (hint or "single process")


def initialize(
  mode: str = "auto",
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: list[int] | None = None,
  env: Mapping[str, str] | None = None,
) -> bool:
  """Initialises JAX's distributed runtime if the job needs it; returns whether it did.

  Must run before anything creates a JAX backend (no `jax.devices()` before it).
  """
  env = os.environ if env is None else env
  start, why = should_initialize(mode, coordinator_address, env)
  if not start:
    logging.info("Single-process run (%s).", why, extra={console.FILE_ONLY: True})
    return False
  if coordinator_address and (num_processes is None or process_id is None):
    raise ValueError("--coordinator_address needs --num_processes and --process_id too.")
  kwargs = {}
  if coordinator_address:
    kwargs = dict(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  if local_device_ids is not None:
    kwargs["local_device_ids"] = local_device_ids
  logging.info("Initialising jax.distributed (%s).", why)
  jax.distributed.initialize(**kwargs)
  return True
