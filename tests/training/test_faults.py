"""Fault injection: SIGKILL at random steps (and during checkpoint writes) then resume,
SIGTERM, injected NaN gradients, non-finite state at a save step.

The subprocess runs use the quick start shrunk to 32 px (`tests/tasks/test_pretrain_task.py`
TINY): a 2-step tokenizer, then BEiT-test MIM with a checkpoint after every step.
"""

import json
import os
import random
import signal
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from beit_jax import exports
from beit_jax.training import loop
from beit_jax.training.checkpointing import Checkpointer
from beit_jax.training.metrics import MetricWriter
from beit_jax.training.train_state import TrainState
from tests.tasks.test_pretrain_task import SMALL, TINY, run_main

STEPS = 8
EVERY_STEP = ["--config.ckpt.every=1", "--config.ckpt.keep=20", "--config.log_every=1"]


def _config(steps):
  return f"--config={SMALL}:steps={steps},tokenizer_steps=2,variant=test"


def _ckpt_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(s) for s in os.listdir(directory) if s.isdigit())


def _export(workdir):
  _, params, meta = exports.load_pretrained(os.path.join(workdir, "export", "beit"))
  return jax.tree.map(np.asarray, params), meta


def _writing(workdir):
  """Checkpoint steps being written (Orbax's temporary directories)."""
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return [int(n.split(".")[0]) for n in names if ".orbax-checkpoint-tmp" in n]


