"""Tests for beit_jax.training.losses against timm's losses and direct formulas."""

import jax.numpy as jnp
import numpy as np
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from beit_jax.data import mixup
from beit_jax.training import losses


def _log_softmax(z: np.ndarray) -> np.ndarray:
  z = z.astype(np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# ----------------------------------------------------------------------------
# Fine-tuning losses (timm's SoftTargetCrossEntropy / LabelSmoothingCrossEntropy).
# ----------------------------------------------------------------------------


def test_losses_match_timm():
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(9, 11)) * 3).astype(np.float32)
  labels = rng.integers(0, 11, size=9)
  targets = np.array(mixup.mix_targets(labels, 11, np.float32(0.37), 0.1))
  want = SoftTargetCrossEntropy()(torch.from_numpy(logits), torch.from_numpy(targets)).item()
  got = float(losses.soft_target_cross_entropy(logits, targets))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for s in (0.0, 0.1, 0.3):
    want = LabelSmoothingCrossEntropy(s)(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    got = float(losses.label_smoothing_cross_entropy(logits, labels, s))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # bfloat16 logits are upcast.
  got = losses.label_smoothing_cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels, 0.1)
  assert got.dtype == jnp.float32


def test_losses_with_valid_mask_ignore_padding():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(8, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=8)
  valid = np.array([1, 1, 0, 1, 1, 1, 0, 0], np.float32)
  keep = valid > 0
  padded_logits = logits.copy()
  padded_logits[~keep] = np.nan  # Padding must not poison the loss.
  padded_labels = np.where(keep, labels, -1)
  want = LabelSmoothingCrossEntropy(0.1)(
    torch.from_numpy(logits[keep]), torch.from_numpy(labels[keep])
  ).item()
  got = float(
    losses.label_smoothing_cross_entropy(padded_logits, padded_labels, 0.1, weights=valid)
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)
  targets = np.array(mixup.mix_targets(labels, 5, 1.0, 0.1))
  want = SoftTargetCrossEntropy()(
    torch.from_numpy(logits[keep]), torch.from_numpy(targets[keep])
  ).item()
  got = float(losses.soft_target_cross_entropy(padded_logits, targets, valid))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(losses.soft_target_cross_entropy(logits, targets, np.zeros(8))) == 0.0


# ----------------------------------------------------------------------------
# Masked image modelling.
# ----------------------------------------------------------------------------


def test_masked_token_loss_is_mean_over_weighted_tokens():
  rng = np.random.default_rng(2)
  b, k, vocab = 2, 6, 7
  logits = (rng.normal(size=(b, k, vocab)) * 2).astype(np.float32)
  targets = rng.integers(0, vocab, size=(b, k))
  weights = np.array([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 1]], np.float32)
  # Of the six masked tokens three are right (argmax == target) and three wrong.
  for (i, j), right in zip(
    [(0, 0), (0, 2), (0, 3), (1, 1), (1, 2)], [True, True, False, True, False]
  ):
    logits[i, j] = 0.0
    hot = targets[i, j] if right else (targets[i, j] + 1) % vocab
    logits[i, j, hot] = 3.0
  # The sixth, (1, 5): wrong.
  logits[1, 5] = 0.0
  logits[1, 5, (targets[1, 5] + 2) % vocab] = 1.0
  # Unmasked slots do not count, however large their loss.
  logits[0, 1] = 0.0
  logits[0, 1, (targets[0, 1] + 1) % vocab] = 50.0

  loss, acc = losses.masked_token_loss(
    jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights)
  )
  sel = weights > 0
  ce = -np.take_along_axis(_log_softmax(logits), targets[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(float(loss), ce[sel].mean(), rtol=1e-5)
  assert float(acc) == 3 / 6
  # unilm's nn.CrossEntropyLoss()(logits[bool_masked_pos], labels).
  want = torch.nn.functional.cross_entropy(
    torch.from_numpy(logits[sel]), torch.from_numpy(targets[sel])
  ).item()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # bf16 logits give a float32 loss.
  loss16, _ = losses.masked_token_loss(
    jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets), jnp.asarray(weights)
  )
  assert loss16.dtype == jnp.float32
  sums = losses.masked_token_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  assert float(sums["count"]) == 6 and float(sums["correct"]) == 3
  np.testing.assert_allclose(float(sums["loss_sum"]), ce[sel].sum(), rtol=1e-5)


def test_masked_token_loss_without_masked_tokens_is_zero():
  logits = jnp.ones((1, 3, 4))
  targets = jnp.zeros((1, 3), jnp.int32)
  loss, acc = losses.masked_token_loss(logits, targets, jnp.zeros((1, 3)))
  assert float(loss) == 0.0 and float(acc) == 0.0


# ----------------------------------------------------------------------------
# Classification metrics.
# ----------------------------------------------------------------------------


def test_classification_sums_top1_top5_and_padding():
  # Logits of classes 0..6 per row, the label, and whether the row is real (not padding).
  rows = [
    ([6, 5, 4, 3, 2, 1, 0], 0, True),  # label ranked 1st: top-1 and top-5.
    ([6, 5, 4, 3, 2, 1, 0], 4, True),  # label ranked 5th: top-5 only.
    ([6, 5, 4, 3, 2, 1, 0], 5, True),  # label ranked 6th: neither.
    ([0, 1, 2, 3, 4, 5, 6], 6, True),  # label ranked 1st.
    ([0, 1, 2, 3, 4, 5, 6], 6, False),  # padding: would be a hit, not counted.
    ([0, 1, 2, 3, 4, 5, 6], 0, False),  # padding.
  ]
  logits = np.array([r[0] for r in rows], np.float32)
  labels = np.array([r[1] for r in rows], np.int32)
  valid = np.array([r[2] for r in rows])
  sums = losses.classification_sums(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid))
  assert float(sums["count"]) == 4
  assert float(sums["top1"]) == 2
  assert float(sums["top5"]) == 3
  ce = -_log_softmax(logits)[np.arange(len(rows)), labels]
  np.testing.assert_allclose(float(sums["loss_sum"]), ce[valid].sum(), rtol=1e-5)
  # Fewer than 5 classes: top-5 is every class.
  sums = losses.classification_sums(jnp.zeros((2, 3)), jnp.array([2, 1]), jnp.array([True, True]))
  assert float(sums["top5"]) == 2 and float(sums["count"]) == 2
