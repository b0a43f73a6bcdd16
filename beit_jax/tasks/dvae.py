"""Task `dvae`: train the Gumbel-softmax dVAE visual tokenizer, export it to Orbax.

The DALL-E recipe (paper App. A.2): the ELB with a logit-Laplace (or MSE)
reconstruction term and a KL to the uniform prior weighted by beta; cosine schedules for
the Gumbel temperature (1 -> 1/16), beta (0 -> 6.6) and the lr (1e-4 -> 1.25e-6);
AdamW; optional parameter EMA. Images are the tokenizer view (random-resized crop +
flip, lanczos) of the data source. Evaluation: reconstruction PSNR from the hard
(argmax) tokens, next to a per-patch-mean-colour baseline at the same grid, and codebook
usage. At the end the params go to `<workdir>/export/tokenizer` (Orbax params +
metadata.json), which the masked-image-modeling stage loads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from beit_jax import config_lib, exports, pixels
from beit_jax.data import pipeline, sources, transforms
from beit_jax.models import codebook, dvae, precision
from beit_jax.training import checkpointing, loop, optim
from beit_jax.training import mesh as mesh_lib
from beit_jax.training.train_state import TrainState, init_sharded
from beit_jax.viz import pictures

IMAGE_KEY = "tokenizer_image"
CODEBOOK_INITS = ("random", "kmeans")


# ----------------------------------------------------------------------------------
# Config checks (before anything is compiled or written).
# ----------------------------------------------------------------------------------
def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad value and what to change."""
  config_lib.check_choice(config, "task", ("dvae",))
  config_lib.check_data(config)
  config_lib.check_choice(config, "model.arch", dvae.ARCHS)
  config_lib.check_choice(config, "model.recon_loss", dvae.RECON_LOSSES)
  config_lib.check_choice(config, "model.input_norm", dvae.INPUT_NORMS)
  config_lib.check_choice(config, "model.dtype", tuple(precision.DTYPES))
  config_lib.check_choice(config, "input.interpolation", tuple(transforms.INTERPOLATIONS))
  config_lib.check_positive(
    config,
    "total_steps",
    "input.batch_size",
    "input.image_size",
    "model.vocab_size",
    "log_every",
    "ckpt.every",
    "ckpt.keep",
    "loss.tau_end",
    "optim.lr",
  )
  config_lib.check_positive(
    config, "eval_every", "loss.beta_end", "loss.diversity", "ema_decay", allow_zero=True
  )
  config_lib.check_choice(config, "codebook.init", CODEBOOK_INITS)
  config_lib.check_positive(
    config, "codebook.restart_every", "codebook.restart_below", allow_zero=True
  )
  if config.codebook.restart_every and config.model.arch != "compact":
    raise ValueError(
      "config.codebook.restart_every re-seeds the compact dVAE's codes; use it with "
      "config.model.arch='compact' (or set it to 0)."
    )
  if config.codebook.init == "kmeans":
    config_lib.check_positive(config, "codebook.init_images")
    if config.model.arch != "compact":
      raise ValueError(
        "config.codebook.init='kmeans' sets the compact dVAE's encoder output layer; "
        "use it with config.model.arch='compact' (or codebook.init='random')."
      )
  if config.model.arch == "dall_e" and config.model.recon_loss != "logit_laplace":
    raise ValueError(
      "config.model.arch='dall_e' has a logit-Laplace decoder (6 output "
      "channels): set config.model.recon_loss='logit_laplace'."
    )
  lo, hi = config.input.crop_scale
  if not 0 < lo <= hi <= 1:
    raise ValueError(
      f"config.input.crop_scale={tuple(config.input.crop_scale)} must satisfy 0 < lo <= hi <= 1."
    )
  down = dvae.from_config(config.model).downsample
  if config.input.image_size % down:
    raise ValueError(
      f"config.input.image_size={config.input.image_size} is not divisible by the dVAE's "
      f"downsampling factor {down}; use a multiple of {down} (e.g. "
      f"{max(down, config.input.image_size // down * down)})."
    )
  if not 0 <= config.ema_decay < 1:
    raise ValueError(f"config.ema_decay={config.ema_decay} must be in [0, 1) (0 = no EMA).")