def _kill_when(proc, workdir, at_least, during_write=False, timeout=300):
  """SIGKILL `proc` once a checkpoint >= `at_least` exists or, with `during_write`, once
  one is being written. Returns (was running, killed while a write was under way)."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if during_write and (
      any(s >= at_least for s in _writing(workdir))
      or any(s >= STEPS - 1 for s in _ckpt_steps(workdir))
    ):
      break  # Cut a write; failing that, kill before the last step (timing-robust).
    if not during_write and any(s >= at_least for s in _ckpt_steps(workdir)):
      break
    time.sleep(0.002)
  running = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  return running, bool(_writing(workdir))


def test_sigkill_at_random_steps_then_resume_equals_an_uninterrupted_run(tmp_path):
  straight = str(tmp_path / "straight")
  res = run_main(_config(STEPS), f"--workdir={straight}", *TINY, *EVERY_STEP)
  assert res.returncode == 0, res.stderr[-3000:]
  want, _ = _export(straight)

  broken = str(tmp_path / "broken")
  rng = random.Random(7)
  kills, mid_write = [], 0
  for during_write in (False, True):  # Kill at a random step, then during a write.
    done = max(_ckpt_steps(broken), default=0)
    target = min(STEPS - 1, done + rng.randint(1, 3))
    proc = run_main(_config(STEPS), f"--workdir={broken}", *TINY, *EVERY_STEP, wait=False)
    running, writing = _kill_when(proc, broken, target, during_write)
    assert running, "the run finished before it could be killed"
    kills.append(max(_ckpt_steps(broken)))
    mid_write += writing
  # A write cut short looks like this to Orbax; it must be ignored, never loaded.
  os.makedirs(os.path.join(broken, "checkpoints", "99.orbax-checkpoint-tmp-1", "state"))
  res = run_main(_config(STEPS), f"--workdir={broken}", *TINY, *EVERY_STEP)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"at step {kills[-1]}" in res.stderr
  got, meta = _export(broken)
  assert meta["step"] == STEPS and kills[0] <= kills[1] < STEPS, kills
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  # Every step was logged; the resumed steps continue the lr schedule, not restart it.
  records = [json.loads(line) for line in open(os.path.join(broken, "metrics.jsonl"))]
  ref = {
    r["step"]: r
    for r in map(json.loads, open(os.path.join(straight, "metrics.jsonl")))
    if r["split"] == "train"
  }
  for r in records:
    if r["split"] == "train":
      assert r["lr"] == pytest.approx(ref[r["step"]]["lr"], rel=1e-6), r["step"]
  print(f"killed after checkpoints {kills}; kills that cut a checkpoint write: {mid_write}")


def test_sigterm_finishes_the_step_checkpoints_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "run")
  proc = run_main(_config(400), f"--workdir={workdir}", *TINY, "--config.ckpt.every=50", wait=False)
  deadline = time.time() + 300
  metrics = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline and proc.poll() is None:  # Wait for MIM training to log.
    if os.path.exists(metrics) and any('"mlm_acc"' in line for line in open(metrics)):
      break
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  assert "Stopped by SIGTERM at step" in stderr and "Rerun the same command" in stderr
  stopped = int(stderr.split("Stopped by SIGTERM at step ")[1].split()[0])
  assert _ckpt_steps(workdir)[-1] == stopped and 0 < stopped < 400  # Not on the 50-step grid.
  assert not os.path.exists(os.path.join(workdir, "export", "beit"))  # Not finished.


def test_injected_nan_steps_are_skipped_then_the_run_stops(tmp_path):
  workdir = str(tmp_path / "run")
  # Gradients of steps 3..7 (0-based) are NaN; stop after 3 skips in a row.
  res = run_main(
    _config(STEPS),
    f"--workdir={workdir}",
    *TINY,
    "--config.nonfinite.inject_at_steps=(3,4,5,6,7)",
    "--config.nonfinite.max_consecutive=3",
  )
  assert res.returncode != 0
  assert "non-finite loss or gradient norm" in res.stderr
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train = {r["step"]: r for r in records if r["split"] == "train"}
  assert train[2]["nonfinite"] == 0 and train[4]["nonfinite"] == 0.5
  assert train[6]["nonfinite"] == 1.0
  assert _ckpt_steps(workdir) == [2, 4]  # Step 6 was not saved; 4 holds finite params.


def test_apply_gradients_skips_non_finite_steps_inside_jit():
  params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
  tx = optax.adamw(0.1)
  state = TrainState.create(params, tx, jax.random.PRNGKey(0), use_ema=True)
  grads = {"w": jnp.full((3,), 0.5), "b": jnp.ones(())}
  step = jax.jit(lambda s, g, loss: s.apply_gradients(g, tx, loss, ema_decay=0.9))

  good, metrics = step(state, grads, jnp.float32(1.0))
  assert int(good.step) == 1 and int(good.nonfinite_streak) == 0
  assert float(metrics["nonfinite"]) == 0.0
  assert not np.allclose(good.params["w"], params["w"])

  for bad_loss, bad_grads in (
    (jnp.float32(np.nan), grads),
    (jnp.float32(1.0), {"w": grads["w"].at[1].set(np.inf), "b": grads["b"]}),
  ):
    bad, metrics = step(good, bad_grads, bad_loss)
    assert int(bad.step) == 2 and int(bad.nonfinite_streak) == 1
    assert float(metrics["nonfinite"]) == 1.0
    for new, old in zip(
      jax.tree.leaves((bad.params, bad.opt_state, bad.ema_params)),
      jax.tree.leaves((good.params, good.opt_state, good.ema_params)),
    ):
      np.testing.assert_array_equal(new, old)
  twice, _ = step(step(good, grads, jnp.float32(np.nan))[0], grads, jnp.float32(np.inf))
  assert int(twice.nonfinite_streak) == 2
  again, _ = step(twice, grads, jnp.float32(1.0))
  assert int(again.nonfinite_streak) == 0 and np.isfinite(again.params["w"]).all()


def test_non_finite_state_is_never_checkpointed(tmp_path):
  """A step that makes params NaN (bypassing the guard) stops the run at the next save
  step without writing it; the earlier checkpoint stays restorable."""
  state = TrainState.create({"w": jnp.zeros((4,))}, optax.sgd(0.1), jax.random.PRNGKey(0))

  @jax.jit
  def train_step(s, batch):
    w = s.params["w"] + jnp.mean(batch["x"])
    w = jnp.where(s.step == 4, jnp.nan, w)
    return s.replace(step=s.step + 1, params={"w": w}), {"loss": jnp.mean(w)}

  data = iter(
    grain.MapDataset.range(1000)
    .map(lambda i: {"x": np.full((8,), i, np.float32), "num_skipped": np.zeros((8,), np.int32)})
    .to_iter_dataset()
  )
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  ckpt = Checkpointer(str(tmp_path / "ckpt"), save_interval_steps=3, async_save=False)
  writer = MetricWriter(str(tmp_path), 10, tensorboard=False)
  with pytest.raises(loop.NonFiniteError, match="not saving a checkpoint"):
    loop.run(
      state=state,
      train_step=train_step,
      data_iter=data,
      batch_keys=("x",),
      batch_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
      total_steps=10,
      writer=writer,
      checkpointer=ckpt,
      log_every=5,
    )
  ckpt.wait()
  assert max(ckpt.all_steps()) == 3  # Step 6 (params NaN since step 5) was refused.
  restored = ckpt.restore(3, jax.eval_shape(lambda: state))
  assert np.isfinite(np.asarray(restored.params["w"])).all()
  ckpt.close()
  writer.close()


OTHER_TASKS = {
  # task: (config file:args, overrides, export dir)
  "dvae": (
    "dvae_small.py:steps=40",
    [
      "--config.input.batch_size=8",
      "--config.model.hidden=16",
      "--config.model.codebook_dim=16",
      "--config.model.vocab_size=64",
      "--config.input.image_size=16",
      "--config.pictures=False",
    ],
    "export/tokenizer",
  ),
  "finetune": (
    "finetune_small.py:steps=40,batch_size=8",
    [
      "--config.model.variant=test",
      "--config.input.image_size=32",
      "--config.mixup.prob=1.0",
      "--config.eval_every=0",
    ],
    "export/final",
  ),
  "linear_probe": (
    "linear_probe_small.py:steps=40,batch_size=8",
    ["--config.model.variant=test", "--config.input.image_size=32", "--config.knn.k=0"],
    "export/final",
  ),
}
COMMON = [
  "--config.eval_batch_size=8",
  "--config.log_every=1",
  "--config.ckpt.every=1000",
  "--config.ckpt.async_save=False",
  "--config.tensorboard=False",
]


def _exported_params(path):
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    return jax.tree.map(np.asarray, ckptr.restore(os.path.join(path, "params")))


@pytest.mark.parametrize("task", sorted(OTHER_TASKS))
def test_stop_and_resume_equals_an_uninterrupted_run_for_every_task(tmp_path, task):
  """SIGTERM mid-run (a checkpoint off the save grid), then the same command again: the
  final params equal the uninterrupted run's, bit for bit."""
  config, overrides, export = OTHER_TASKS[task]
  args = [f"--config={os.path.join(os.path.dirname(SMALL), config)}", *overrides, *COMMON]
  straight = tmp_path / "straight"
  res = run_main(*args, f"--workdir={straight}")
  assert res.returncode == 0, res.stderr[-3000:]

  stopped = tmp_path / "stopped"
  proc = run_main(*args, f"--workdir={stopped}", wait=False)
  metrics = stopped / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and '"train"' in metrics.read_text():
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "Stopped by SIGTERM at step" in stderr, stderr[-3000:]
  at = int(stderr.split("Stopped by SIGTERM at step ")[1].split()[0])
  assert 0 < at < 40 and not (stopped / export).exists()
  res = run_main(*args, f"--workdir={stopped}")
  assert res.returncode == 0 and f"at step {at}" in res.stderr, res.stderr[-3000:]
  want, got = _exported_params(straight / export), _exported_params(stopped / export)
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(
      a, b, err_msg=f"{task} stopped at {at}: {jax.tree_util.keystr(path)}"
    )
