r"""Entry point: `python -m beit_jax.main --config=configs/FILE.py[:ARGS] --workdir=DIR`.

The config's `task` field picks the job:
  dvae          train a Gumbel-softmax dVAE visual tokenizer (beit_jax/tasks/dvae.py)
  vqkd          train BEiT v2's VQ-KD tokenizer against a frozen teacher (beit_jax/tasks/vqkd.py)
  pretrain      BEiT masked image modeling against a frozen tokenizer (beit_jax/tasks/pretrain.py)
  finetune      classification fine-tuning of a (pretrained) backbone (beit_jax/tasks/finetune.py)
  linear_probe  linear probes on every block of a frozen backbone (beit_jax/tasks/linear_probe.py)
  segment       semantic segmentation, BEiT + UperNet (beit_jax/tasks/segment.py)

Any config value can be overridden: `--config.total_steps=100 --config.data.source=folder`.
A key that does not exist (named with the closest valid keys), or a value of the wrong
type, stops the run before anything starts; values are checked by the task before
anything is compiled or written. Bad input of any kind prints one line, `error: ...`,
and exits with status 2 (`--verbosity=1` shows the traceback too).

The console shows the progress lines and this package's messages; every library's INFO
goes to WORKDIR/log.txt (beit_jax/training/console.py); `--verbosity=1` restores absl's
full console.
"""

from __future__ import annotations

import importlib
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from beit_jax import config_lib, paths
from beit_jax.training import console, distributed, loop
from beit_jax.training import workdir as workdir_lib

TASKS = {
  "dvae": "beit_jax.tasks.dvae",
  "vqkd": "beit_jax.tasks.vqkd",
  "pretrain": "beit_jax.tasks.pretrain",
  "finetune": "beit_jax.tasks.finetune",
  "linear_probe": "beit_jax.tasks.linear_probe",
  "segment": "beit_jax.tasks.segment",
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
_REEVALUATE = flags.DEFINE_bool(
  "reevaluate",
  False,
  "A run that already ended in this workdir is not run again (its summary is printed); "
  "with --reevaluate it is evaluated and exported again from its last checkpoint.",
)
flags.mark_flag_as_required("config")


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", name)


# What counts as bad input (a value, a path, a workdir, a missing package or input, a run
# that cannot go on): one line and exit status 2, not a traceback.
INPUT_ERRORS = (
  ValueError,
  FileNotFoundError,
  NotADirectoryError,
  paths.StorageBackendMissing,
  loop.NonFiniteError,
)


def run_task(config, workdir: str, overwrite: bool = False, reevaluate: bool = False) -> None:
  """Dispatches to `train_and_evaluate(config, workdir)` of the task's module, after
  checking the config's values, that its bucket paths and `workdir` can be opened here
  and that `workdir` does not hold a run of another config. A run that already ended
  there prints its summary and stops, unless `reevaluate`."""
  task = config.get("task")
  if task not in TASKS:
    raise ValueError(f"config.task={task!r} is not a known task; choose one of {sorted(TASKS)}.")
  module = importlib.import_module(TASKS[task])
  module.check_config(config)
  config_lib.check_storage(config, workdir)  # Before the workdir is read.
  workdir_lib.check(config, workdir, overwrite)
  done = workdir_lib.completed(workdir, config.total_steps)
  if done is not None and not reevaluate:
    logging.info(
      "%s",
      "\n".join(
        [f"This run is complete ({config.total_steps} steps in {workdir}): nothing to do."]
        + [f"  {line}" for line in done]
        + ["Pass --reevaluate to evaluate and export it again, or raise total_steps."]
      ),
    )
    return
  module.train_and_evaluate(config, workdir)


def _config_overrides(argv: list[str]) -> tuple[str | None, list[str]]:
  """The --config file and the keys of the --config.KEY=VALUE overrides in `argv`."""
  path, keys = None, []
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=", 1)[0]
    if name == "config" and "=" in arg:
      path = arg.split("=", 1)[1]
    elif name.startswith("config."):
      keys.append(name[len("config.") :])
  return path, keys


def fail(message: str) -> None:
  """One line on stderr, exit status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an unknown `--config.KEY` named with the closest valid
  keys and any flag error as one line (exit status 2) instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
    path, keys = _config_overrides(argv)
    if path is not None:
      try:
        config = config_lib.load_config_file(*path.split(":", 1))
      except Exception:  # The config file itself is broken: absl's message says so.
        config = None
      for key in keys if config is not None else ():
        message = config_lib.unknown_key_message(config, key)
        if message:
          fail(message)
    fail(f"{error} (see --help).")


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}: flags are --name=value (see --help).")
  verbosity = flags.FLAGS.verbosity  # Read first: console.setup sets absl's to INFO (0).
  console.setup(verbosity)
  # Before anything creates a JAX backend (importing jax does not).
  distributed.initialize(
    _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
  )
  console.quiet_other_processes(verbosity)
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
    extra={console.FILE_ONLY: True},
  )
  try:
    run_task(_CONFIG.value, workdir, _OVERWRITE.value, _REEVALUATE.value)
  except INPUT_ERRORS as error:
    if verbosity > 0:
      raise
    logging.info("The run stopped:", exc_info=True, extra={console.FILE_ONLY: True})
    fail(str(error))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
