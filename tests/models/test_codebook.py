"""Tests for beit_jax.models.codebook: usage statistics, the diversity term, k-means."""

import jax
import jax.numpy as jnp
import numpy as np

from beit_jax.models import codebook
from tests.models.test_dvae import _key, _randn


def test_codebook_stats():
  codebook_stats = jax.jit(codebook.codebook_stats)
  uniform = codebook_stats(jnp.full((16,), 3, jnp.int32))
  np.testing.assert_allclose(uniform["perplexity"], 16.0, rtol=1e-5)
  np.testing.assert_allclose(uniform["usage"], 1.0)
  single = codebook_stats(jnp.array([0, 9, 0, 0], jnp.int32))
  np.testing.assert_allclose(single["perplexity"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(single["usage"], 0.25)
  half = codebook_stats(jnp.array([5, 5, 0, 0, 0, 0, 0, 0]))
  np.testing.assert_allclose(half["perplexity"], 2.0, rtol=1e-5)
  np.testing.assert_allclose(half["usage"], 0.25)
  empty = codebook_stats(jnp.zeros((4,), jnp.int32))
  assert np.isfinite(empty["perplexity"])


def test_diversity_loss_literal_values():
  vocab = 8
  uniform = jnp.zeros((2, 3, 3, vocab))
  np.testing.assert_allclose(codebook.diversity_loss(uniform), 0.0, atol=1e-6)
  one_code = jnp.zeros((2, 3, 3, vocab)).at[..., 5].set(50.0)
  np.testing.assert_allclose(codebook.diversity_loss(one_code), 1.0, atol=1e-6)
  # Half the positions on code 0, half on code 1 (hard): H = log 2, so 1 - log2/log8 = 2/3.
  two = jnp.zeros((4, vocab)).at[:2, 0].set(50.0).at[2:, 1].set(50.0)
  np.testing.assert_allclose(codebook.diversity_loss(two), 2 / 3, rtol=1e-5)
  # Against numpy for arbitrary logits.
  logits = _randn((3, 2, 2, vocab), seed=4, scale=2.0)
  p = np.exp(np.asarray(logits, np.float64))
  p = (p / p.sum(-1, keepdims=True)).reshape(-1, vocab).mean(0)
  np.testing.assert_allclose(
    codebook.diversity_loss(logits), 1 + np.sum(p * np.log(p)) / np.log(vocab), rtol=1e-5
  )


def test_kmeans_finds_separated_clusters_and_leaves_none_empty():
  rng = np.random.default_rng(0)
  centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
  points = np.concatenate([c + 0.1 * rng.normal(size=(50, 2)) for c in centres])
  found, spread = jax.jit(codebook.kmeans, static_argnums=2)(_key(0), jnp.asarray(points), 4)
  found = np.asarray(found)
  # Each true centre has exactly one centroid next to it (order is arbitrary).
  nearest = np.argmin(((centres[:, None] - found[None]) ** 2).sum(-1), axis=1)
  assert sorted(nearest) == [0, 1, 2, 3]
  np.testing.assert_allclose(found[nearest], centres, atol=0.05)
  assert float(spread) < 0.05  # ~ 2 * 0.1^2.
  # More centroids than distinct clusters: every centroid still owns a point.
  many, _ = jax.jit(codebook.kmeans, static_argnums=2)(_key(1), jnp.asarray(points), 32)
  owner = np.argmin(((points[:, None] - np.asarray(many)[None]) ** 2).sum(-1), axis=1)
  assert len(np.unique(owner)) == 32
