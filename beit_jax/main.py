r"""Entry point: `python -m beit_jax.main --config=configs/FILE.py[:ARGS] --workdir=DIR`.

The config's `task` field picks the job:
  dvae          train a Gumbel-softmax dVAE visual tokenizer (beit_jax/tasks/dvae.py)
  pretrain      BEiT masked image modeling against a frozen tokenizer (beit_jax/tasks/pretrain.py)
  finetune      classification fine-tuning of a (pretrained) backbone (beit_jax/tasks/finetune.py)
  linear_probe  linear probes on every block of a frozen backbone (beit_jax/tasks/linear_probe.py)

Any config value can be overridden: `--config.total_steps=100 --config.data.source=folder`.
A key that does not exist, or a value of the wrong type, stops the run before anything
starts; values are checked by the task before anything is compiled or written.
"""

from __future__ import annotations

import importlib
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from beit_jax import config_lib
from beit_jax.training import distributed
from beit_jax.training import workdir as workdir_lib

TASKS = {
  "dvae": "beit_jax.tasks.dvae",
  "pretrain": "beit_jax.tasks.pretrain",
  "finetune": "beit_jax.tasks.finetune",
  "linear_probe": "beit_jax.tasks.linear_probe",
}

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a config file in configs/ (optionally FILE.py:ARGS).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Directory for checkpoints, metrics and exports "
  "(default: runs/<config file name>). Re-running in the same workdir resumes.",
)
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "Multi-process start-up (beit_jax/training/distributed.py): auto = when the environment "
  "is a multi-process job (Slurm with several tasks, a TPU pod slice) or coordinator "
  "flags are given.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "HOST:PORT of process 0, for an explicit multi-process "
  "launch (with --num_processes and --process_id).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_OVERWRITE = flags.DEFINE_bool(
  "overwrite",
  False,
  "If the workdir holds a run of a different config (model, input, "
  "mask, seed, task), move it into WORKDIR/replaced-<time>/ and start afresh instead of "
  "refusing (beit_jax/training/workdir.py).",
)
flags.mark_flag_as_required("config")


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", name)


def run_task(config, workdir: str, overwrite: bool = False) -> None:
  """Dispatches to `train_and_evaluate(config, workdir)` of the task's module, after
  checking that the config's bucket paths and `workdir` can be opened here and that
  `workdir` does not hold a run of another config."""
  task = config.get("task")
  if task not in TASKS:
    raise ValueError(f"config.task={task!r} is not a known task; choose one of {sorted(TASKS)}.")
  config_lib.check_storage(config, workdir)  # Before the workdir is read.
  workdir_lib.check(config, workdir, overwrite)
  importlib.import_module(TASKS[task]).train_and_evaluate(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Before anything creates a JAX backend (importing jax does not).
  distributed.initialize(
    _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
  )
  workdir = _WORKDIR.value or default_workdir(
    config_flags.get_config_filename(flags.FLAGS["config"])
  )
  logging.info(
    "JAX %s | process %d/%d | %d devices (%s) | workdir %s",
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.device_count(),
    jax.devices()[0].platform,
    workdir,
  )
  run_task(_CONFIG.value, workdir, _OVERWRITE.value)


if __name__ == "__main__":
  app.run(main)