# ----------------------------------------------------------------------------------
# Steps.
# ----------------------------------------------------------------------------------
def make_train_step(
  model: dvae.DiscreteVAE,
  tx: optax.GradientTransformation,
  lr_fn: optim.Schedule,
  config: ml_collections.ConfigDict,
):
  """`train_step(state, batch) -> (state, metrics)`: the ELB loss with annealed tau and
  beta, AdamW, optional EMA, optional dead-code restarts (`config.codebook.restart_every`
  > 0: after every restart_every-th update, `dvae.restart_dead_codes` on that batch)."""
  inject_at_steps = config_lib.injected_nonfinite_steps(config)
  restart_every = config.codebook.get("restart_every", 0)
  tau_fn = optim.cosine_ramp(config.loss.tau_start, config.loss.tau_end, config.loss.tau_steps)
  beta_fn = optim.cosine_ramp(config.loss.beta_start, config.loss.beta_end, config.loss.beta_steps)

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    images = pixels.to_unit(batch[IMAGE_KEY])
    tau, beta = tau_fn(state.step), beta_fn(state.step)

    def loss_fn(params):
      return dvae.elbo_loss(
        model,
        {"params": params},
        images,
        state.step_rng(),
        tau,
        beta,
        config.loss.hard,
        config.loss.diversity,
      )

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, update_metrics = state.apply_gradients(
      grads, tx, loss, ema_decay=config.ema_decay, inject_at_steps=inject_at_steps
    )
    if restart_every:  # Dead-code restarts after the update of every restart_every-th step.
      restarted_params, restarted = dvae.restart_dead_codes(
        new_state.params,
        aux["mean_probs"],
        aux["ids"],
        jax.random.fold_in(state.step_rng(), 1),
        config.codebook.restart_below,
      )
      due = (state.step + 1) % restart_every == 0
      new_state = new_state.replace(
        params=jax.tree.map(lambda a, b: jnp.where(due, a, b), restarted_params, new_state.params)
      )
      update_metrics["restarted_codes"] = jnp.where(due, restarted, 0)
    metrics = dict(
      loss=loss,
      recon_loss=aux["recon_loss"],
      kl=aux["kl"],
      diversity_loss=aux["diversity_loss"],
      mse=aux["mse"],
      psnr=aux["psnr"],
      token_counts=aux["token_counts"],
      tau=tau,
      beta=beta,
      lr=lr_fn(state.step),
      **update_metrics,
    )
    return new_state, metrics

  return train_step


class StepParts(NamedTuple):
  """What the dVAE step is made of, from the config alone (no weights, no data): the
  task compiles `train_step` over its mesh, `beit_jax.aot` for a TPU topology."""

  model: dvae.DiscreteVAE
  lr_fn: optim.Schedule
  tx: optax.GradientTransformation
  init_fn: Callable[[], TrainState]
  train_step: Callable[..., Any]  # (state, batch) -> (state, metrics)


def make_step_parts(config: ml_collections.ConfigDict) -> StepParts:
  """The dVAE, schedule, optimizer, state initialiser and train step of `config`."""
  model = dvae.from_config(config.model)
  lr_fn = config_lib.lr_schedule(config)
  tx = optim.make_optimizer(config.optim, lr_fn)
  size = config.input.image_size

  def init_fn() -> TrainState:
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    params = model.init(init_rng, dummy, rng=init_rng, tau=1.0, hard=False)["params"]
    return TrainState.create(params, tx, state_rng, use_ema=config.ema_decay > 0)

  return StepParts(model, lr_fn, tx, init_fn, make_train_step(model, tx, lr_fn, config))


def batch_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """(shape, dtype) of each array of a global train batch, as the pipeline makes them."""
  size = config.input.image_size
  return {IMAGE_KEY: ((config.input.batch_size, size, size, 3), jnp.uint8)}


def make_summarize_train(vocab_size: int) -> loop.Summarize:
  """Interval means plus the codebook usage and perplexity of the interval's argmax
  tokens, with the collapse warning (`loop.make_codebook_summarize`) and the restart count."""
  summarize_codebook = loop.make_codebook_summarize(
    vocab_size,
    "Raise config.loss.diversity (e.g. 0.1), use config.codebook.init='kmeans', or lower "
    "config.loss.beta_end / config.optim.lr.",
  )

  def summarize(sums: Mapping[str, np.ndarray], num_steps: int) -> dict[str, float]:
    scalars = summarize_codebook(sums, num_steps)
    if "restarted_codes" in sums:  # A count over the interval, not a mean.
      scalars["restarted_codes"] = int(sums["restarted_codes"])
    return scalars

  return summarize


