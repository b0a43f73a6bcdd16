"""Orbax round trips: state restored into another mesh's shardings, keep-N, mismatches."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from beit_jax.training import checkpointing
from beit_jax.training import mesh as mesh_lib
from beit_jax.training.checkpointing import Checkpointer
from beit_jax.training.train_state import TrainState, init_sharded


def make_state_fn(seed):
  tx = optax.adamw(1e-3)

  def init():
    k = jax.random.PRNGKey(seed)
    params = {"dense": {"kernel": jax.random.normal(k, (256, 1024)), "bias": jnp.zeros(1024)}}
    return TrainState.create(params, tx, jax.random.PRNGKey(seed + 1), use_ema=True)

  return init


def test_save_restore_into_other_mesh(tmp_path):
  mesh_a = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=8, fsdp=1)))
  state, _ = init_sharded(make_state_fn(0), mesh_a)
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_interval_steps=1)
  assert ckpt.save(3, state)
  ckpt.wait()
  assert ckpt.latest_step() == 3

  mesh_b = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4)))
  other, shardings = init_sharded(make_state_fn(1), mesh_b)
  restored = ckpt.restore(3, checkpointing.abstract_with_shardings(other, shardings))
  ckpt.close()
  kernel = restored.params["dense"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # The new mesh's.
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(state.params["dense"]["kernel"]))
  np.testing.assert_array_equal(np.asarray(restored.rng), np.asarray(state.rng))
  assert not np.array_equal(np.asarray(kernel), np.asarray(other.params["dense"]["kernel"]))


def test_keep_n(tmp_path):
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  state, _ = init_sharded(make_state_fn(0), mesh)
  ckpt = checkpointing.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2)
  for step in range(1, 8):
    ckpt.save(step, state)
  ckpt.close()
  assert ckpt.all_steps() == [4, 6]


def test_restore_into_a_different_model_names_the_first_mismatching_key(tmp_path):
  tx = optax.sgd(0.1)
  saved = TrainState.create(
    {"blocks_0": {"kernel": jnp.ones((4, 8))}, "head": jnp.ones((8,))}, tx, jax.random.PRNGKey(0)
  )
  ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(3, saved, force=True)
  ckpt.wait()
  other = TrainState.create(
    {"blocks_0": {"kernel": jnp.ones((4, 16))}, "head": jnp.ones((8,)), "extra": jnp.ones(())},
    tx,
    jax.random.PRNGKey(0),
  )
  shardings = jax.tree.map(lambda x: x.sharding, other)
  with pytest.raises(
    ValueError,
    match=r"params/blocks_0/kernel: checkpoint \(4, 8\), config "
    r"\(4, 16\) \(and 1 more keys\)",
  ):
    ckpt.restore_latest(other, shardings)
  same = ckpt.restore_latest(saved, jax.tree.map(lambda x: x.sharding, saved))
  assert int(same.step) == 0 and same.params["head"].shape == (8,)
  ckpt.close()


def test_checkpoints_on_a_bucket(gcs_bucket):
  """An Orbax checkpoint under gs://: its files through epath (the fsspec fake), its arrays
  through tensorstore's gcs driver (the fake JSON API server); resume and the params check
  read it back."""
  # Orbax asks google-cloud-storage for a gs:// directory's bucket layout (the gcs extra
  # installs it, with gcsfs; the test extra does not).
  pytest.importorskip("google.cloud.storage")
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=8, fsdp=1)))
  state, shardings = init_sharded(make_state_fn(0), mesh)
  config = ml_collections.ConfigDict(dict(keep=2, every=1, async_save=True))
  ckpt = checkpointing.make_checkpointer(gcs_bucket.url("run"), config)
  assert str(ckpt.directory) == "gs://fake-bucket/run/checkpoints"
  assert ckpt.save(3, state)
  ckpt.close()
  keys = gcs_bucket.keys()
  assert "run/checkpoints/3/state/_METADATA" in keys
  assert any(k.startswith("run/checkpoints/3/state/ocdbt.process_0/") for k in keys)
  assert any(r[1] == "upload" for r in gcs_bucket.server.requests)  # tensorstore's writes.
  other, _ = init_sharded(make_state_fn(1), mesh)
  ckpt = checkpointing.make_checkpointer(gcs_bucket.url("run"), config)
  assert ckpt.latest_step() == 3
  restored = ckpt.restore_latest(other, shardings)
  ckpt.close()
  np.testing.assert_array_equal(
    np.asarray(restored.params["dense"]["kernel"]), np.asarray(state.params["dense"]["kernel"])
  )
  assert not gcs_bucket.server.errors
