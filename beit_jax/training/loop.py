"""The step loop shared by every task.

The hot path does no host syncs: metrics are accumulated on the device and fetched
only every `log_every` steps; the skipped-image counts are host numpy from the input
pipeline. Checkpoints (state + data iterator) follow the `Checkpointer`'s interval, and
the last step is always saved.

Faults:
* SIGTERM / SIGINT (preemption, Ctrl-C): the current step finishes, a checkpoint of it is
  written, and the run ends cleanly with a message saying how to resume (a second SIGINT
  interrupts at once). With several processes JAX's preemption sync point is used, so
  that every process stops at the same step.
* Non-finite loss or gradient norm: the step is skipped inside the jitted step
  (`TrainState.apply_gradients`); at each log step the run stops with
  `NonFiniteError` once `nonfinite.max_consecutive` steps in a row were skipped.
* A checkpoint is never written from non-finite params (checked at save steps only).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from beit_jax.models import codebook
from beit_jax.training import console
from beit_jax.training import mesh as mesh_lib
from beit_jax.training import workdir as workdir_lib
from beit_jax.training.checkpointing import Checkpointer
from beit_jax.training.metrics import MetricWriter

StepFn = Callable[..., tuple[Any, Mapping[str, jax.Array]]]
StepArgs = Callable[[int], tuple[Any, ...]]
Summarize = Callable[[Mapping[str, np.ndarray], int], dict[str, float]]


class RunResult(NamedTuple):
  """What a training run ends with (`run`, `run_job` and every task's `train_and_evaluate`)."""

  state: Any
  train: dict[str, float]  # The last logged train means ({} if nothing was trained).
  eval: dict[str, Any]  # The final evaluation ({} without an eval split or when stopped).
  stopped_by: str | None = None  # The signal that stopped the run early, else None.


def compile_train_step(
  train_step: StepFn, state_sharding: Any, batch_sharding: NamedSharding, *arg_shardings: Any
) -> StepFn:
  """`jax.jit` of `train_step(state, batch, *args) -> (state, metrics)` as every task runs
  it: the state donated and kept in its shardings, the metrics replicated, and traced
  exactly once (static shapes; `chex.assert_max_traces` raises on a retrace). The trace
  counters are reset first, so a job built again in one process (a notebook) starts
  from zero."""
  chex.clear_trace_counter()
  return jax.jit(
    chex.assert_max_traces(train_step, n=1),
    in_shardings=(state_sharding, batch_sharding, *arg_shardings),
    out_shardings=(state_sharding, mesh_lib.replicated(batch_sharding.mesh)),
    donate_argnums=(0,),
  )


def sum_over_batches(
  step_fn: Callable[..., Mapping[str, jax.Array]],
  batches: Iterable[Mapping[str, np.ndarray]],
  keys: Sequence[str],
  batch_sharding: NamedSharding,
  *args: Any,
) -> dict[str, np.ndarray] | None:
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


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient norm."""


class StopRequests:
  """SIGTERM / SIGINT -> a flag the loop checks after each step (context manager).

  Installed only in the main thread of a single-process run; with several processes
  `stop_now` asks JAX's preemption sync point instead (JAX's distributed runtime
  listens for SIGTERM itself), so all processes agree on the step.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopRequests:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C stops at once.
    self.signal_name = signal.Signals(signum).name
    logging.warning("%s received: stopping after this step with a checkpoint.", self.signal_name)

  def stop_now(self, step: int) -> bool:
    if jax.process_count() > 1:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or "preemption notice"
        return True
      return False
    return self.signal_name is not None

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _check_streak(streak: Any, step: int, max_consecutive: int, checkpointer: Checkpointer) -> None:
  """`streak`: the state's `nonfinite_streak`, fetched with the log step's metrics."""
  if not max_consecutive or streak is None:
    return
  streak = int(streak)
  if streak >= max_consecutive:
    raise NonFiniteError(
      f"The last {streak} steps (up to step {step}) had a non-finite loss or gradient norm "
      f"and were skipped (limit config.nonfinite.max_consecutive={max_consecutive}). The "
      f"latest checkpoint (step {checkpointer.latest_step()}) holds finite params. Lower "
      "config.optim.lr or raise config.optim.warmup_steps, set optim.clip_grad_norm, or use "
      "float32 (config.model.dtype), then rerun the same command to resume."
    )


def mean_scalars(sums: Mapping[str, np.ndarray], num_steps: int) -> dict[str, float]:
  """Interval means of the scalar metrics (non-scalars are left to the task)."""
  return {k: float(v) / num_steps for k, v in sums.items() if np.ndim(v) == 0}


