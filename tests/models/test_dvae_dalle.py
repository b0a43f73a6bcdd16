"""Tests for beit_jax.models.dvae_dalle: DALL-E's parameter tree, numpy forward, shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beit_jax.models import conv, dvae, dvae_dalle
from tests.models.test_conv import _np_conv, _torch_state_dict
from tests.models.test_dvae import (
  _apply,
  _count,
  _flat,
  _init,
  _key,
  _params,
  _rand,
  _randn,
  _tiny_dalle,
  param_listing,
)

# Exact parameter counts of the default DALL-E dVAE (n_hid 256, 2 blocks per
# group, vocab 8192, n_init 128), counted with jax.eval_shape.
DALLE_ENCODER_PARAMS = 53_786_240
DALLE_DECODER_PARAMS = 43_829_766


# `dvae.from_config(TREE_CONFIG)`'s parameters (path, shape), written down with the
# code before it was split into modules: the DALL-E converter relies on these paths.
TREE_CONFIG = dict(
  arch="dall_e", vocab_size=16, n_hid=8, n_init=12, n_blk_per_group=2, group_count=3
)
TREE = """
decoder/blocks/group_1/block_1/id_path/b 64
decoder/blocks/group_1/block_1/id_path/w 1x1x12x64
decoder/blocks/group_1/block_1/res_path/conv_1/b 16
decoder/blocks/group_1/block_1/res_path/conv_1/w 1x1x12x16
decoder/blocks/group_1/block_1/res_path/conv_2/b 16
decoder/blocks/group_1/block_1/res_path/conv_2/w 3x3x16x16
decoder/blocks/group_1/block_1/res_path/conv_3/b 16
decoder/blocks/group_1/block_1/res_path/conv_3/w 3x3x16x16
decoder/blocks/group_1/block_1/res_path/conv_4/b 64
decoder/blocks/group_1/block_1/res_path/conv_4/w 3x3x16x64
decoder/blocks/group_1/block_2/res_path/conv_1/b 16
decoder/blocks/group_1/block_2/res_path/conv_1/w 1x1x64x16
decoder/blocks/group_1/block_2/res_path/conv_2/b 16
decoder/blocks/group_1/block_2/res_path/conv_2/w 3x3x16x16
decoder/blocks/group_1/block_2/res_path/conv_3/b 16
decoder/blocks/group_1/block_2/res_path/conv_3/w 3x3x16x16
decoder/blocks/group_1/block_2/res_path/conv_4/b 64
decoder/blocks/group_1/block_2/res_path/conv_4/w 3x3x16x64
decoder/blocks/group_2/block_1/id_path/b 32
decoder/blocks/group_2/block_1/id_path/w 1x1x64x32
decoder/blocks/group_2/block_1/res_path/conv_1/b 8
decoder/blocks/group_2/block_1/res_path/conv_1/w 1x1x64x8
decoder/blocks/group_2/block_1/res_path/conv_2/b 8
decoder/blocks/group_2/block_1/res_path/conv_2/w 3x3x8x8
decoder/blocks/group_2/block_1/res_path/conv_3/b 8
decoder/blocks/group_2/block_1/res_path/conv_3/w 3x3x8x8
decoder/blocks/group_2/block_1/res_path/conv_4/b 32
decoder/blocks/group_2/block_1/res_path/conv_4/w 3x3x8x32
decoder/blocks/group_2/block_2/res_path/conv_1/b 8
decoder/blocks/group_2/block_2/res_path/conv_1/w 1x1x32x8
decoder/blocks/group_2/block_2/res_path/conv_2/b 8
decoder/blocks/group_2/block_2/res_path/conv_2/w 3x3x8x8
decoder/blocks/group_2/block_2/res_path/conv_3/b 8
decoder/blocks/group_2/block_2/res_path/conv_3/w 3x3x8x8
decoder/blocks/group_2/block_2/res_path/conv_4/b 32
decoder/blocks/group_2/block_2/res_path/conv_4/w 3x3x8x32
decoder/blocks/group_3/block_1/id_path/b 16
decoder/blocks/group_3/block_1/id_path/w 1x1x32x16
decoder/blocks/group_3/block_1/res_path/conv_1/b 4
decoder/blocks/group_3/block_1/res_path/conv_1/w 1x1x32x4
decoder/blocks/group_3/block_1/res_path/conv_2/b 4
decoder/blocks/group_3/block_1/res_path/conv_2/w 3x3x4x4
decoder/blocks/group_3/block_1/res_path/conv_3/b 4
decoder/blocks/group_3/block_1/res_path/conv_3/w 3x3x4x4
decoder/blocks/group_3/block_1/res_path/conv_4/b 16
decoder/blocks/group_3/block_1/res_path/conv_4/w 3x3x4x16
decoder/blocks/group_3/block_2/res_path/conv_1/b 4
decoder/blocks/group_3/block_2/res_path/conv_1/w 1x1x16x4
decoder/blocks/group_3/block_2/res_path/conv_2/b 4
decoder/blocks/group_3/block_2/res_path/conv_2/w 3x3x4x4
decoder/blocks/group_3/block_2/res_path/conv_3/b 4
decoder/blocks/group_3/block_2/res_path/conv_3/w 3x3x4x4
decoder/blocks/group_3/block_2/res_path/conv_4/b 16
decoder/blocks/group_3/block_2/res_path/conv_4/w 3x3x4x16
decoder/blocks/group_4/block_1/id_path/b 8
decoder/blocks/group_4/block_1/id_path/w 1x1x16x8
decoder/blocks/group_4/block_1/res_path/conv_1/b 2
decoder/blocks/group_4/block_1/res_path/conv_1/w 1x1x16x2
decoder/blocks/group_4/block_1/res_path/conv_2/b 2
decoder/blocks/group_4/block_1/res_path/conv_2/w 3x3x2x2
decoder/blocks/group_4/block_1/res_path/conv_3/b 2
decoder/blocks/group_4/block_1/res_path/conv_3/w 3x3x2x2
decoder/blocks/group_4/block_1/res_path/conv_4/b 8
decoder/blocks/group_4/block_1/res_path/conv_4/w 3x3x2x8
decoder/blocks/group_4/block_2/res_path/conv_1/b 2
decoder/blocks/group_4/block_2/res_path/conv_1/w 1x1x8x2
decoder/blocks/group_4/block_2/res_path/conv_2/b 2
decoder/blocks/group_4/block_2/res_path/conv_2/w 3x3x2x2
decoder/blocks/group_4/block_2/res_path/conv_3/b 2
decoder/blocks/group_4/block_2/res_path/conv_3/w 3x3x2x2
decoder/blocks/group_4/block_2/res_path/conv_4/b 8
decoder/blocks/group_4/block_2/res_path/conv_4/w 3x3x2x8
decoder/blocks/input/b 12
decoder/blocks/input/w 1x1x16x12
decoder/blocks/output/conv/b 6
decoder/blocks/output/conv/w 1x1x8x6
encoder/blocks/group_1/block_1/res_path/conv_1/b 2
encoder/blocks/group_1/block_1/res_path/conv_1/w 3x3x8x2
encoder/blocks/group_1/block_1/res_path/conv_2/b 2
encoder/blocks/group_1/block_1/res_path/conv_2/w 3x3x2x2
encoder/blocks/group_1/block_1/res_path/conv_3/b 2
encoder/blocks/group_1/block_1/res_path/conv_3/w 3x3x2x2
encoder/blocks/group_1/block_1/res_path/conv_4/b 8
encoder/blocks/group_1/block_1/res_path/conv_4/w 1x1x2x8
encoder/blocks/group_1/block_2/res_path/conv_1/b 2
encoder/blocks/group_1/block_2/res_path/conv_1/w 3x3x8x2
encoder/blocks/group_1/block_2/res_path/conv_2/b 2
encoder/blocks/group_1/block_2/res_path/conv_2/w 3x3x2x2
encoder/blocks/group_1/block_2/res_path/conv_3/b 2
encoder/blocks/group_1/block_2/res_path/conv_3/w 3x3x2x2
encoder/blocks/group_1/block_2/res_path/conv_4/b 8
encoder/blocks/group_1/block_2/res_path/conv_4/w 1x1x2x8
encoder/blocks/group_2/block_1/id_path/b 16
encoder/blocks/group_2/block_1/id_path/w 1x1x8x16
encoder/blocks/group_2/block_1/res_path/conv_1/b 4
encoder/blocks/group_2/block_1/res_path/conv_1/w 3x3x8x4
encoder/blocks/group_2/block_1/res_path/conv_2/b 4
encoder/blocks/group_2/block_1/res_path/conv_2/w 3x3x4x4
encoder/blocks/group_2/block_1/res_path/conv_3/b 4
encoder/blocks/group_2/block_1/res_path/conv_3/w 3x3x4x4
encoder/blocks/group_2/block_1/res_path/conv_4/b 16
encoder/blocks/group_2/block_1/res_path/conv_4/w 1x1x4x16
encoder/blocks/group_2/block_2/res_path/conv_1/b 4
encoder/blocks/group_2/block_2/res_path/conv_1/w 3x3x16x4
encoder/blocks/group_2/block_2/res_path/conv_2/b 4
encoder/blocks/group_2/block_2/res_path/conv_2/w 3x3x4x4
encoder/blocks/group_2/block_2/res_path/conv_3/b 4
encoder/blocks/group_2/block_2/res_path/conv_3/w 3x3x4x4
encoder/blocks/group_2/block_2/res_path/conv_4/b 16
encoder/blocks/group_2/block_2/res_path/conv_4/w 1x1x4x16
encoder/blocks/group_3/block_1/id_path/b 32
encoder/blocks/group_3/block_1/id_path/w 1x1x16x32
encoder/blocks/group_3/block_1/res_path/conv_1/b 8
encoder/blocks/group_3/block_1/res_path/conv_1/w 3x3x16x8
encoder/blocks/group_3/block_1/res_path/conv_2/b 8
encoder/blocks/group_3/block_1/res_path/conv_2/w 3x3x8x8
encoder/blocks/group_3/block_1/res_path/conv_3/b 8
encoder/blocks/group_3/block_1/res_path/conv_3/w 3x3x8x8
encoder/blocks/group_3/block_1/res_path/conv_4/b 32
encoder/blocks/group_3/block_1/res_path/conv_4/w 1x1x8x32
encoder/blocks/group_3/block_2/res_path/conv_1/b 8
encoder/blocks/group_3/block_2/res_path/conv_1/w 3x3x32x8
encoder/blocks/group_3/block_2/res_path/conv_2/b 8
encoder/blocks/group_3/block_2/res_path/conv_2/w 3x3x8x8
encoder/blocks/group_3/block_2/res_path/conv_3/b 8
encoder/blocks/group_3/block_2/res_path/conv_3/w 3x3x8x8
encoder/blocks/group_3/block_2/res_path/conv_4/b 32
encoder/blocks/group_3/block_2/res_path/conv_4/w 1x1x8x32
encoder/blocks/group_4/block_1/id_path/b 64
encoder/blocks/group_4/block_1/id_path/w 1x1x32x64
encoder/blocks/group_4/block_1/res_path/conv_1/b 16
encoder/blocks/group_4/block_1/res_path/conv_1/w 3x3x32x16
encoder/blocks/group_4/block_1/res_path/conv_2/b 16
encoder/blocks/group_4/block_1/res_path/conv_2/w 3x3x16x16
encoder/blocks/group_4/block_1/res_path/conv_3/b 16
encoder/blocks/group_4/block_1/res_path/conv_3/w 3x3x16x16
encoder/blocks/group_4/block_1/res_path/conv_4/b 64
encoder/blocks/group_4/block_1/res_path/conv_4/w 1x1x16x64
encoder/blocks/group_4/block_2/res_path/conv_1/b 16
encoder/blocks/group_4/block_2/res_path/conv_1/w 3x3x64x16
encoder/blocks/group_4/block_2/res_path/conv_2/b 16
encoder/blocks/group_4/block_2/res_path/conv_2/w 3x3x16x16
encoder/blocks/group_4/block_2/res_path/conv_3/b 16
encoder/blocks/group_4/block_2/res_path/conv_3/w 3x3x16x16
encoder/blocks/group_4/block_2/res_path/conv_4/b 64
encoder/blocks/group_4/block_2/res_path/conv_4/w 1x1x16x64
encoder/blocks/input/b 8
encoder/blocks/input/w 7x7x3x8
encoder/blocks/output/conv/b 16
encoder/blocks/output/conv/w 1x1x64x16
"""


# ----------------------------------------------------------------------------
# Independent analytic parameter counts (from the DALL-E source, not the code).
# ----------------------------------------------------------------------------


def _conv(n_in, n_out, k):
  return n_in * n_out * k * k + n_out


def _analytic_encoder(n_hid=256, n_blk=2, vocab=8192, c=3):
  def block(n_in, n_out):
    h = n_out // 4
    idp = _conv(n_in, n_out, 1) if n_in != n_out else 0
    return idp + _conv(n_in, h, 3) + _conv(h, h, 3) + _conv(h, h, 3) + _conv(h, n_out, 1)

  total = _conv(c, n_hid, 7)
  widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
  for g in range(4):
    for i in range(n_blk):
      total += block(widths[g] if i == 0 else widths[g + 1], widths[g + 1])
  return total + _conv(8 * n_hid, vocab, 1)


def _analytic_decoder(n_init=128, n_hid=256, n_blk=2, vocab=8192, c=3):
  def block(n_in, n_out):
    h = n_out // 4
    idp = _conv(n_in, n_out, 1) if n_in != n_out else 0
    return idp + _conv(n_in, h, 1) + _conv(h, h, 3) + _conv(h, h, 3) + _conv(h, n_out, 3)

  total = _conv(vocab, n_init, 1)
  widths = [n_init, 8 * n_hid, 4 * n_hid, 2 * n_hid, n_hid]
  for g in range(4):
    for i in range(n_blk):
      total += block(widths[g] if i == 0 else widths[g + 1], widths[g + 1])
  return total + _conv(n_hid, 2 * c, 1)


def test_dalle_param_counts_exact():
  model = dvae.dalle_dvae()
  shapes = jax.eval_shape(lambda: _init(model, jnp.zeros((1, 16, 16, 3))))
  enc = _count(shapes["params"]["encoder"])
  dec = _count(shapes["params"]["decoder"])
  assert enc == DALLE_ENCODER_PARAMS
  assert dec == DALLE_DECODER_PARAMS
  assert enc == _analytic_encoder()
  assert dec == _analytic_decoder()
  assert set(shapes["params"]) == {"encoder", "decoder"}
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))
  # A different configuration also matches the formula.
  small = dvae.dalle_dvae(n_hid=64, n_blk_per_group=1, vocab_size=512, n_init=32)
  shapes = jax.eval_shape(lambda: _init(small, jnp.zeros((1, 16, 16, 3))))
  assert _count(shapes["params"]["encoder"]) == _analytic_encoder(64, 1, 512)
  assert _count(shapes["params"]["decoder"]) == _analytic_decoder(32, 64, 1, 512)


def test_dalle_param_tree_matches_torch_keys():
  shapes = jax.eval_shape(lambda: _init(dvae.dalle_dvae(), jnp.zeros((1, 16, 16, 3))))
  enc = _flat(shapes["params"]["encoder"])
  dec = _flat(shapes["params"]["decoder"])
  expected_enc = {
    "blocks/input/w": (7, 7, 3, 256),
    "blocks/input/b": (256,),
    "blocks/group_1/block_1/res_path/conv_1/w": (3, 3, 256, 64),
    "blocks/group_1/block_2/res_path/conv_4/w": (1, 1, 64, 256),
    "blocks/group_2/block_1/id_path/w": (1, 1, 256, 512),
    "blocks/group_2/block_1/id_path/b": (512,),
    "blocks/group_2/block_1/res_path/conv_1/w": (3, 3, 256, 128),
    "blocks/group_2/block_2/res_path/conv_1/w": (3, 3, 512, 128),
    "blocks/group_3/block_1/id_path/w": (1, 1, 512, 1024),
    "blocks/group_4/block_1/id_path/w": (1, 1, 1024, 2048),
    "blocks/group_4/block_2/res_path/conv_3/w": (3, 3, 512, 512),
    "blocks/group_4/block_2/res_path/conv_4/b": (2048,),
    "blocks/output/conv/w": (1, 1, 2048, 8192),
    "blocks/output/conv/b": (8192,),
  }
  expected_dec = {
    "blocks/input/w": (1, 1, 8192, 128),
    "blocks/group_1/block_1/id_path/w": (1, 1, 128, 2048),
    "blocks/group_1/block_1/res_path/conv_1/w": (1, 1, 128, 512),
    "blocks/group_1/block_1/res_path/conv_4/w": (3, 3, 512, 2048),
    "blocks/group_2/block_1/id_path/w": (1, 1, 2048, 1024),
    "blocks/group_4/block_2/res_path/conv_2/w": (3, 3, 64, 64),
    "blocks/output/conv/w": (1, 1, 256, 6),
    "blocks/output/conv/b": (6,),
  }
  for k, v in expected_enc.items():
    assert enc[k] == v, k
  for k, v in expected_dec.items():
    assert dec[k] == v, k
  # Identity id_paths carry no parameters, as in DALL-E.
  for key in ("blocks/group_1/block_1/id_path/w", "blocks/group_2/block_2/id_path/w"):
    assert key not in enc
  assert "blocks/group_1/block_2/id_path/w" not in dec
  # Every leaf is a DALL-E conv parameter `w` or `b`.
  assert {k.rsplit("/", 1)[1] for k in enc} == {"w", "b"}
  assert len(enc) == 2 * (1 + 8 * 4 + 3 + 1)  # convs + 3 id paths.
  # params['encoder'] is exactly a standalone DalleEncoder's tree.
  alone = jax.eval_shape(lambda: dvae_dalle.DalleEncoder().init(_key(0), jnp.zeros((1, 16, 16, 3))))
  assert _flat(alone["params"]) == enc


def test_param_tree_is_unchanged():
  assert param_listing(dvae.from_config(TREE_CONFIG)) == TREE.strip()
  assert param_listing(dvae.dalle_dvae(16, 8, 2, 3, 12)) == TREE.strip()


def test_n_hid_must_be_a_multiple_of_4():
  with pytest.raises(ValueError, match="n_hid must be a multiple of 4"):
    dvae_dalle.DalleEncoder(n_hid=10)
  with pytest.raises(ValueError, match="n_hid must be a multiple of 4"):
    dvae_dalle.DalleDecoder(n_hid=10)


# ----------------------------------------------------------------------------
# Independent numpy re-implementation of the DALL-E forward (NCHW, OIHW, torch
# key names).
# ----------------------------------------------------------------------------


def _np_block(x, sd, prefix, n_layers, kernels):
  def relu(a):
    return np.maximum(a, 0)

  idp = _np_conv(x, sd, prefix + ".id_path") if prefix + ".id_path.w" in sd else x
  h = x
  for i in range(4):
    h = _np_conv(relu(h), sd, f"{prefix}.res_path.conv_{i + 1}")
    assert sd[f"{prefix}.res_path.conv_{i + 1}.w"].shape[-1] == kernels[i]
  return idp + h / n_layers**2


def _np_encoder(x, sd, n_blk, group_count=4):
  n_layers = group_count * n_blk
  x = _np_conv(x, sd, "blocks.input")
  for g in range(1, 5):
    for i in range(1, n_blk + 1):
      x = _np_block(x, sd, f"blocks.group_{g}.block_{i}", n_layers, (3, 3, 3, 1))
    if g < 4:
      n, c, h, w = x.shape
      x = x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
  return _np_conv(np.maximum(x, 0), sd, "blocks.output.conv")


def _np_decoder(x, sd, n_blk, group_count=4):
  n_layers = group_count * n_blk
  x = _np_conv(x, sd, "blocks.input")
  for g in range(1, 5):
    for i in range(1, n_blk + 1):
      x = _np_block(x, sd, f"blocks.group_{g}.block_{i}", n_layers, (1, 3, 3, 3))
    if g < 4:
      x = x.repeat(2, axis=2).repeat(2, axis=3)
  return _np_conv(np.maximum(x, 0), sd, "blocks.output.conv")


@pytest.mark.parametrize("n_in,n_out", [(4, 8), (8, 8)])
def test_dalle_encoder_block_matches_numpy(n_in, n_out):
  block = dvae_dalle.DalleEncoderBlock(n_in, n_out, n_layers=3)
  x = _randn((2, 5, 6, n_in))
  variables = _params(block, x, bias_std=0.1)  # Non-zero biases are checked.
  assert ("id_path" in variables["params"]) == (n_in != n_out)
  got = np.asarray(_apply(block, variables, x))
  sd = {"blk." + k: v for k, v in _torch_state_dict(variables["params"]).items()}
  want = _np_block(
    np.asarray(x, np.float64).transpose(0, 3, 1, 2), sd, "blk", 3, (3, 3, 3, 1)
  ).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The residual branch is scaled by post_gain = 1/n_layers**2: with
  # n_layers=3 it is 1/9 of the unscaled (n_layers=1) residual branch.
  unscaled = dvae_dalle.DalleEncoderBlock(n_in, n_out, n_layers=1).apply(variables, x)
  identity = (
    np.asarray(x)
    if n_in == n_out
    else np.asarray(conv.Conv2d(n_out, 1).apply({"params": variables["params"]["id_path"]}, x))
  )
  np.testing.assert_allclose(got - identity, (unscaled - identity) / 9, rtol=1e-4, atol=1e-5)


def test_dalle_decoder_block_matches_numpy():
  block = dvae_dalle.DalleDecoderBlock(8, 4, n_layers=2)
  x = _randn((1, 4, 4, 8))
  variables = _params(block, x, bias_std=0.1)
  got = np.asarray(_apply(block, variables, x))
  sd = {"b." + k: v for k, v in _torch_state_dict(variables["params"]).items()}
  want = _np_block(
    np.asarray(x, np.float64).transpose(0, 3, 1, 2), sd, "b", 2, (1, 3, 3, 3)
  ).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_dalle_full_forward_matches_numpy():
  model = _tiny_dalle(n_blk_per_group=2)
  images = _rand((1, 16, 16, 3))
  variables = _params(model, images, bias_std=0.1)
  logits = np.asarray(_apply(model, variables, images, method="encode"))
  sd = _torch_state_dict(variables["params"]["encoder"])
  x = (0.8 * np.asarray(images, np.float64) + 0.1).transpose(0, 3, 1, 2)
  want = _np_encoder(x, sd, n_blk=2).transpose(0, 2, 3, 1)
  assert logits.shape == (1, 2, 2, 16)
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)

  codes = jax.nn.softmax(_randn((1, 2, 2, 16), seed=1))
  out = np.asarray(_apply(model, variables, codes, method="decode_codes"))
  sd = _torch_state_dict(variables["params"]["decoder"])
  want = _np_decoder(np.asarray(codes, np.float64).transpose(0, 3, 1, 2), sd, n_blk=2).transpose(
    0, 2, 3, 1
  )
  assert out.shape == (1, 16, 16, 6)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# Shapes and dtypes.
# ----------------------------------------------------------------------------


def test_dalle_shapes_downsample_8():
  model = _tiny_dalle()
  assert model.downsample == 8
  images = jnp.full((2, 112, 112, 3), 0.5)
  variables = _params(model, images[:1, :16, :16])
  logits = _apply(model, variables, images, method="encode")
  assert logits.shape == (2, 14, 14, 16) and logits.dtype == jnp.float32
  codes = jax.nn.one_hot(jnp.zeros((1, 14, 14), jnp.int32), 16)
  out = _apply(model, variables, codes, method="decode_codes")
  assert out.shape == (1, 112, 112, 6) and out.dtype == jnp.float32
  res = _apply(model, variables, images[:1, :24, :40], rng=_key(0), tau=1.0, hard=True)
  assert res["logits"].shape == (1, 3, 5, 16)
  assert res["codes"].shape == (1, 3, 5, 16)
  assert res["out"].shape == (1, 24, 40, 6)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model = _tiny_dalle(dtype="bfloat16")
  images = _rand((1, 16, 16, 3))
  variables = _params(model, images)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  res = _apply(model, variables, images, rng=_key(1), tau=1.0)
  assert res["logits"].dtype == jnp.float32
  assert res["out"].dtype == jnp.float32
  ref = _apply(_tiny_dalle(), variables, images, method="encode")
  np.testing.assert_allclose(res["logits"], ref, atol=0.1)
