"""beit_jax.models.vector_quantizer against the literal PyTorch transcription of unilm's
`norm_ema_quantizer.py` (tests/models/torch_norm_ema_quantizer.py): the codes, the loss and
the straight-through gradient, the EMA codebook update with unused codes, the usage
statistic, spherical k-means; and the update under jit on a batch sharded over 8 devices
equal to the one-device update."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from beit_jax.models import vector_quantizer as vq
from beit_jax.training import mesh as mesh_lib
from tests.models import torch_norm_ema_quantizer as ref


def _unit(rng, *shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _features(seed=0, batch=2, dim=8, grid=3):
  """(B, h, w, D) features (channels last, ours) and the (B, D, h, w) copy unilm takes."""
  z = np.random.default_rng(seed).normal(size=(batch, grid, grid, dim)).astype(np.float32)
  return z, np.ascontiguousarray(z.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("train", [False, True])
def test_forward_and_update_equal_unilm(train):
  # 64 codes for 18 positions: most codes go unused, exercising unilm's zero mask.
  codebook = _unit(np.random.default_rng(1), 64, 8)
  z, z_torch = _features()
  torch_vq = ref.NormEMAVectorQuantizer(torch.from_numpy(codebook), beta=1.0, decay=0.99)
  torch_vq.train(train)
  zq_t, loss_t, idx_t = torch_vq(torch.from_numpy(z_torch))

  z_q, idx, loss = vq.quantize(jnp.asarray(z), jnp.asarray(codebook), beta=1.0)
  np.testing.assert_array_equal(np.asarray(idx).reshape(-1), idx_t.numpy())
  assert len(np.unique(idx)) > 3  # not one code for everything
  np.testing.assert_allclose(np.asarray(z_q), zq_t.permute(0, 2, 3, 1).numpy(), atol=1e-6)
  np.testing.assert_allclose(float(loss), float(loss_t), rtol=1e-5)

  stats = vq.usage_ema(jnp.zeros(64), idx, 0.99)
  np.testing.assert_allclose(np.asarray(stats), torch_vq.cluster_size.numpy(), atol=1e-7)
  if train:
    new = vq.ema_update(jnp.asarray(codebook), vq.l2norm(jnp.asarray(z)), idx, 0.99)
    np.testing.assert_allclose(np.asarray(new), torch_vq.weight.detach().numpy(), atol=1e-6)
    used = np.zeros(64, bool)
    used[np.asarray(idx).reshape(-1)] = True
    # unused: kept (up to the final renormalisation, which unilm applies to every row)
    np.testing.assert_allclose(np.asarray(new)[~used], codebook[~used], atol=1e-6)
    assert np.abs(np.asarray(new)[used] - codebook[used]).max() > 1e-4  # used: moved
    np.testing.assert_allclose(np.linalg.norm(np.asarray(new), axis=1), 1.0, atol=1e-6)
  else:
    np.testing.assert_array_equal(torch_vq.weight.detach().numpy(), codebook)


def test_straight_through_gradient_equals_unilm():
  """d/dz of (loss + <w, z_q>): the commitment term's gradient plus w carried straight
  through the code lookup and the l2 normalisation to the raw features."""
  codebook = _unit(np.random.default_rng(2), 16, 8)
  z, z_torch = _features(seed=3)
  w = np.random.default_rng(4).normal(size=z.shape).astype(np.float32)

  def objective(z):
    z_q, _, loss = vq.quantize(z, jnp.asarray(codebook))
    return loss + jnp.sum(z_q * w)

  grad = jax.grad(objective)(jnp.asarray(z))
  zt = torch.from_numpy(z_torch).requires_grad_(True)
  torch_vq = ref.NormEMAVectorQuantizer(torch.from_numpy(codebook)).eval()
  zq_t, loss_t, _ = torch_vq(zt)
  (loss_t + (zq_t * torch.from_numpy(w).permute(0, 3, 1, 2)).sum()).backward()
  np.testing.assert_allclose(
    np.asarray(grad), zt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6
  )
  # Without the commitment term the gradient is exactly that of <w, l2norm(z)>.
  plain = jax.grad(lambda z: jnp.sum(vq.quantize(z, jnp.asarray(codebook))[0] * w))(z)
  want = jax.grad(lambda z: jnp.sum(vq.l2norm(z) * w))(z)
  np.testing.assert_allclose(np.asarray(plain), np.asarray(want), atol=1e-6)


def test_codebook_gets_no_gradient():
  codebook = jnp.asarray(_unit(np.random.default_rng(5), 16, 8))
  z, _ = _features(seed=6)
  g = jax.grad(lambda e: jnp.sum(vq.quantize(jnp.asarray(z), e)[0]) + vq.quantize(z, e)[2])(
    codebook
  )
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_nearest_code_is_the_largest_cosine():
  rng = np.random.default_rng(7)
  codebook, z = _unit(rng, 32, 6), _unit(rng, 50, 6)
  idx = np.asarray(vq.nearest_code(jnp.asarray(z), jnp.asarray(codebook)))
  np.testing.assert_array_equal(idx, np.argmax(z @ codebook.T, axis=1))


def test_kmeans_rounds_equal_unilm_with_an_empty_cluster():
  rng = np.random.default_rng(8)
  samples = _unit(rng, 200, 8)
  start = samples[:10].copy()
  start[9] = start[8]  # A duplicate: argmax takes the first, so cluster 9 stays empty.
  means, bins = vq.kmeans_cosine_rounds(jnp.asarray(samples), jnp.asarray(start), iters=10)
  want_means, want_bins = ref.kmeans(torch.from_numpy(samples), torch.from_numpy(start), 10)
  np.testing.assert_array_equal(np.asarray(bins), want_bins.numpy())
  np.testing.assert_allclose(np.asarray(means), want_means.numpy(), atol=1e-6)
  assert int(bins.sum()) == 200
  one_means, one_bins = vq.kmeans_cosine_rounds(jnp.asarray(samples), jnp.asarray(start), 1)
  assert int(one_bins[9]) == 0 and int(one_bins[8]) > 0  # the empty one keeps its mean
  np.testing.assert_array_equal(np.asarray(one_means)[9], start[9])
  assert not np.allclose(np.asarray(one_means)[8], start[8])

  # The clustering improved on its random start: mean cosine to the assigned centre.
  def fit(c):
    return float(np.mean(np.max(samples @ np.asarray(c).T, axis=1)))

  assert fit(means) > fit(start) + 0.05


def test_kmeans_cosine_starts_from_distinct_samples():
  rng = np.random.default_rng(9)
  samples = _unit(rng, 40, 4)
  start = np.asarray(vq.sample_vectors(jax.random.PRNGKey(0), jnp.asarray(samples), 40))
  assert sorted(map(tuple, start)) == sorted(map(tuple, samples))  # a permutation
  few = np.asarray(vq.sample_vectors(jax.random.PRNGKey(0), jnp.asarray(samples[:5]), 12))
  assert few.shape == (12, 4) and all((few[i] == samples[:5]).all(1).any() for i in range(12))
  means, bins = vq.kmeans_cosine(jax.random.PRNGKey(1), jnp.asarray(samples), 8)
  assert means.shape == (8, 4) and int(bins.sum()) == 40
  np.testing.assert_allclose(np.linalg.norm(np.asarray(means), axis=1), 1.0, atol=1e-6)


def test_update_on_8_device_mesh_equals_one_device():
  """The counts and sums are the global batch's under jit on a sharded batch (unilm's
  all_reduce): the same codebook as one device; a sub-batch's update would differ."""
  assert jax.device_count() == 8  # tests/conftest.py sets the fake CPU devices.
  codebook = jnp.asarray(_unit(np.random.default_rng(10), 32, 8))
  z, _ = _features(seed=11, batch=8, grid=2)

  def step(codebook, z):
    _, idx, _ = vq.quantize(z, codebook)
    return vq.ema_update(codebook, vq.l2norm(z), idx, 0.99), vq.usage_ema(jnp.zeros(32), idx, 0.99)

  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
  batch_sh, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  z_sh = mesh_lib.global_batch({"z": z}, batch_sh)["z"]
  assert z_sh.addressable_shards[0].data.shape[0] == 1
  sharded = jax.jit(step, out_shardings=(repl, repl))(jax.device_put(codebook, repl), z_sh)
  one = jax.devices()[0]
  single = jax.jit(step)(jax.device_put(codebook, one), jax.device_put(z, one))
  for a, b in zip(sharded, single):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  part = jax.jit(step)(codebook, jnp.asarray(z[:1]))
  assert np.abs(np.asarray(part[0]) - np.asarray(single[0])).max() > 1e-4
