"""Sharded state initialisation from given (pretrained) params."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from beit_jax.training import mesh as mesh_lib
from beit_jax.training.train_state import TrainState, init_sharded_from_params, place


def test_state_from_host_params_lands_in_its_shards():
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4)))
  rng = np.random.default_rng(0)
  host = {
    "dense": {
      "kernel": rng.normal(size=(64, 512)).astype(np.float32),
      "bias": np.zeros(512, np.float32),
    }
  }
  tx = optax.adamw(1e-3)
  state, shardings = init_sharded_from_params(
    host,
    lambda p: TrainState.create(p, tx, jax.random.PRNGKey(0), use_ema=True),
    mesh,
    min_shard_size=1024,
  )
  kernel = state.params["dense"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp") == shardings.params["dense"]["kernel"].spec
  assert state.params["dense"]["bias"].sharding.spec == P()  # 512 < 1024: replicated.
  assert state.opt_state[0].mu["dense"]["kernel"].sharding.spec == P(None, "fsdp")
  assert {s.data.shape for s in kernel.addressable_shards} == {(64, 128)}
  np.testing.assert_array_equal(np.asarray(kernel), host["dense"]["kernel"])
  np.testing.assert_array_equal(
    np.asarray(state.ema_params["dense"]["kernel"]), host["dense"]["kernel"]
  )
  replicated = place(host, jax.tree.map(lambda _: mesh_lib.replicated(mesh), host))
  np.testing.assert_array_equal(np.asarray(replicated["dense"]["bias"]), host["dense"]["bias"])


def test_ema_is_decay_times_ema_plus_the_rest_times_the_new_params():
  """optax.incremental_update with step 1 - decay: ema' = decay * ema + (1 - decay) * params'."""
  state = TrainState.create(
    {"a": jnp.zeros(3)}, optax.sgd(1.0), jax.random.PRNGKey(0), use_ema=True
  )
  state = state.replace(ema_params={"a": jnp.full(3, 2.0)})
  new, _ = state.apply_gradients(
    {"a": -jnp.ones(3)}, optax.sgd(1.0), jnp.float32(0.0), ema_decay=0.9
  )
  np.testing.assert_allclose(new.params["a"], 1.0)
  np.testing.assert_allclose(new.ema_params["a"], 0.9 * 2.0 + 0.1 * 1.0, rtol=1e-6)
  assert new.eval_params is new.ema_params
  plain = TrainState.create({"a": jnp.zeros(3)}, optax.sgd(1.0), jax.random.PRNGKey(0))
  assert plain.eval_params is plain.params


def test_batch_stats_are_placed_and_kept_only_for_a_finite_step():
  """The segmentation state: {'params', 'batch_stats'} from the host into their shardings
  (`params_of`); a step's new BatchNorm statistics replace the old only when it is finite,
  and a step given none keeps them."""
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  host = {
    "params": {"w": np.ones((4, 3), np.float32)},
    "batch_stats": {"bn": {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}},
  }
  tx = optax.sgd(0.1)
  state, shardings = init_sharded_from_params(
    host,
    lambda v: TrainState.create(
      v["params"], tx, jax.random.PRNGKey(0), batch_stats=v["batch_stats"]
    ),
    mesh,
    params_of=lambda sh: {"params": sh.params, "batch_stats": sh.batch_stats},
  )
  assert state.batch_stats["bn"]["var"].sharding == shardings.batch_stats["bn"]["var"]
  np.testing.assert_array_equal(np.asarray(state.batch_stats["bn"]["var"]), 1.0)
  new = {"bn": {"mean": jnp.full(3, 0.5), "var": jnp.full(3, 2.0)}}
  grads = {"w": jnp.ones((4, 3))}
  step = jax.jit(lambda s, loss, stats: s.apply_gradients(grads, tx, loss, batch_stats=stats))
  good, _ = step(state, jnp.float32(1.0), new)
  np.testing.assert_array_equal(np.asarray(good.batch_stats["bn"]["mean"]), 0.5)
  np.testing.assert_allclose(np.asarray(good.params["w"]), 0.9)
  bad, metrics = step(
    good, jnp.float32(np.nan), {"bn": {"mean": jnp.full(3, 7.0), "var": new["bn"]["var"]}}
  )
  assert float(metrics["nonfinite"]) == 1.0
  np.testing.assert_array_equal(np.asarray(bad.batch_stats["bn"]["mean"]), 0.5)
  np.testing.assert_allclose(np.asarray(bad.params["w"]), 0.9)
  kept, _ = jax.jit(lambda s: s.apply_gradients(grads, tx, jnp.float32(1.0)))(good)
  np.testing.assert_array_equal(np.asarray(kept.batch_stats["bn"]["mean"]), 0.5)
