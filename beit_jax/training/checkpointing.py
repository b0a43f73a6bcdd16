"""Orbax checkpointing of a training run, written once for every task.

`Checkpointer`: the train state and the Grain iterator state saved together under
`workdir/checkpoints/<step>/{state,data}` (async, keep N), restored into the current
mesh's shardings whatever mesh wrote them. Params-only exports (the hand-off between
stages) are `beit_jax/exports.py`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax
import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from beit_jax import paths


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (restore targets)."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


class Checkpointer:
  """Train state + data iterator under one Orbax `CheckpointManager`."""

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    max_to_keep: int = 3,
    save_interval_steps: int = 1000,
    async_save: bool = True,
  ):
    self.directory = paths.path(paths.absolute(directory))  # Local or gs://.
    self._manager = ocp.CheckpointManager(
      self.directory,
      item_names=("state", "data"),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save,
        create=True,
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether the interval policy saves at `step` (`save` without `force`)."""
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, data_iter: Any = None, *, force: bool = False) -> bool:
    """Saves if the interval policy (or `force`) says so; returns whether it saved."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, target: Any, data_iter: Any = None) -> Any:
    """Restores the state into `target` (ShapeDtypeStructs with shardings); the data
    iterator, if given, is restored in place."""
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def check_params_match(self, step: int, state: Any) -> None:
    """Raises a ValueError naming the first params key whose presence or shape differs
    between checkpoint `step` and `state` (a config that does not match the run)."""
    # The item's own handler reads `<step>/state` (a `StandardCheckpointer` would take
    # that folder for a whole checkpoint and warn that its _CHECKPOINT_METADATA, which
    # lives one level up, does not exist).
    handler = ocp.StandardCheckpointHandler()
    try:
      metadata = handler.metadata(self.directory / str(step) / "state")
    finally:
      handler.close()
    tree = getattr(metadata, "tree", None)
    if not isinstance(tree, Mapping) or not isinstance(tree.get("params"), Mapping):
      return  # Metadata of an unexpected layout: let Orbax's own check speak.
    stored, wanted = _shapes(tree["params"]), _shapes(state.params)
    diffs = [
      f"params/{k}: checkpoint {stored.get(k, 'absent')}, config {wanted.get(k, 'absent')}"
      for k in sorted(set(stored) | set(wanted))
      if stored.get(k) != wanted.get(k)
    ]
    if diffs:
      raise ValueError(
        f"Checkpoint {self.directory}/{step} does not match this config's model: "
        f"{diffs[0]}"
        + (f" (and {len(diffs) - 1} more keys)" if len(diffs) > 1 else "")
        + ". Resume with the config that wrote it, or use a new --workdir."
      )

  def restore_latest(self, state: Any, shardings: Any, data_iter: Any = None) -> Any:
    """The latest checkpoint restored into `shardings` (and `data_iter`), or `state` as is."""
    last = self.latest_step()
    if last is None:
      return state
    self.check_params_match(last, state)
    state = self.restore(last, abstract_with_shardings(state, shardings), data_iter)
    logging.info("Resumed from %s at step %d.", self.directory, last)
    return state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """'a/b/c' -> shape for every array leaf of nested dicts (live arrays or Orbax metadata)."""
  flat = flax.traverse_util.flatten_dict(dict(tree), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items() if v is not None and hasattr(v, "shape")}


def make_checkpointer(workdir: str, ckpt_config: Any) -> Checkpointer:
  """`workdir/checkpoints` with a config's `ckpt` section (every, keep, async_save)."""
  return Checkpointer(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=ckpt_config.keep,
    save_interval_steps=ckpt_config.every,
    async_save=ckpt_config.async_save,
  )
