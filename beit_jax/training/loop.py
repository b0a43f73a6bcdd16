"""The step loop shared by every task.

The hot path does no host syncs: metrics are accumulated on the device and fetched
only every `log_every` steps; the skipped-image counts are host numpy from the input
pipeline. Checkpoints (state + data iterator) follow the `Checkpointer`'s interval, and
the last step is always saved.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding

from beit_jax.training import mesh as mesh_lib
from beit_jax.training.checkpointing import Checkpointer
from beit_jax.training.metrics import MetricWriter

StepFn = Callable[[Any, Mapping[str, jax.Array]], tuple[Any, Mapping[str, jax.Array]]]
Summarize = Callable[[Mapping[str, np.ndarray], int], dict[str, float]]


def sum_over_batches(step_fn: Callable[..., Mapping[str, jax.Array]],
                     batches: Iterable[Mapping[str, np.ndarray]], keys: Sequence[str],
                     batch_sharding: NamedSharding, *args: Any) -> dict[str, np.ndarray] | None:
  """Sums `step_fn(*args[:1], batch, *args[1:])` outputs over host batches (eval passes).

  Each host batch is restricted to `keys` and made global; the sums stay on the device
  until the end (one fetch). Returns None when there was no batch.
  """
  sums = None
  for host_batch in batches:
    batch = mesh_lib.global_batch({k: host_batch[k] for k in keys}, batch_sharding)
    out = step_fn(*args[:1], batch, *args[1:])
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  return None if sums is None else jax.device_get(sums)


def mean_scalars(sums: Mapping[str, np.ndarray], num_steps: int) -> dict[str, float]:
  """Interval means of the scalar metrics (non-scalars are left to the task)."""
  return {k: float(v) / num_steps for k, v in sums.items() if np.ndim(v) == 0}


def run(*, state: Any, train_step: StepFn, data_iter: Iterator[dict[str, np.ndarray]],
        batch_keys: Sequence[str], batch_sharding: NamedSharding, total_steps: int,
        writer: MetricWriter, checkpointer: Checkpointer, log_every: int,
        summarize: Summarize = mean_scalars, eval_every: int = 0,
        eval_fn: Callable[[Any], dict[str, float]] | None = None) -> tuple[Any, dict[str, Any]]:
  """Runs `train_step` from the state's step to `total_steps`, then `eval_fn` once more.

  Returns the final state and the final eval metrics ({} without `eval_fn`), which are
  also written with split 'final_eval'.
  """
  step = int(jax.device_get(state.step))  # One sync before the loop.
  if step >= total_steps:
    logging.info("Already at step %d of %d: nothing to train.", step, total_steps)
  sums, num, skipped, images = None, 0, 0, 0
  t_interval = time.time()
  while step < total_steps:
    host_batch = next(data_iter)
    skipped += int(np.sum(host_batch["num_skipped"]))
    images += len(host_batch[batch_keys[0]])
    batch = mesh_lib.global_batch({k: host_batch[k] for k in batch_keys}, batch_sharding)
    state, metrics = train_step(state, batch)
    sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
    num += 1
    step += 1

    if step % log_every == 0 or step == total_steps:
      scalars = summarize(jax.device_get(sums), num)
      elapsed = time.time() - t_interval
      scalars["images_per_s"] = images * jax.process_count() / max(elapsed, 1e-9)
      scalars["skipped_images"] = skipped
      writer.write(step, scalars)
      sums, num, images = None, 0, 0
      t_interval = time.time()
    if eval_fn is not None and eval_every and step % eval_every == 0 and step < total_steps:
      writer.write(step, eval_fn(state), split="eval")
      t_interval = time.time()
    checkpointer.save(step, state, data_iter, force=step == total_steps)
  checkpointer.wait()
  final = eval_fn(state) if eval_fn is not None else {}
  if final:
    writer.write(total_steps, final, split="final_eval")
  return state, final


def run_job(*, config: Any, workdir: str, state: Any, train_step: StepFn,
            data_iter: Iterator[dict[str, np.ndarray]], batch_keys: Sequence[str],
            batch_sharding: NamedSharding, checkpointer: Checkpointer,
            eval_fn: Callable[[Any], dict[str, Any]] | None = None,
            summarize: Summarize = mean_scalars,
            finish: Callable[[Any, dict[str, float], dict[str, Any]], None] | None = None,
            ) -> tuple[Any, dict[str, float], dict[str, Any]]:
  """A task's whole training run: metric writer, `run`, then `finish(state, last train
  means, final eval)` (the export); the checkpointer, writer and data iterator are closed
  whatever happens. Reads `total_steps`, `log_every`, `eval_every`, `tensorboard` from
  `config`. Returns (state, last logged train means, final eval)."""
  writer = MetricWriter(workdir, config.total_steps, tensorboard=config.tensorboard)
  last: dict[str, float] = {}

  def summarize_and_keep(sums, num_steps):
    scalars = summarize(sums, num_steps)
    last.clear()
    last.update(scalars)
    return dict(scalars)

  try:
    state, final = run(
        state=state, train_step=train_step, data_iter=data_iter, batch_keys=batch_keys,
        batch_sharding=batch_sharding, total_steps=config.total_steps, writer=writer,
        checkpointer=checkpointer, log_every=config.log_every, summarize=summarize_and_keep,
        eval_every=config.eval_every, eval_fn=eval_fn)
    if finish is not None:
      finish(state, dict(last), final)
  finally:
    checkpointer.close()
    writer.close()
    if hasattr(data_iter, "close"):
      data_iter.close()
  return state, dict(last), final
