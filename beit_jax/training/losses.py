"""The losses and the accuracy sums of every task, on top of optax's cross-entropies.

All take logits of any dtype and compute in float32 (bf16 logits lose the loss's low
bits: flax#677).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from beit_jax.models import vit

Array = jax.Array


def _mean(per_example: Array, weights: Any | None) -> Array:
  """Mean, or weighted mean (rows with weight 0 ignored, even if not finite)."""
  if weights is None:
    return jnp.mean(per_example)
  w = jnp.asarray(weights, jnp.float32)
  total = jnp.sum(w)
  summed = jnp.sum(jnp.where(w > 0, per_example * w, 0.0))
  return summed / jnp.where(total > 0, total, 1.0)


def soft_target_cross_entropy(logits: Any, targets: Any, weights: Any | None = None) -> Array:
  """timm `SoftTargetCrossEntropy`: the mean over examples of `sum(-t * log_softmax(z))`
  for (B, K) soft targets (mixup / cutmix); `weights` (B,) gives a weighted mean (a
  padded batch's `valid`)."""
  per_example = optax.softmax_cross_entropy(
    jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.float32)
  )
  return _mean(per_example, weights)


def label_smoothing_cross_entropy(
  logits: Any, labels: Any, smoothing: float = 0.1, weights: Any | None = None
) -> Array:
  """timm `LabelSmoothingCrossEntropy`, `(1 - s) * nll + s * mean(-log_softmax(z))`: the
  cross-entropy with `optax.smooth_labels(one_hot, s)` targets."""
  logits = jnp.asarray(logits, jnp.float32)
  targets = optax.smooth_labels(jax.nn.one_hot(jnp.asarray(labels), logits.shape[-1]), smoothing)
  return soft_target_cross_entropy(logits, targets, weights)


def masked_positions(mask: jax.Array, max_masked: int) -> tuple[jax.Array, jax.Array]:
  """(B, N) bool -> positions (B, K) of the masked patches (in order, padded) and weights.

  Static shapes: K = `max_masked`, an upper bound of the per-image count (the blockwise
  generator never exceeds its target). Padding slots point at unmasked patches and get
  weight 0.
  """
  order = jnp.argsort(jnp.logical_not(mask), axis=1, stable=True)[:, :max_masked]
  weights = jnp.take_along_axis(mask, order, axis=1).astype(jnp.float32)
  return order.astype(jnp.int32), weights


def masked_token_sums(logits: Array, targets: Array, weights: Array) -> dict[str, Array]:
  """Sums over the weighted (masked) tokens of the MIM head's (B, K, vocab) logits:
  cross-entropy, argmax hits and the token count (weights 0 for padding slots)."""
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return dict(
    loss_sum=jnp.sum(ce * weights), correct=jnp.sum(correct * weights), count=jnp.sum(weights)
  )


def masked_token_loss(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
  """(mean cross-entropy, accuracy) over the masked tokens of the batch: unilm's
  `nn.CrossEntropyLoss()(logits[bool_masked_pos], labels)`."""
  sums = masked_token_sums(logits, targets, weights)
  count = jnp.maximum(sums["count"], 1.0)
  return sums["loss_sum"] / count, sums["correct"] / count


def normalized_patch_pixels(images: Array, patch_size: int, eps: float = 1e-6) -> Array:
  """The pixel-regression target: each patch's pixels minus the patch mean, over the
  square root of the patch variance + `eps` (MAE's `norm_pix_loss`), in float32."""
  x = vit.patchify(jnp.asarray(images, jnp.float32), patch_size)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps)


def masked_pixel_sums(predictions: Array, targets: Array, weights: Array) -> dict[str, Array]:
  """Sums over the weighted (masked) patches of (B, K, D) pixel predictions: the per-patch
  mean squared error, that of predicting 0 (under `normalized_patch_pixels`: each patch
  as its own mean colour, the context-free baseline) and the patch count."""
  predictions = predictions.astype(jnp.float32)
  mse = jnp.mean(jnp.square(predictions - targets), axis=-1)
  zero = jnp.mean(jnp.square(targets), axis=-1)
  return dict(
    loss_sum=jnp.sum(mse * weights),
    zero_loss_sum=jnp.sum(zero * weights),
    count=jnp.sum(weights),
  )


def masked_pixel_loss(predictions: Array, targets: Array, weights: Array) -> Array:
  """Mean over the masked patches of the per-patch mean squared error (the L2 loss of
  the paper's pixel-regression ablation, Table 4)."""
  sums = masked_pixel_sums(predictions, targets, weights)
  return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)


def classification_sums(logits: Array, labels: Array, valid: Array) -> dict[str, Array]:
  """Sums over the valid rows of a padded batch: cross-entropy, top-1 and top-5 hits, and
  the row count."""
  logits = logits.astype(jnp.float32)
  w = valid.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  hits = top == labels[:, None]
  return dict(
    loss_sum=jnp.sum(ce * w),
    top1=jnp.sum(hits[:, 0] * w),
    top5=jnp.sum(jnp.any(hits, axis=1) * w),
    count=jnp.sum(w),
  )
