"""Tests for beit_jax.models.dvae_compact: parameter tree, residual block, sizes, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from beit_jax.models import dvae, dvae_compact
from tests.models.test_conv import _np_conv, _torch_state_dict
from tests.models.test_dvae import _apply, _key, _params, _randn, _tiny_compact, param_listing

# `dvae.from_config(TREE_CONFIGS[k])`'s parameters (path, shape), written down with
# the code before it was split into modules.
TREE_CONFIGS = {
  "logit_laplace": dict(
    arch="compact",
    vocab_size=32,
    recon_loss="logit_laplace",
    input_norm="dall_e",
    num_layers=2,
    hidden=16,
    num_resblocks=2,
    codebook_dim=8,
  ),
  "mse": dict(
    arch="compact",
    vocab_size=32,
    recon_loss="mse",
    input_norm="half",
    num_layers=1,
    hidden=8,
    num_resblocks=0,
    codebook_dim=8,
  ),
}
TREES = {
  "logit_laplace": """
decoder/codebook 32x8
decoder/input/b 16
decoder/input/w 1x1x8x16
decoder/output/b 6
decoder/output/w 1x1x16x6
decoder/res_1/conv_1/b 16
decoder/res_1/conv_1/w 3x3x16x16
decoder/res_1/conv_2/b 16
decoder/res_1/conv_2/w 3x3x16x16
decoder/res_1/conv_3/b 16
decoder/res_1/conv_3/w 1x1x16x16
decoder/res_2/conv_1/b 16
decoder/res_2/conv_1/w 3x3x16x16
decoder/res_2/conv_2/b 16
decoder/res_2/conv_2/w 3x3x16x16
decoder/res_2/conv_3/b 16
decoder/res_2/conv_3/w 1x1x16x16
decoder/up_1/b 16
decoder/up_1/w 4x4x16x16
decoder/up_2/b 16
decoder/up_2/w 4x4x16x16
encoder/down_1/b 16
encoder/down_1/w 4x4x3x16
encoder/down_2/b 16
encoder/down_2/w 4x4x16x16
encoder/output/b 32
encoder/output/w 1x1x16x32
encoder/res_1/conv_1/b 16
encoder/res_1/conv_1/w 3x3x16x16
encoder/res_1/conv_2/b 16
encoder/res_1/conv_2/w 3x3x16x16
encoder/res_1/conv_3/b 16
encoder/res_1/conv_3/w 1x1x16x16
encoder/res_2/conv_1/b 16
encoder/res_2/conv_1/w 3x3x16x16
encoder/res_2/conv_2/b 16
encoder/res_2/conv_2/w 3x3x16x16
encoder/res_2/conv_3/b 16
encoder/res_2/conv_3/w 1x1x16x16
""",
  "mse": """