def make_eval_step(model: dvae.DiscreteVAE):
  """Sums over a batch: PSNR of the hard-token reconstruction and of the patch-mean baseline."""
  down = model.downsample

  def eval_step(params, batch):
    images = pixels.to_unit(batch[IMAGE_KEY])
    valid = batch["valid"].astype(jnp.float32)
    variables = {"params": params}
    ids = dvae.tokenize(model, variables, images)
    recon = dvae.decode(model, variables, ids)
    b, h, w, c = images.shape
    patches = images.reshape(b, h // down, down, w // down, down, c)
    baseline = jnp.broadcast_to(patches.mean(axis=(2, 4), keepdims=True), patches.shape)
    baseline = baseline.reshape(images.shape)

    mse_model = jnp.mean((recon - images) ** 2, axis=(1, 2, 3))
    psnr_model = pixels.psnr(mse_model)
    psnr_base = pixels.psnr(jnp.mean((baseline - images) ** 2, axis=(1, 2, 3)))
    vocab = model.vocab_size
    counts = (
      jnp.zeros((vocab,), jnp.int32)
      .at[ids.reshape(b, -1)]
      .add(jnp.broadcast_to(batch["valid"][:, None], (b, ids[0].size)).astype(jnp.int32))
    )
    return dict(
      psnr=jnp.sum(psnr_model * valid),
      baseline_psnr=jnp.sum(psnr_base * valid),
      mse=jnp.sum(mse_model * valid),
      num_images=jnp.sum(valid),
      token_counts=counts,
    )

  return eval_step


def evaluate(eval_step, params, eval_iter, batch_sharding) -> dict[str, float]:
  """Runs over the whole eval split once; returns per-image means and codebook stats."""
  sums = loop.sum_over_batches(eval_step, eval_iter, (IMAGE_KEY, "valid"), batch_sharding, params)
  if sums is None:
    return {}
  n = max(float(sums["num_images"]), 1.0)
  result = dict(
    psnr=sums["psnr"] / n,
    baseline_psnr=sums["baseline_psnr"] / n,
    mse=sums["mse"] / n,
    num_images=int(sums["num_images"]),
  )
  result["psnr_gain_over_baseline"] = result["psnr"] - result["baseline_psnr"]
  result.update(codebook.codebook_stats(sums["token_counts"]))
  return {k: float(v) if k != "num_images" else v for k, v in result.items()}


def kmeans_init_state(config, model, state, state_sharding, source, transform) -> TrainState:
  """`state` with the encoder's output layer set by k-means of the encoder features of
  `config.codebook.init_images` training views (`dvae.kmeans_logits_init`). Every
  process draws the same views (one shard), so the params stay identical everywhere."""
  images = next(
    pipeline.make_train_iterator(
      source,
      transform,
      global_batch_size=config.codebook.init_images,
      seed=config.seed + 1,
      process_index=0,
      process_count=1,
    )
  )[IMAGE_KEY]
  init = jax.jit(lambda p, x, r: dvae.kmeans_logits_init(model, p, pixels.to_unit(x), r))
  params = init(jax.device_get(state.params), images, jax.random.PRNGKey(config.seed + 1))
  logging.info(
    "Codebook: encoder output layer initialised by k-means of %d views' features.",
    len(images),
  )
  params = jax.device_put(params, state_sharding.params)
  ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
  return state.replace(params=params, ema_params=ema)


def describe_run(
  config: ml_collections.ConfigDict, export_dir: str, num_train: int, result: loop.RunResult
) -> list[str]:
  """The end-of-run summary: what was trained, its eval beside the patch-mean baseline,
  the export and the next command."""
  lines = [
    f"Trained: a {config.model.arch} dVAE tokenizer, {config.model.vocab_size} codes, "
    f"{config.input.image_size} px views, {config.total_steps} steps on "
    f"{config.data.source} ({num_train} images)."
  ]
  e = result.eval
  if e:
    verdict = "beats" if e["psnr"] > e["baseline_psnr"] else "does NOT beat"
    lines.append(
      f"Eval ({e['num_images']} images, argmax tokens): PSNR {e['psnr']:.2f} dB vs "
      f"{e['baseline_psnr']:.2f} dB for each token's patch painted its mean colour "
      f"({e['psnr'] - e['baseline_psnr']:+.2f} dB: the tokenizer {verdict} it); codebook "
      f"use {100 * e['usage']:.1f}% of {config.model.vocab_size} codes (perplexity "
      f"{e['perplexity']:.0f})."
    )
  lines += [
    f"Export: {export_dir}",
    "Next: pretrain BEiT against it: python -m beit_jax.main "
    f"--config=configs/pretrain_small.py --config.tokenizer.path={export_dir}",
  ]
  return lines


# ----------------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  """Trains (or resumes) in `workdir`, evaluates, exports the tokenizer."""
  check_config(config)

  # --- Mesh ---------------------------------------------------------------------
  mesh, batch_sharding, replicated = mesh_lib.task_mesh(config)

  # --- Input --------------------------------------------------------------------
  train_source = sources.make_source(config.data, config.data.train_split)
  eval_source = sources.make_source(config.data, config.data.eval_split)
  train_transform = transforms.SingleViewTransform(
    size=config.input.image_size,
    key=IMAGE_KEY,
    scale=tuple(config.input.crop_scale),
    ratio=tuple(config.input.crop_ratio),
    interpolation=config.input.interpolation,
    flip_prob=config.input.flip_prob,
    color_jitter=config.input.color_jitter,
  )
  eval_transform = transforms.CenterCropTransform(
    size=config.input.image_size, key=IMAGE_KEY, interpolation=config.input.interpolation
  )
  data_iter = pipeline.make_task_train_iterator(config, train_source, train_transform)
  logging.info(
    "Train source: %s (%d images); eval: %s",
    config.data.source,
    len(train_source),
    "none" if eval_source is None else f"{len(eval_source)} images",
  )

  # --- Model, schedules and optimizer ---------------------------------------------
  parts = make_step_parts(config)
  model = parts.model

  state, state_sharding = init_sharded(parts.init_fn, mesh)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("dVAE %s: %s params", config.model.arch, f"{num_params:,}")

  # --- Resume, or a fresh start's codebook initialisation ------------------------------
  ckpt = checkpointing.make_checkpointer(workdir, config.ckpt)
  if ckpt.latest_step() is None and config.codebook.init == "kmeans":
    state = kmeans_init_state(config, model, state, state_sharding, train_source, train_transform)
  state = ckpt.restore_latest(state, state_sharding, data_iter)

  # --- Compiled steps -------------------------------------------------------------
  train_step = loop.compile_train_step(parts.train_step, state_sharding, batch_sharding)
  eval_step = jax.jit(
    make_eval_step(model),
    in_shardings=(state_sharding.eval_params, batch_sharding),
    out_shardings=replicated,
  )

  def eval_fn(state: TrainState) -> dict[str, float]:
    eval_iter = pipeline.make_eval_iterator(
      eval_source, eval_transform, batch_size=config.eval_batch_size
    )
    return evaluate(eval_step, state.eval_params, eval_iter, batch_sharding)

  # --- Train, then export ------------------------------------------------------------
  export_dir = config.export_dir or os.path.join(workdir, "export", "tokenizer")

  def export(result: loop.RunResult) -> None:
    state = result.state
    exports.write_tokenizer(
      export_dir,
      state.eval_params,
      config.model.to_dict(),
      config.input.image_size,
      step=int(jax.device_get(state.step)),
      ema=state.ema_params is not None,
      eval_metrics=result.eval,
    )
    logging.info("Exported tokenizer params to %s", export_dir)

  def describe(result: loop.RunResult) -> list[str]:
    return describe_run(config, export_dir, len(train_source), result)

  painter = None
  if config.get("pictures", True):  # Reconstructions etc. at every checkpoint (beit_jax/viz).
    sample = pictures.sample_images(train_source, 4)
    painter = pictures.checkpoint_painter(
      workdir,
      lambda state: pictures.tokenizer_pictures(
        model, {"params": state.eval_params}, sample, config.input.image_size
      )[0],
      config.tensorboard,
    )
  return loop.run_job(
    config=config,
    workdir=workdir,
    state=state,
    train_step=train_step,
    data_iter=data_iter,
    batch_keys=(IMAGE_KEY,),
    batch_sharding=batch_sharding,
    checkpointer=ckpt,
    eval_fn=eval_fn if eval_source is not None else None,
    summarize=make_summarize_train(model.vocab_size),
    finish=export,
    on_checkpoint=painter,
    console_keys=("loss", "psnr", "baseline_psnr", "usage", "perplexity", "tau", "restarted_codes"),
    describe=describe,
  )
