"""The train state every task uses, and its sharded initialisation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from beit_jax.training import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  """Step counter, params, optimizer state, base RNG, (optional) parameter EMA and
  (optional) BatchNorm statistics (`batch_stats`: the segmentation neck and heads).

  The per-step RNG is `fold_in(rng, step)`, so it never needs a host round trip and
  continues exactly after a resume.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  ema_params: Any = None
  nonfinite_streak: Any = None  # Consecutive steps skipped for a non-finite loss/gradient.
  batch_stats: Any = None  # Flax's 'batch_stats' collection (running means / variances).

  @classmethod
  def create(
    cls,
    params: Any,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    use_ema: bool = False,
    batch_stats: Any = None,
  ) -> TrainState:
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=rng,
      ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
      nonfinite_streak=jnp.zeros((), jnp.int32),
      batch_stats=batch_stats,
    )

  @property
  def eval_params(self) -> Any:
    """The params to evaluate, export and draw: the EMA when it is kept, else the params."""
    return self.params if self.ema_params is None else self.ema_params

  def step_rng(self) -> jax.Array:
    return jax.random.fold_in(self.rng, self.step)

  def apply_gradients(
    self,
    grads: Any,
    tx: optax.GradientTransformation,
    loss: jax.Array,
    *,
    ema_decay: float | None = None,
    inject_at_steps: tuple[int, ...] = (),
    batch_stats: Any = None,
  ) -> tuple[TrainState, dict]:
    """One optimizer step, skipped when the loss or the gradient norm is not finite.

    Inside the jitted step (no host sync): a skipped step keeps params, optimizer state
    and EMA, still advances `step` (the batch is consumed, the schedule moves on) and adds
    one to `nonfinite_streak` (reset by a good step); the host stops the run when the
    streak reaches its limit (`loop.run`). Returns the state and metrics
    `{grad_norm, nonfinite}` (nonfinite: 1.0 for a skipped step). `inject_at_steps` turns
    the gradients of those steps into NaN (fault injection for tests:
    `config.nonfinite.inject_at_steps`). `batch_stats`: the step's updated BatchNorm
    statistics (kept, like the params, only when the step is finite).
    """
    if inject_at_steps:
      injected = jnp.isin(self.step, jnp.asarray(inject_at_steps, jnp.int32))
      grads = jax.tree.map(lambda g: jnp.where(injected, jnp.nan, g), grads)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema = self.ema_params
    if ema is not None and ema_decay is not None:
      ema = optax.incremental_update(params, ema, step_size=1.0 - ema_decay)

    def keep(new, old):
      return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    streak = jnp.zeros((), jnp.int32) if self.nonfinite_streak is None else self.nonfinite_streak
    state = self.replace(
      step=self.step + 1,
      params=keep(params, self.params),
      opt_state=keep(opt_state, self.opt_state),
      ema_params=None if ema is None else keep(ema, self.ema_params),
      nonfinite_streak=jnp.where(ok, 0, streak + 1).astype(jnp.int32),
      batch_stats=self.batch_stats if batch_stats is None else keep(batch_stats, self.batch_stats),
    )
    return state, dict(grad_norm=grad_norm, nonfinite=1.0 - ok.astype(jnp.float32))


def init_sharded(
  init_fn: Callable[[], TrainState], mesh: Mesh, min_shard_size: int = 2**18
) -> tuple[TrainState, Any]:
  """Initialises the state directly into its shardings (never whole on one device).

  Leaves with at least `min_shard_size` elements are split over the mesh's 'fsdp' axis
  (`mesh.fsdp_spec`); smaller ones are replicated. Returns the state and its shardings (a
  pytree of NamedSharding with the state's structure) for use as jit in/out shardings and
  Orbax restore targets.
  """
  abstract = jax.eval_shape(init_fn)
  shardings = mesh_lib.state_shardings(abstract, mesh, min_shard_size)
  state = jax.jit(init_fn, out_shardings=shardings)()
  return state, shardings


def place(host_tree: Any, shardings: Any) -> Any:
  """Host (numpy) arrays -> global arrays with `shardings`; each process (every process
  holds the same host values) copies only the shards of its own devices."""
  return jax.tree.map(
    lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda index: x[index]),
    host_tree,
    shardings,
  )


def init_sharded_from_params(
  host_params: Any,
  create: Callable[[Any], TrainState],
  mesh: Mesh,
  min_shard_size: int = 2**18,
  params_of: Callable[[Any], Any] = lambda shardings: shardings.params,
) -> tuple[TrainState, Any]:
  """`init_sharded` for a state built from given params (pretrained weights): the params
  go straight into their shards (`place`) and `create(params)` (optimizer state etc.) runs
  sharded; the weights are never baked into a compiled program as constants.
  `params_of(state shardings)` gives the shardings of `host_params` (default: the state's
  `params`; segmentation passes {'params', 'batch_stats'})."""
  abstract = jax.eval_shape(create, host_params)
  shardings = mesh_lib.state_shardings(abstract, mesh, min_shard_size)
  params = place(host_params, params_of(shardings))
  state = jax.jit(create, out_shardings=shardings)(params)
  return state, shardings