COLLAPSE_USAGE = 0.10  # Codebook usage under which a tokenizer run warns (once) of a collapse.


def make_codebook_summarize(
  vocab_size: int, advice: str, counts_key: str = "token_counts"
) -> Summarize:
  """`mean_scalars` plus the codebook usage and perplexity of the interval's code counts
  (`sums[counts_key]`, (V,)) for a tokenizer's training; warns once, with `advice` (what to
  change), when the usage falls under `COLLAPSE_USAGE` (the dVAE and VQ-KD tasks)."""
  warned = False

  def summarize(sums: Mapping[str, np.ndarray], num_steps: int) -> dict[str, float]:
    nonlocal warned
    scalars = mean_scalars(sums, num_steps)
    scalars.update({k: float(v) for k, v in codebook.codebook_stats(sums[counts_key]).items()})
    if scalars["usage"] < COLLAPSE_USAGE and not warned:
      warned = True
      logging.warning(
        "Codebook collapse: the last %d steps used %.1f%% of the %d codes (perplexity %.1f). %s",
        num_steps,
        100 * scalars["usage"],
        vocab_size,
        scalars["perplexity"],
        advice,
      )
    return scalars

  return summarize


def run(
  *,
  state: Any,
  train_step: StepFn,
  data_iter: Iterator[dict[str, np.ndarray]],
  batch_keys: Sequence[str],
  batch_sharding: NamedSharding,
  total_steps: int,
  writer: MetricWriter,
  checkpointer: Checkpointer,
  log_every: int,
  step_args: StepArgs | None = None,
  summarize: Summarize = mean_scalars,
  eval_every: int = 0,
  eval_fn: Callable[[Any], dict[str, Any]] | None = None,
  max_consecutive_nonfinite: int = 0,
  on_checkpoint: Callable[[Any, int], None] | None = None,
) -> RunResult:
  """Runs `train_step(state, batch, *step_args(step))` from the state's step to
  `total_steps`, then `eval_fn` once more.

  `step_args(step)` gives the step's other arguments (host values: a frozen model's
  params, the step's mixup draw); `step` is the 0-based index of the step about to run,
  kept on the host (no device sync). `summarize(sums, num_steps)` turns an interval's
  metric sums into the logged scalars. Returns the final state, the last logged train
  scalars and the final eval metrics (also written with split 'final_eval'); when a
  stop was requested (SIGTERM/SIGINT), the state at the stop (checkpointed), no eval and
  the signal's name. `on_checkpoint(state, step)` runs after each checkpoint written
  (e.g. the pictures), not at a stop.
  """
  step = int(jax.device_get(state.step))  # One sync before the loop.
  if step >= total_steps:
    logging.info("Already at step %d of %d: nothing to train.", step, total_steps)
  sums, num, skipped, images = None, 0, 0, 0
  total_skipped, total_images = 0, 0
  last: dict[str, float] = {}
  t_interval = time.time()
  with StopRequests() as stop:
    while step < total_steps:
      host_batch = next(data_iter)
      batch_skipped = int(np.sum(host_batch["num_skipped"]))  # Host numpy: no device sync.
      batch_images = len(host_batch[batch_keys[0]])
      skipped, total_skipped = skipped + batch_skipped, total_skipped + batch_skipped
      images, total_images = images + batch_images, total_images + batch_images
      batch = mesh_lib.global_batch({k: host_batch[k] for k in batch_keys}, batch_sharding)
      extra = step_args(step) if step_args is not None else ()
      state, metrics = train_step(state, batch, *extra)
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
      num += 1
      step += 1
      stopping = stop.stop_now(step)

      if step % log_every == 0 or step == total_steps or stopping:
        # The log step's one fetch: the interval's metric sums and the non-finite streak.
        host_sums, streak = jax.device_get((sums, getattr(state, "nonfinite_streak", None)))
        last = summarize(host_sums, num)
        scalars = dict(last)
        elapsed = time.time() - t_interval
        scalars["images_per_s"] = images * jax.process_count() / max(elapsed, 1e-9)
        scalars["skipped_images"] = skipped
        writer.write(step, scalars)
        sums, num, images = None, 0, 0
        t_interval = time.time()
        _check_streak(streak, step, max_consecutive_nonfinite, checkpointer)
      if (
        eval_fn is not None
        and eval_every
        and step % eval_every == 0
        and step < total_steps
        and not stopping
      ):
        writer.write(step, eval_fn(state), split="eval")
        t_interval = time.time()
      force = step == total_steps or stopping
      if (force or checkpointer.should_save(step)) and not bool(_all_finite(state)):
        raise NonFiniteError(
          f"Non-finite values in the train state at step {step}: not saving a checkpoint. "
          f"The latest checkpoint (step {checkpointer.latest_step()}) is intact; lower "
          "config.optim.lr and rerun the same command to resume from it."
        )
      saved = checkpointer.save(step, state, data_iter, force=force)
      if saved and on_checkpoint is not None and not stopping:
        on_checkpoint(state, step)
      if stopping:
        checkpointer.wait()
        logging.warning(
          "Stopped by %s at step %d of %d; checkpoint %s/%d written. Rerun the same command "
          "to resume.",
          stop.signal_name,
          step,
          total_steps,
          checkpointer.directory,
          step,
        )
        return RunResult(state, last, {}, stop.signal_name)
  checkpointer.wait()
  logging.info(
    "Input: %d images trained on, %d undecodable images skipped (this process, this run).",
    total_images,
    total_skipped,
  )
  final = eval_fn(state) if eval_fn is not None else {}
  if final:
    writer.write(total_steps, final, split="final_eval")
  return RunResult(state, last, final)


