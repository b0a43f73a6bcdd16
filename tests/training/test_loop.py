"""The step loop: step arguments, what it returns, logging intervals, the compiled step."""

import chex
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from beit_jax.training import loop
from beit_jax.training.checkpointing import Checkpointer
from beit_jax.training.metrics import MetricWriter
from beit_jax.training.train_state import TrainState


def _data(batch=4):
  return iter(
    grain.MapDataset.range(10_000)
    .map(
      lambda i: {"x": np.full((batch,), i, np.float32), "num_skipped": np.zeros((batch,), np.int32)}
    )
    .to_iter_dataset()
  )


def _sharding():
  return NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), P())


def _run(tmp_path, train_step, total_steps, **kwargs):
  ckpt = Checkpointer(str(tmp_path / "ckpt"), save_interval_steps=1000, async_save=False)
  writer = MetricWriter(str(tmp_path), total_steps, tensorboard=False)
  state = TrainState.create({"w": jnp.zeros(())}, optax.sgd(1.0), jax.random.PRNGKey(0))
  try:
    return loop.run(
      state=state,
      train_step=train_step,
      data_iter=_data(),
      batch_keys=("x",),
      batch_sharding=_sharding(),
      total_steps=total_steps,
      writer=writer,
      checkpointer=ckpt,
      log_every=3,
      **kwargs,
    )
  finally:
    ckpt.close()
    writer.close()


def test_step_args_get_the_host_step_and_the_result_holds_the_last_interval(tmp_path):
  seen = []

  def step_args(step):
    seen.append(step)
    return (jnp.float32(step),)

  @jax.jit
  def train_step(state, batch, host_step):
    # The device step and the host step agree; the metric is the batch's first value.
    return state.replace(step=state.step + 1, params={"w": state.params["w"] + host_step}), {
      "agree": (state.step == host_step.astype(jnp.int32)).astype(jnp.float32),
      "x": batch["x"][0],
    }

  result = _run(
    tmp_path,
    train_step,
    7,
    step_args=step_args,
    eval_fn=lambda state: {"w": float(state.params["w"])},
  )
  assert seen == list(range(7))
  assert isinstance(result, loop.RunResult) and result.stopped_by is None
  assert int(result.state.step) == 7 and result.eval == {"w": float(sum(range(7)))}
  # The last interval is step 7 alone (log every 3: 1-3, 4-6, 7): its mean of x.
  assert result.train == {"agree": 1.0, "x": 6.0}


def test_compile_train_step_donates_the_state_and_refuses_a_retrace():
  sharding = _sharding()

  def train_step(state, batch):
    return state + jnp.sum(batch), {"loss": jnp.mean(batch)}

  step = loop.compile_train_step(train_step, sharding, sharding)
  state, metrics = step(jnp.zeros(()), jnp.ones((4,)))
  assert float(state) == 4.0 and float(metrics["loss"]) == 1.0
  old = jnp.zeros(())
  step(old, jnp.ones((4,)))
  assert old.is_deleted()  # Donated.
  with pytest.raises(AssertionError, match="traced"):
    step(jnp.zeros(()), jnp.ones((5,)))  # A new shape would compile a second program.
  # Built again (a notebook re-running a job), it starts counting from zero.
  again = loop.compile_train_step(train_step, sharding, sharding)
  again(jnp.zeros(()), jnp.ones((6,)))
  chex.clear_trace_counter()


def test_codebook_summarize_gives_usage_perplexity_and_warns_once_on_collapse(caplog):
  summarize = loop.make_codebook_summarize(100, "Do X.")
  counts = np.zeros(100, np.float32)
  counts[:50] = 2.0
  out = summarize({"loss": np.float32(6.0), "token_counts": counts}, 3)
  assert out["loss"] == pytest.approx(2.0) and out["usage"] == pytest.approx(0.5)
  assert out["perplexity"] == pytest.approx(50.0, rel=1e-5)
  assert "Codebook collapse" not in caplog.text
  counts = np.zeros(100, np.float32)
  counts[:5] = 1.0
  with caplog.at_level("WARNING"):
    assert summarize({"token_counts": counts}, 1)["usage"] == pytest.approx(0.05)
    summarize({"token_counts": counts}, 1)
  assert caplog.text.count("Codebook collapse: the last 1 steps used 5.0% of the 100 codes") == 1
  assert "Do X." in caplog.text
