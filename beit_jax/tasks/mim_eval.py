"""The MIM evaluation of task `pretrain`, and its end-of-run summary.

On the eval split (centre crops, a fixed mask per image) the ViT's masked-token
cross-entropy and accuracy are reported next to those of a context-free predictor on the
same masked tokens: the unigram distribution of the training tokens (`unigram_loss`) and
always the most frequent training token (`frequent_acc`). A ViT that does not beat them
has learned no more than the token frequencies. The prior is counted from the tokens of
the centre crops of the first `config.prior_images` training images. With
`config.target='pixels'` the eval is the masked patches' L2 loss next to that of painting
each patch its own mean colour (`patch_mean_loss`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from beit_jax import config_lib, pixels
from beit_jax.data import pipeline
from beit_jax.models import tokenizer as tokenizer_lib
from beit_jax.models import vit
from beit_jax.training import loop, losses

# The keys of a pretrain batch (the two views and the mask the pipeline makes).
IMAGE_KEY = "image"
TOKENIZER_KEY = "tokenizer_image"
MASK_KEY = "mask"
BATCH_KEYS = (IMAGE_KEY, TOKENIZER_KEY, MASK_KEY)


def make_eval_step(
  model: vit.BEiT, tokenizer: tokenizer_lib.Tokenizer, max_masked: int, input_norm: str
):
  """Sums over a padded eval batch: masked-token cross-entropy, correct, count, images;
  and the same for the context-free predictor `log_prior` (V,) (log unigram frequencies
  of the training tokens: its cross-entropy, and the hits of always predicting the most
  frequent token)."""

  def eval_step(
    params: Any, batch: Mapping[str, jax.Array], tokenizer_params: Any, log_prior: jax.Array
  ):
    images = pixels.normalize(batch[IMAGE_KEY], input_norm)
    ids = tokenizer_lib.tokenize(tokenizer, tokenizer_params, pixels.to_unit(batch[TOKENIZER_KEY]))
    ids = ids.reshape(ids.shape[0], -1)
    valid = batch["valid"]
    mask = jnp.logical_and(batch[MASK_KEY].astype(bool), valid[:, None])
    positions, weights = losses.masked_positions(mask, max_masked)
    targets = jnp.take_along_axis(ids, positions, axis=1)
    logits = model.apply(
      {"params": params}, images, mask, positions, train=False, method=vit.BEiT.mim_logits
    )
    prior = losses.masked_token_sums(jnp.broadcast_to(log_prior, logits.shape), targets, weights)
    return dict(
      losses.masked_token_sums(logits, targets, weights),
      unigram_loss_sum=prior["loss_sum"],
      frequent_correct=prior["correct"],
      num_images=jnp.sum(valid.astype(jnp.float32)),
    )

  return eval_step


def make_pixel_eval_step(model: vit.BEiT, max_masked: int, input_norm: str):
  """Sums over a padded eval batch for `config.target='pixels'`: the masked patches' L2
  loss, that of predicting each patch as its own mean colour (0 after the per-patch
  normalisation of the target), the patch count and the images."""

  def eval_step(params: Any, batch: Mapping[str, jax.Array]):
    images = pixels.normalize(batch[IMAGE_KEY], input_norm)
    valid = batch["valid"]
    mask = jnp.logical_and(batch[MASK_KEY].astype(bool), valid[:, None])
    positions, weights = losses.masked_positions(mask, max_masked)
    targets = jnp.take_along_axis(
      losses.normalized_patch_pixels(images, model.patch_size), positions[..., None], axis=1
    )
    predictions = model.apply(
      {"params": params}, images, mask, positions, train=False, method=vit.BEiT.mim_logits
    )
    return dict(
      losses.masked_pixel_sums(predictions, targets, weights),
      num_images=jnp.sum(valid.astype(jnp.float32)),
    )

  return eval_step


def evaluate_pixels(eval_step, params: Any, eval_iter, batch_sharding) -> dict[str, float]:
  """Pixel-regression loss over one pass of the eval split (masks fixed per image), next
  to `patch_mean_loss`: the loss of painting each masked patch its own mean colour."""
  sums = loop.sum_over_batches(
    eval_step, eval_iter, (IMAGE_KEY, MASK_KEY, "valid"), batch_sharding, params
  )
  if sums is None:
    return {}
  count = max(float(sums["count"]), 1.0)
  return dict(
    loss=float(sums["loss_sum"]) / count,
    patch_mean_loss=float(sums["zero_loss_sum"]) / count,
    num_images=int(sums["num_images"]),
  )


def make_token_histogram(tokenizer: tokenizer_lib.Tokenizer):
  """(tokenizer_params, batch) -> (V,) int32 counts of the tokens of the batch's valid
  images (all positions)."""

  def histogram(tokenizer_params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    ids = tokenizer_lib.tokenize(tokenizer, tokenizer_params, pixels.to_unit(batch[TOKENIZER_KEY]))
    ids = ids.reshape(ids.shape[0], -1)
    weight = jnp.broadcast_to(batch["valid"][:, None], ids.shape).astype(jnp.int32)
    counts = jnp.zeros((tokenizer.vocab_size,), jnp.int32).at[ids].add(weight)
    return {"counts": counts}

  return histogram


def log_unigram_prior(counts: np.ndarray) -> np.ndarray:
  """log p of the add-one-smoothed unigram distribution of token `counts` (V,)."""
  counts = np.asarray(counts, np.float64) + 1.0
  return np.log(counts / counts.sum()).astype(np.float32)


def training_token_prior(histogram, tokenizer_params, batches, batch_sharding) -> np.ndarray:
  """`log_unigram_prior` of the tokens of `batches` (centre crops of training images)."""
  sums = loop.sum_over_batches(
    histogram, batches, (TOKENIZER_KEY, "valid"), batch_sharding, tokenizer_params
  )
  return log_unigram_prior(np.zeros(0) if sums is None else sums["counts"])


def evaluate(
  eval_step, params: Any, tokenizer_params: Any, log_prior, eval_iter, batch_sharding
) -> dict[str, float]:
  """MIM loss and accuracy over one pass of the eval split (masks fixed per image), next
  to those of the context-free predictor `log_prior` on the same masked tokens:
  `unigram_loss` (cross-entropy of the training tokens' unigram distribution) and
  `frequent_acc` (always the most frequent training token)."""
  sums = loop.sum_over_batches(
    eval_step,
    eval_iter,
    BATCH_KEYS + ("valid",),
    batch_sharding,
    params,
    tokenizer_params,
    log_prior,
  )
  if sums is None:
    return {}
  count = max(float(sums["count"]), 1.0)
  return dict(
    loss=float(sums["loss_sum"]) / count,
    mlm_acc=float(sums["correct"]) / count,
    unigram_loss=float(sums["unigram_loss_sum"]) / count,
    frequent_acc=float(sums["frequent_correct"]) / count,
    num_images=int(sums["num_images"]),
  )


def make_eval_fn(
  config: ml_collections.ConfigDict,
  model: vit.BEiT,
  tokenizer: tokenizer_lib.Tokenizer | None,
  tokenizer_params: Any,
  max_masked: int,
  shardings: tuple[Any, Any, Any, Any],
  data: tuple[Any, Any, Any],
) -> Callable[[Any], dict[str, float]]:
  """`eval_fn(state) -> metrics` of the pretrain job, its steps compiled once: `evaluate`
  (the prior counted at the first call) or, for `config.target='pixels'`,
  `evaluate_pixels`. `shardings`: (eval params, batch, tokenizer params, replicated);
  `data`: (train source, eval source, eval transform)."""
  params_sharding, batch_sharding, tokenizer_sharding, replicated = shardings
  train_source, eval_source, eval_transform = data

  def eval_batches(source):
    return pipeline.make_eval_iterator(source, eval_transform, batch_size=config.eval_batch_size)

  if config.get("target", "tokens") == "pixels":
    pixel_step = jax.jit(
      make_pixel_eval_step(model, max_masked, config.input.norm),
      in_shardings=(params_sharding, batch_sharding),
      out_shardings=replicated,
    )
    return lambda state: evaluate_pixels(
      pixel_step, state.eval_params, eval_batches(eval_source), batch_sharding
    )
  eval_step = jax.jit(
    make_eval_step(model, tokenizer, max_masked, config.input.norm),
    in_shardings=(params_sharding, batch_sharding, tokenizer_sharding, replicated),
    out_shardings=replicated,
  )
  histogram = jax.jit(
    make_token_histogram(tokenizer),
    in_shardings=(tokenizer_sharding, batch_sharding),
    out_shardings=replicated,
  )
  prior: list[np.ndarray] = []  # The baseline's log unigram prior, made at the first eval.

  def eval_fn(state) -> dict[str, float]:
    if not prior:  # Centre crops of the first `prior_images` training images.
      num_batches = -(-min(config.prior_images, len(train_source)) // config.eval_batch_size)
      batches = itertools.islice(eval_batches(train_source), num_batches)
      prior.append(training_token_prior(histogram, tokenizer_params, batches, batch_sharding))
    return evaluate(
      eval_step,
      state.eval_params,
      tokenizer_params,
      prior[0],
      eval_batches(eval_source),
      batch_sharding,
    )

  return eval_fn


def describe_run(
  config: ml_collections.ConfigDict,
  export_dir: str,
  tokenizer_path: str,
  num_train: int,
  result: loop.RunResult,
) -> list[str]:
  """The end-of-run summary: what was trained, the eval beside the context-free
  baselines (did the ViT learn more than the token frequencies?), the export, the next
  commands."""
  _, _, lr = config_lib.effective_lr(config)
  target = f"tokenizer {tokenizer_path}" if tokenizer_path else "pixel-regression target"
  what = f"BEiT-{config.model.variant} masked image modeling"
  if config.model.get("patch_aggregation", False):
    what = (
      f"BEiT v2-{config.model.variant} masked image modeling with patch aggregation (train "
      "loss = main head + cls_pt head; the eval and the export are the main head's)"
    )
  lines = [
    f"Trained: {what}, {config.total_steps} steps on {config.data.source} ({num_train} "
    f"images), {target}, {lr}."
  ]
  e = result.eval
  if e and "patch_mean_loss" in e:
    lines.append(
      f"Eval ({e['num_images']} images, fixed masks): masked-patch L2 loss {e['loss']:.3f} "
      f"(normalised pixels) vs {e['patch_mean_loss']:.3f} for each patch painted its own "
      "mean colour."
    )
  elif e:
    learned = e["loss"] < e["unigram_loss"] and e["mlm_acc"] > e["frequent_acc"]
    lines.append(
      f"Eval ({e['num_images']} images, fixed masks): masked-token loss {e['loss']:.3f} vs "
      f"{e['unigram_loss']:.3f} for the training tokens' frequencies; mlm_acc "
      f"{100 * e['mlm_acc']:.1f}% vs {100 * e['frequent_acc']:.1f}% for always the most "
      "frequent token: "
      + (
        "the ViT predicts the masked tokens better than their frequencies."
        if learned
        else "the ViT does NOT beat the token frequencies yet (train longer, or check the "
        "tokenizer's summary)."
      )
    )
  lines += [
    f"Export: {export_dir}",
    "Next: fine-tune it: python -m beit_jax.main --config=configs/finetune_small.py "
    f"--config.pretrained={export_dir}; probe it: --config=configs/linear_probe_small.py"
    + (f"; pictures: python -m beit_jax.viz --export={export_dir}" if tokenizer_path else ""),
  ]
  return lines
