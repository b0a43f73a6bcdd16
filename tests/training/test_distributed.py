"""Multi-process start-up: when to initialise, and a real 2-process CPU run that matches
the same job in one process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from beit_jax import exports
from beit_jax.training import distributed
from tests.tasks import test_pretrain_task

ROOT = test_pretrain_task.ROOT
# The pretrain tests' quick start shrunk to 32 px; asynchronous checkpointing left on.
TINY = [a for a in test_pretrain_task.TINY if "async_save" not in a]
SMALL = test_pretrain_task.SMALL


@pytest.mark.parametrize(
  "mode, coordinator, env, expected",
  [
    ("auto", None, {}, False),
    ("auto", None, {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, False),
    ("auto", None, {"SLURM_NTASKS": "16", "SLURM_PROCID": "3"}, True),
    ("auto", None, {"SLURM_NTASKS": "16"}, False),  # ssh into a node: partial Slurm env.
    ("auto", None, {"TPU_WORKER_HOSTNAMES": "10.0.0.2"}, False),  # one TPU VM host.
    ("auto", None, {"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, True),
    ("auto", None, {"BEIT_JAX_DISTRIBUTED": "1"}, True),
    ("auto", "localhost:1234", {}, True),
    ("off", "localhost:1234", {"SLURM_NTASKS": "16", "SLURM_PROCID": "3"}, False),
    ("on", None, {}, True),
  ],
)
def test_when_to_initialize(mode, coordinator, env, expected):
  assert distributed.should_initialize(mode, coordinator, env)[0] is expected


def test_explicit_coordinator_needs_the_process_numbers():
  with pytest.raises(ValueError, match="num_processes"):
    distributed.initialize("auto", "localhost:1234", None, 0, env={})


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(
    os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
  )


def _records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def test_two_processes_train_like_one(tmp_path):
  """The quick start's MIM stage in 2 processes x 4 CPU devices (gloo collectives, each
  process reading its own half of every batch) equals the same job in 1 process x 8."""
  one = str(tmp_path / "one")
  args = [f"--config={SMALL}:steps=4,tokenizer_steps=2,variant=test", *TINY]
  result = subprocess.run(
    [sys.executable, "-m", "beit_jax.main", f"--workdir={one}", *args],
    cwd=ROOT,
    env=_env(8),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  tokenizer = os.path.join(one, "tokenizer", "export", "tokenizer")

  two = str(tmp_path / "two")
  port = _free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "beit_jax.main",
        f"--workdir={two}",
        *args,
        f"--config.tokenizer.path={tokenizer}",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
        "--verbosity=1",  # Every process's INFO on its console (else process 1 is quiet).
      ],
      cwd=ROOT,
      env=_env(4),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "process 0/2 | 8 devices" in outputs[0][1]
  assert "process 1/2 | 8 devices" in outputs[1][1]

  # Same losses at every log step and at the end (the batch order within a step differs).
  for split in ("train", "final_eval"):
    a, b = _records(one, split), _records(two, split)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
      np.testing.assert_allclose(ra["loss"], rb["loss"], rtol=1e-4, atol=1e-5)
  # Same exported params; the checkpoints hold one Grain state per process.
  _, pa, _ = exports.load_pretrained(os.path.join(one, "export", "beit"))
  _, pb, _ = exports.load_pretrained(os.path.join(two, "export", "beit"))
  diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), pa, pb))
  assert max(diffs) < 1e-4, max(diffs)
  data_dir = os.path.join(two, "checkpoints", "4", "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))
  print(
    f"2 processes vs 1: losses {[r['loss'] for r in _records(two, 'train')]} vs "
    f"{[r['loss'] for r in _records(one, 'train')]}; params max |diff| {max(diffs):.2e}"
  )