def files_lines(config: Any, workdir: str) -> list[str]:
  """Where a finished run's records are (the end of every summary)."""
  lines = [f"Metrics: {workdir}/metrics.jsonl; full log: {workdir}/log.txt"]
  if config.get("tensorboard", False):
    lines.append(f"TensorBoard: tensorboard --logdir {workdir}/tb")
  if config.get("pictures", False):
    lines.append(f"Pictures: {workdir}/pictures/")
  return lines


def run_job(
  *,
  config: Any,
  workdir: str,
  state: Any,
  train_step: StepFn,
  data_iter: Iterator[dict[str, np.ndarray]],
  batch_keys: Sequence[str],
  batch_sharding: NamedSharding,
  checkpointer: Checkpointer,
  step_args: StepArgs | None = None,
  eval_fn: Callable[[Any], dict[str, Any]] | None = None,
  summarize: Summarize = mean_scalars,
  finish: Callable[[RunResult], None] | None = None,
  on_checkpoint: Callable[[Any, int], None] | None = None,
  console_keys: Sequence[str] | None = None,
  describe: Callable[[RunResult], list[str]] | None = None,
) -> RunResult:
  """A task's whole training run: metric writer, `run`, then `finish(result)` (the
  export) unless the run was stopped; the checkpointer, writer and data iterator are
  closed whatever happens. Reads `total_steps`, `log_every`, `eval_every`, `tensorboard`
  and `nonfinite.max_consecutive` from `config`; `console_keys` are the metrics the
  progress line shows (`MetricWriter`). After the export, the summary — `describe(result)`
  (what was trained, its figures beside their baselines, the export, the next command)
  and where the metrics, TensorBoard and pictures are — is logged and kept in
  WORKDIR/summary.json (`workdir.write_summary`)."""
  # Every check has passed by now (the task's values, the mesh, the inputs): the first
  # files of the run, its log (with the records held since the start) and config.
  console.open_log_file(workdir)
  workdir_lib.write(config, workdir)
  writer = MetricWriter(
    workdir, config.total_steps, tensorboard=config.tensorboard, console_keys=console_keys
  )
  try:
    nonfinite = config.get("nonfinite")
    result = run(
      state=state,
      train_step=train_step,
      data_iter=data_iter,
      batch_keys=batch_keys,
      batch_sharding=batch_sharding,
      total_steps=config.total_steps,
      writer=writer,
      checkpointer=checkpointer,
      log_every=config.log_every,
      step_args=step_args,
      summarize=summarize,
      eval_every=config.eval_every,
      eval_fn=eval_fn,
      max_consecutive_nonfinite=0 if nonfinite is None else nonfinite.max_consecutive,
      on_checkpoint=on_checkpoint,
    )
    if result.stopped_by is None:
      if finish is not None:
        finish(result)
      lines = (describe(result) if describe is not None else []) + files_lines(config, workdir)
      logging.info("%s", "\n".join(["", "Summary:"] + [f"  {line}" for line in lines]))
      workdir_lib.write_summary(workdir, config.total_steps, lines)
  finally:
    checkpointer.close()
    writer.close()
    if hasattr(data_iter, "close"):
      data_iter.close()
  return result