decoder/codebook 32x8
decoder/input/b 8
decoder/input/w 1x1x8x8
decoder/output/b 3
decoder/output/w 1x1x8x3
decoder/up_1/b 8
decoder/up_1/w 4x4x8x8
encoder/down_1/b 8
encoder/down_1/w 4x4x3x8
encoder/output/b 32
encoder/output/w 1x1x8x32
""",
}


@pytest.mark.parametrize("loss", ["logit_laplace", "mse"])
def test_param_tree_is_unchanged(loss):
  assert param_listing(dvae.from_config(TREE_CONFIGS[loss])) == TREES[loss].strip()
  cfg = {k: v for k, v in TREE_CONFIGS[loss].items() if k != "arch"}
  assert param_listing(dvae.compact_dvae(**cfg)) == TREES[loss].strip()


def test_num_layers_must_be_positive():
  with pytest.raises(ValueError, match="num_layers must be >= 1"):
    dvae_compact.CompactEncoder(0, 8, 0, 16)
  with pytest.raises(ValueError, match="num_layers must be >= 1"):
    dvae_compact.CompactDecoder(0, 8, 0, 16, 8, 3)


def test_compact_res_block_matches_numpy():
  block = dvae_compact.CompactResBlock(6)
  x = _randn((1, 4, 5, 6))
  variables = _params(block, x, bias_std=0.1)
  sd = {"r." + k: v for k, v in _torch_state_dict(variables["params"]).items()}
  xn = np.asarray(x, np.float64).transpose(0, 3, 1, 2)
  h = _np_conv(xn, sd, "r.conv_1")
  h = _np_conv(np.maximum(h, 0), sd, "r.conv_2")
  h = _np_conv(np.maximum(h, 0), sd, "r.conv_3")
  np.testing.assert_allclose(
    _apply(block, variables, x), (xn + h).transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5
  )


@pytest.mark.parametrize("num_layers,grid", [(1, (7, 7)), (2, (7, 5)), (3, (3, 7))])
def test_compact_output_sizes_odd_grids(num_layers, grid):
  model = _tiny_compact(num_layers=num_layers, recon_loss="logit_laplace")
  d = 2**num_layers
  assert model.downsample == d
  images = jnp.full((2, grid[0] * d, grid[1] * d, 3), 0.3)
  variables = _params(model, images)
  res = _apply(model, variables, images, rng=_key(0), tau=1.0)
  assert res["logits"].shape == (2, *grid, 32)
  assert res["out"].shape == (2, grid[0] * d, grid[1] * d, 6)
  codes = jax.nn.one_hot(jnp.ones((1, *grid), jnp.int32), 32)
  out = _apply(model, variables, codes, method="decode_codes")
  assert out.shape == (1, grid[0] * d, grid[1] * d, 6)
  p = variables["params"]
  assert p["decoder"]["codebook"].shape == (32, 16)
  assert set(p["encoder"]) == ({f"down_{i + 1}" for i in range(num_layers)} | {"res_1", "output"})


def test_compact_mse_has_3_channels_and_floors_odd_inputs():
  model = _tiny_compact()
  images = jnp.full((1, 15, 17, 3), 0.5)
  variables = _params(model, jnp.zeros((1, 8, 8, 3)))
  logits = _apply(model, variables, images, method="encode")
  assert logits.shape == (1, 3, 4, 32)
  out = _apply(model, variables, jax.nn.softmax(logits), method="decode_codes")
  assert out.shape == (1, 12, 16, 3)


# ----------------------------------------------------------------------------
# Training signal.
# ----------------------------------------------------------------------------


def _smooth_images(n, size, seed=0):
  """Random low-frequency RGB images in [0, 1]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
  out = np.zeros((n, size, size, 3), np.float32)
  for i in range(n):
    for c in range(3):
      a, b, p, q = rng.uniform(0.5, 2.5, 4)
      wave = np.sin(2 * np.pi * (a * yy + b * xx) + p)
      out[i, :, :, c] = 0.5 + 0.4 * wave * q / 2.5
  return np.clip(out, 0, 1)


def test_tiny_compact_dvae_overfits():
  model = _tiny_compact(vocab_size=64, hidden=32, num_resblocks=0)
  images = jnp.asarray(_smooth_images(4, 16))
  variables = _params(model, images)
  tx = optax.adam(5e-3)
  opt_state = tx.init(variables)

  def step(variables, opt_state, rng):
    (loss, aux), grads = jax.value_and_grad(
      lambda v: dvae.elbo_loss(model, v, images, rng, 1.0, 0.1, False), has_aux=True
    )(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss, aux

  step = jax.jit(step)
  losses = []
  for i in range(100):
    variables, opt_state, loss, aux = step(variables, opt_state, _key(i))
    losses.append(float(loss))
  first, last = np.mean(losses[:3]), np.mean(losses[-5:])
  assert np.isfinite(losses).all()
  assert last < 0.25 * first, (first, last)
  assert float(aux["psnr"]) > 25.0
