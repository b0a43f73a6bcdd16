"""BEiT v2's vector quantiser: l2-normalised codes, nearest code by cosine, EMA codebook.

unilm `beit2/norm_ema_quantizer.py` (`NormEMAVectorQuantizer`, `EmbeddingEMA`, `kmeans`)
as pure functions over arrays: the codebook is state, not a parameter (no gradient reaches
it); the VQ-KD task keeps it and the usage statistic next to the params and updates them
with `ema_update` inside its jitted step.

- `quantize`: the encoder's features (..., D) are l2-normalised, each takes its nearest
  code (squared distance, as unilm computes it: for unit vectors the largest cosine), the
  loss is ``beta * mean((sg(z_q) - z)^2)`` (unilm: beta 1.0) and the returned codes carry
  the straight-through gradient ``z + sg(z_q - z)``.
- `ema_update`: the code counts and per-code sums of the batch, the mean of the features
  that chose a code, l2-normalised, moved into the code by an EMA (decay 0.99) and the
  result l2-normalised again; a code no feature chose keeps its vector. unilm all-reduces
  the counts and sums over the processes (`distributed.all_reduce`); under `jax.jit` on a
  batch sharded over the mesh the sums here are over the global batch already, so every
  device holds the same codebook (a per-device update would let them drift apart).
- `usage_ema`: unilm's `cluster_size` statistic (EMA of the counts, in train and eval).
- `kmeans_cosine`: unilm's codebook initialisation on the first batch (random samples as
  the start, 10 rounds of spherical k-means; an empty cluster keeps its mean).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

L2_EPS = 1e-12  # torch.nn.functional.normalize's eps.


def l2norm(x: Array) -> Array:
  """``x / max(||x||, 1e-12)`` over the last axis (`F.normalize(x, p=2, dim=-1)`)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, L2_EPS)


def nearest_code(z: Array, codebook: Array) -> Array:
  """Index of the nearest code of each row of ``z`` (N, D) in ``codebook`` (K, D), by
  unilm's ``|z|^2 + |e|^2 - 2 z.e`` (the first of equals on a tie, as torch.argmin)."""
  d = (
    jnp.sum(jnp.square(z), axis=1, keepdims=True)
    + jnp.sum(jnp.square(codebook), axis=1)[None, :]
    - 2.0 * jnp.einsum("bd,nd->bn", z, codebook)
  )
  return jnp.argmin(d, axis=1)


def quantize(z: Array, codebook: Array, beta: float = 1.0) -> tuple[Array, Array, Array]:
  """Quantises the features ``z`` (..., D), float32.

  Returns:
    ``(z_q, indices, loss)``: ``z_q`` (..., D) the chosen codes with the straight-through
    gradient to the l2-normalised ``z``; ``indices`` (...) int32; ``loss`` the scalar
    ``beta * mean((sg(z_q) - l2norm(z))^2)`` (its gradient reaches the encoder only).
  """
  z = l2norm(z.astype(jnp.float32))
  flat = z.reshape(-1, z.shape[-1])
  indices = nearest_code(flat, codebook).astype(jnp.int32)
  z_q = jnp.take(codebook, indices, axis=0).reshape(z.shape)
  loss = beta * jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
  z_q = z + jax.lax.stop_gradient(z_q - z)
  return z_q, indices.reshape(z.shape[:-1]), loss


def code_counts(indices: Array, num_codes: int) -> Array:
  """(K,) float32 counts of each code in ``indices`` (any shape)."""
  return jnp.zeros((num_codes,), jnp.float32).at[indices.reshape(-1)].add(1.0)


def usage_ema(cluster_size: Array, indices: Array, decay: float) -> Array:
  """unilm's ``cluster_size`` statistic: ``decay * cluster_size + (1 - decay) * counts``."""
  return cluster_size * decay + code_counts(indices, cluster_size.shape[0]) * (1.0 - decay)


def ema_update(codebook: Array, z: Array, indices: Array, decay: float) -> Array:
  """The codebook after one training batch (`NormEMAVectorQuantizer.forward`, training).

  Args:
    codebook: (K, D) unit rows.
    z: (..., D) the batch's l2-normalised features (the ones `quantize` compared).
    indices: (...) the codes they chose.
    decay: the EMA decay (unilm: 0.99).

  Returns:
    (K, D): ``l2norm(decay * e + (1 - decay) * l2norm(sum_z / count))`` for every code
    chosen at least once, the old row for the others.
  """
  num_codes, dim = codebook.shape
  flat = jax.lax.stop_gradient(z).reshape(-1, dim).astype(jnp.float32)
  idx = indices.reshape(-1)
  bins = code_counts(idx, num_codes)
  sums = jnp.zeros((num_codes, dim), jnp.float32).at[idx].add(flat)
  unused = bins == 0
  means = l2norm(sums / jnp.where(unused, 1.0, bins)[:, None])
  means = jnp.where(unused[:, None], codebook, means)
  return l2norm(codebook * decay + means * (1.0 - decay))


def sample_vectors(rng: Array, samples: Array, num: int) -> Array:
  """``num`` rows of ``samples``: distinct ones (a random permutation's first) when there are
  enough, else drawn with replacement (unilm's `sample_vectors`)."""
  n = samples.shape[0]
  if n >= num:
    rows = jax.random.permutation(rng, n)[:num]
  else:
    rows = jax.random.randint(rng, (num,), 0, n)
  return samples[rows]


def kmeans_cosine_rounds(samples: Array, means: Array, iters: int = 10) -> tuple[Array, Array]:
  """``iters`` rounds of unilm's spherical k-means from ``means`` (K, D).

  Each round: every sample joins the mean of largest dot product; each mean becomes the
  l2-normalised sum of its samples; a mean left without samples stays.

  Returns:
    ``(means (K, D), bins (K,) int32)``: the bins are the last round's assignment counts
    (taken before its update), as unilm returns them.
  """
  samples = samples.astype(jnp.float32)
  k = means.shape[0]

  def round_(_, carry):
    means, _ = carry
    buckets = jnp.argmax(samples @ means.T, axis=1)
    bins = jnp.zeros((k,), jnp.int32).at[buckets].add(1)
    sums = jnp.zeros_like(means).at[buckets].add(samples)
    new = l2norm(sums / jnp.maximum(bins, 1)[:, None].astype(jnp.float32))
    return jnp.where((bins == 0)[:, None], means, new), bins

  return jax.lax.fori_loop(
    0, iters, round_, (means.astype(jnp.float32), jnp.zeros((k,), jnp.int32))
  )


def kmeans_cosine(
  rng: Array, samples: Array, num_codes: int, iters: int = 10
) -> tuple[Array, Array]:
  """unilm's codebook initialisation (`EmbeddingEMA.init_embed_`): ``num_codes`` samples as
  the start, then `kmeans_cosine_rounds`. ``samples`` (N, D) are l2-normalised features."""
  start = sample_vectors(rng, samples.astype(jnp.float32), num_codes)
  return kmeans_cosine_rounds(samples, start, iters)
