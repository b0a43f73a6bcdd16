"""The codebook of a discrete tokenizer: usage statistics, a diversity term, k-means.

Pure functions over code logits, token histograms and feature vectors (no model): the
`dvae` task reports `codebook_stats` at every log step and at eval; `diversity_loss` is
the optional term of `dvae.elbo_loss` that keeps a batch's codes spread over the
codebook; `kmeans` clusters encoder features for `dvae.kmeans_logits_init`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def codebook_stats(token_counts: Array) -> dict[str, Array]:
  """Codebook usage statistics from a token histogram.

  Args:
    token_counts: (V,) counts of each code.

  Returns:
    dict with ``perplexity`` = exp(entropy of the normalised histogram) (1 when one code is
    used, V when all are used equally) and ``usage`` = fraction of codes with count > 0;
    float32 scalars.
  """
  counts = jnp.asarray(token_counts, jnp.float32)
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"perplexity": jnp.exp(entropy), "usage": jnp.mean((counts > 0).astype(jnp.float32))}


def diversity_loss(logits: Array) -> Array:
  """1 - H(q̄) / log V, q̄ = softmax(logits) averaged over every position of the batch.

  Args:
    logits: (..., V) logits.

  Returns:
    float32 scalar in [0, 1]: 0 when the mean distribution is uniform over the V codes,
    1 when all its mass is on one code.
  """
  vocab = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(-1, vocab)
  mean = jnp.mean(probs, axis=0)
  entropy = -jnp.sum(mean * jnp.log(jnp.maximum(mean, 1e-30)))
  return 1.0 - entropy / math.log(vocab)


def kmeans(rng: Array, points: Array, k: int, iters: int = 20) -> tuple[Array, Array]:
  """Lloyd's k-means of `points` (N, D) into `k` centroids (k, D), float32.

  Seeded by k-means++ (each next centroid drawn with probability proportional to the
  squared distance to the nearest one so far); a centroid left without points is moved
  to a point far from its centroid, so none stays empty when N >= k.

  Returns:
    (centroids (k, D), the mean squared distance of each point to its nearest centroid).
  """
  points = points.astype(jnp.float32)
  n = points.shape[0]
  first_rng, seed_rng = jax.random.split(rng)
  first = points[jax.random.randint(first_rng, (), 0, n)]

  def seed(i, carry):
    c, nearest = carry
    p = nearest + 1e-12  # All-zero distances (N < k) fall back to a uniform draw.
    pick = points[jax.random.choice(jax.random.fold_in(seed_rng, i), n, p=p / jnp.sum(p))]
    c = c.at[i].set(pick)
    return c, jnp.minimum(nearest, jnp.sum((points - pick) ** 2, axis=1))

  start = jnp.zeros((k, points.shape[1]), jnp.float32).at[0].set(first)
  centroids, _ = jax.lax.fori_loop(1, k, seed, (start, jnp.sum((points - first) ** 2, axis=1)))

  def sq_dist(c):
    return (
      jnp.sum(points**2, axis=1, keepdims=True)
      - 2.0 * points @ c.T
      + jnp.sum(c**2, axis=1)[None, :]
    )

  def step(_, c):
    d = sq_dist(c)
    nearest = jnp.argmin(d, axis=1)
    onehot = jax.nn.one_hot(nearest, k, dtype=jnp.float32)
    counts = jnp.sum(onehot, axis=0)
    means = (onehot.T @ points) / jnp.maximum(counts, 1.0)[:, None]
    # Empty clusters take the points farthest from their centroids, one each.
    far = jnp.argsort(-jnp.min(d, axis=1))[:k]
    empty_rank = jnp.cumsum(counts == 0) - 1
    reseed = points[far[jnp.clip(empty_rank, 0, k - 1)]]
    return jnp.where((counts == 0)[:, None], reseed, means)

  centroids = jax.lax.fori_loop(0, iters, step, centroids)
  return centroids, jnp.mean(jnp.maximum(jnp.min(sq_dist(centroids), axis=1), 0.0))
