"""Tests for beit_jax.models.dvae (CPU, tiny sizes except eval_shape counts).

On this CPU jaxlib, compiling a threefry draw costs about 3 s per distinct
shape, so the tests draw data with numpy, fill parameters from `jax.eval_shape`
with numpy normals of DALL-E's scale (`_params`), and use 'unsafe_rbg' keys
for the Gumbel noise. `model.init` itself is exercised in
`test_real_init_creates_encoder_and_decoder`.
"""

import functools
import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from beit_jax.models import dvae

# Exact parameter counts of the default DALL-E dVAE (n_hid 256, 2 blocks per
# group, vocab 8192, n_init 128), counted with jax.eval_shape.
DALLE_ENCODER_PARAMS = 53_786_240
DALLE_DECODER_PARAMS = 43_829_766


def _count(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _key(seed: int) -> jax.Array:
  """A PRNG key whose draws compile fast on CPU."""
  return jax.random.key(seed, impl='unsafe_rbg')


def _init(model, images, hard=False):
  """The documented init call (DiscreteVAE only)."""
  return model.init(_key(0), images, rng=_key(1), tau=1.0, hard=hard)


def _fill(shapes, seed=0, bias_std=0.0):
  """Numpy-filled variables with DALL-E's init scale for `shapes`."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == 'w':
      std = 1.0 / math.sqrt(np.prod(s.shape[:-1]))
    elif name == 'b':
      std = bias_std
    else:
      std = 1.0
    return jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _params(model, images, seed=0, bias_std=0.0):
  """Variables for `model` (any module) without compiling random draws."""
  if isinstance(model, dvae.DiscreteVAE):
    shapes = jax.eval_shape(lambda: _init(model, images))
  else:
    shapes = jax.eval_shape(lambda: model.init(_key(0), images))
  return _fill(shapes, seed, bias_std)


# XLA CPU options for test compiles: far quicker to compile, fast enough to run.
_FAST_COMPILE = {'xla_backend_optimization_level': 0,
                 'xla_llvm_disable_expensive_passes': True}


def _run_jit(fn, *args):
  """Compiles `fn` for `args` with `_FAST_COMPILE` and runs it once."""
  return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)


def _apply(model, variables, *args, method='__call__', **kw):
  """`model.apply` under jit: one compile beats op-by-op dispatch on CPU."""
  return _run_jit(functools.partial(model.apply, method=method, **kw),
                  variables, *args)


def _elbo(model, variables, images, rng, tau, beta, hard):
  """`dvae.elbo_loss` under jit."""
  return _run_jit(
      functools.partial(dvae.elbo_loss, model, tau=tau, beta=beta, hard=hard),
      variables, images, rng)


def _randn(shape, seed=0, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(0, scale, shape),
                     jnp.float32)


def _rand(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape),
                     jnp.float32)


def _flat(tree) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.shape)
          for k, v in flax.traverse_util.flatten_dict(tree, sep='/').items()}


def _tiny_dalle(**kw) -> dvae.DiscreteVAE:
  cfg = dict(arch='dall_e', vocab_size=16, n_hid=8, n_init=8,
             n_blk_per_group=1)
  cfg.update(kw)
  return dvae.DiscreteVAE(**cfg)


def _tiny_compact(**kw) -> dvae.DiscreteVAE:
  cfg = dict(arch='compact', vocab_size=32, recon_loss='mse', input_norm='half',
             num_layers=2, hidden=16, num_resblocks=1, codebook_dim=16)
  cfg.update(kw)
  return dvae.DiscreteVAE(**cfg)


# ----------------------------------------------------------------------------
# Independent analytic parameter counts (from the DALL-E source, not the code).
# ----------------------------------------------------------------------------


def _conv(n_in, n_out, k):
  return n_in * n_out * k * k + n_out


def _analytic_encoder(n_hid=256, n_blk=2, vocab=8192, c=3):
  def block(n_in, n_out):
    h = n_out // 4
    idp = _conv(n_in, n_out, 1) if n_in != n_out else 0
    return (idp + _conv(n_in, h, 3) + _conv(h, h, 3) + _conv(h, h, 3)
            + _conv(h, n_out, 1))
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
    return (idp + _conv(n_in, h, 1) + _conv(h, h, 3) + _conv(h, h, 3)
            + _conv(h, n_out, 3))
  total = _conv(vocab, n_init, 1)
  widths = [n_init, 8 * n_hid, 4 * n_hid, 2 * n_hid, n_hid]
  for g in range(4):
    for i in range(n_blk):
      total += block(widths[g] if i == 0 else widths[g + 1], widths[g + 1])
  return total + _conv(n_hid, 2 * c, 1)


def test_dalle_param_counts_exact():
  model = dvae.DiscreteVAE()
  shapes = jax.eval_shape(lambda: _init(model, jnp.zeros((1, 16, 16, 3))))
  enc = _count(shapes['params']['encoder'])
  dec = _count(shapes['params']['decoder'])
  assert enc == DALLE_ENCODER_PARAMS
  assert dec == DALLE_DECODER_PARAMS
  assert enc == _analytic_encoder()
  assert dec == _analytic_decoder()
  assert set(shapes['params']) == {'encoder', 'decoder'}
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))
  # A different configuration also matches the formula.
  small = dvae.DiscreteVAE(n_hid=64, n_blk_per_group=1, vocab_size=512,
                           n_init=32)
  shapes = jax.eval_shape(lambda: _init(small, jnp.zeros((1, 16, 16, 3))))
  assert _count(shapes['params']['encoder']) == _analytic_encoder(64, 1, 512)
  assert _count(shapes['params']['decoder']) == _analytic_decoder(32, 64, 1,
                                                                  512)


def test_dalle_param_tree_matches_torch_keys():
  shapes = jax.eval_shape(
      lambda: _init(dvae.DiscreteVAE(), jnp.zeros((1, 16, 16, 3))))
  enc = _flat(shapes['params']['encoder'])
  dec = _flat(shapes['params']['decoder'])
  expected_enc = {
      'blocks/input/w': (7, 7, 3, 256),
      'blocks/input/b': (256,),
      'blocks/group_1/block_1/res_path/conv_1/w': (3, 3, 256, 64),
      'blocks/group_1/block_2/res_path/conv_4/w': (1, 1, 64, 256),
      'blocks/group_2/block_1/id_path/w': (1, 1, 256, 512),
      'blocks/group_2/block_1/id_path/b': (512,),
      'blocks/group_2/block_1/res_path/conv_1/w': (3, 3, 256, 128),
      'blocks/group_2/block_2/res_path/conv_1/w': (3, 3, 512, 128),
      'blocks/group_3/block_1/id_path/w': (1, 1, 512, 1024),
      'blocks/group_4/block_1/id_path/w': (1, 1, 1024, 2048),
      'blocks/group_4/block_2/res_path/conv_3/w': (3, 3, 512, 512),
      'blocks/group_4/block_2/res_path/conv_4/b': (2048,),
      'blocks/output/conv/w': (1, 1, 2048, 8192),
      'blocks/output/conv/b': (8192,),
  }
  expected_dec = {
      'blocks/input/w': (1, 1, 8192, 128),
      'blocks/group_1/block_1/id_path/w': (1, 1, 128, 2048),
      'blocks/group_1/block_1/res_path/conv_1/w': (1, 1, 128, 512),
      'blocks/group_1/block_1/res_path/conv_4/w': (3, 3, 512, 2048),
      'blocks/group_2/block_1/id_path/w': (1, 1, 2048, 1024),
      'blocks/group_4/block_2/res_path/conv_2/w': (3, 3, 64, 64),
      'blocks/output/conv/w': (1, 1, 256, 6),
      'blocks/output/conv/b': (6,),
  }
  for k, v in expected_enc.items():
    assert enc[k] == v, k
  for k, v in expected_dec.items():
    assert dec[k] == v, k
  # Identity id_paths carry no parameters, as in DALL-E.
  for key in ('blocks/group_1/block_1/id_path/w',
              'blocks/group_2/block_2/id_path/w'):
    assert key not in enc
  assert 'blocks/group_1/block_2/id_path/w' not in dec
  # Every leaf is a DALL-E conv parameter `w` or `b`.
  assert {k.rsplit('/', 1)[1] for k in enc} == {'w', 'b'}
  assert len(enc) == 2 * (1 + 8 * 4 + 3 + 1)  # convs + 3 id paths.
  # params['encoder'] is exactly a standalone DalleEncoder's tree.
  alone = jax.eval_shape(lambda: dvae.DalleEncoder().init(
      _key(0), jnp.zeros((1, 16, 16, 3))))
  assert _flat(alone['params']) == enc


def test_real_init_creates_encoder_and_decoder():
  model = _tiny_compact(num_layers=1, num_resblocks=0)
  images = jnp.zeros((2, 8, 8, 3))
  variables = _run_jit(lambda x: _init(model, x), images)
  shapes = jax.eval_shape(lambda: _init(model, images))
  assert set(variables['params']) == {'encoder', 'decoder'}
  assert _flat(variables['params']) == _flat(shapes['params'])
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  # DALL-E's conv init: w ~ N(0, 1/(n_in k^2)), b = 0.
  conv = _run_jit(lambda x: dvae.Conv2d(64, 3).init(_key(3), x),
                  jnp.zeros((1, 4, 4, 32)))['params']
  assert conv['w'].shape == (3, 3, 32, 64)
  np.testing.assert_allclose(np.std(conv['w']), 1 / math.sqrt(32 * 9),
                             rtol=0.03)
  assert abs(float(np.mean(conv['w']))) < 3e-3
  np.testing.assert_array_equal(conv['b'], np.zeros(64))
  enc_w = variables['params']['encoder']['down_1']['w']
  np.testing.assert_allclose(np.std(enc_w), 1 / math.sqrt(3 * 16), rtol=0.15)


# ----------------------------------------------------------------------------
# Independent numpy re-implementation of the DALL-E forward (NCHW, OIHW, torch
# key names).
# ----------------------------------------------------------------------------


def _torch_state_dict(flax_params) -> dict[str, np.ndarray]:
  """Flax tree -> DALL-E-style state dict (dotted keys, OIHW weights)."""
  out = {}
  for path, v in flax.traverse_util.flatten_dict(flax_params).items():
    v = np.asarray(v, np.float64)
    out['.'.join(path)] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v
  return out


def _np_conv(x, sd, key):
  """torch F.conv2d(x, w, b, padding=(k-1)//2) in numpy, NCHW."""
  w, b = sd[key + '.w'], sd[key + '.b']
  k = w.shape[-1]
  p = (k - 1) // 2
  n, _, h, wd = x.shape
  xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
  y = np.zeros((n, w.shape[0], h, wd))
  for i in range(k):
    for j in range(k):
      y += np.einsum('nchw,oc->nohw', xp[:, :, i:i + h, j:j + wd],
                     w[:, :, i, j])
  return y + b[None, :, None, None]


def _np_block(x, sd, prefix, n_layers, kernels):
  relu = lambda a: np.maximum(a, 0)
  idp = (_np_conv(x, sd, prefix + '.id_path')
         if prefix + '.id_path.w' in sd else x)
  h = x
  for i in range(4):
    h = _np_conv(relu(h), sd, f'{prefix}.res_path.conv_{i + 1}')
    assert sd[f'{prefix}.res_path.conv_{i + 1}.w'].shape[-1] == kernels[i]
  return idp + h / n_layers**2


def _np_encoder(x, sd, n_blk, group_count=4):
  n_layers = group_count * n_blk
  x = _np_conv(x, sd, 'blocks.input')
  for g in range(1, 5):
    for i in range(1, n_blk + 1):
      x = _np_block(x, sd, f'blocks.group_{g}.block_{i}', n_layers,
                    (3, 3, 3, 1))
    if g < 4:
      n, c, h, w = x.shape
      x = x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
  return _np_conv(np.maximum(x, 0), sd, 'blocks.output.conv')


def _np_decoder(x, sd, n_blk, group_count=4):
  n_layers = group_count * n_blk
  x = _np_conv(x, sd, 'blocks.input')
  for g in range(1, 5):
    for i in range(1, n_blk + 1):
      x = _np_block(x, sd, f'blocks.group_{g}.block_{i}', n_layers,
                    (1, 3, 3, 3))
    if g < 4:
      x = x.repeat(2, axis=2).repeat(2, axis=3)
  return _np_conv(np.maximum(x, 0), sd, 'blocks.output.conv')


@pytest.mark.parametrize('n_in,n_out', [(4, 8), (8, 8)])
def test_dalle_encoder_block_matches_numpy(n_in, n_out):
  block = dvae.DalleEncoderBlock(n_in, n_out, n_layers=3)
  x = _randn((2, 5, 6, n_in))
  variables = _params(block, x, bias_std=0.1)  # Non-zero biases are checked.
  assert ('id_path' in variables['params']) == (n_in != n_out)
  got = np.asarray(_apply(block, variables, x))
  sd = {'blk.' + k: v
        for k, v in _torch_state_dict(variables['params']).items()}
  want = _np_block(np.asarray(x, np.float64).transpose(0, 3, 1, 2), sd, 'blk',
                   3, (3, 3, 3, 1)).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The residual branch is scaled by post_gain = 1/n_layers**2: with
  # n_layers=3 it is 1/9 of the unscaled (n_layers=1) residual branch.
  unscaled = dvae.DalleEncoderBlock(n_in, n_out, n_layers=1).apply(variables, x)
  identity = (np.asarray(x) if n_in == n_out else np.asarray(
      dvae.Conv2d(n_out, 1).apply(
          {'params': variables['params']['id_path']}, x)))
  np.testing.assert_allclose(got - identity, (unscaled - identity) / 9,
                             rtol=1e-4, atol=1e-5)


def test_dalle_decoder_block_matches_numpy():
  block = dvae.DalleDecoderBlock(8, 4, n_layers=2)
  x = _randn((1, 4, 4, 8))
  variables = _params(block, x, bias_std=0.1)
  got = np.asarray(_apply(block, variables, x))
  sd = {'b.' + k: v for k, v in _torch_state_dict(variables['params']).items()}
  want = _np_block(np.asarray(x, np.float64).transpose(0, 3, 1, 2), sd, 'b', 2,
                   (1, 3, 3, 3)).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_dalle_full_forward_matches_numpy():
  model = _tiny_dalle(n_blk_per_group=2)
  images = _rand((1, 16, 16, 3))
  variables = _params(model, images, bias_std=0.1)
  logits = np.asarray(_apply(model, variables, images, method='encode'))
  sd = _torch_state_dict(variables['params']['encoder'])
  x = (0.8 * np.asarray(images, np.float64) + 0.1).transpose(0, 3, 1, 2)
  want = _np_encoder(x, sd, n_blk=2).transpose(0, 2, 3, 1)
  assert logits.shape == (1, 2, 2, 16)
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)

  codes = jax.nn.softmax(_randn((1, 2, 2, 16), seed=1))
  out = np.asarray(_apply(model, variables, codes, method='decode_codes'))
  sd = _torch_state_dict(variables['params']['decoder'])
  want = _np_decoder(np.asarray(codes, np.float64).transpose(0, 3, 1, 2), sd,
                     n_blk=2).transpose(0, 2, 3, 1)
  assert out.shape == (1, 16, 16, 6)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


def test_conv_transpose_matches_torch_scatter_definition():
  # torch ConvTranspose2d(k=4, s=2, padding=1): out[s*i + a - p] += x[i] W[a],
  # with W the stored kernel flipped spatially.
  conv = dvae.ConvTranspose2d(5, 4, 2)
  x = _randn((2, 3, 2, 3))
  variables = _params(conv, x, bias_std=0.1)
  got = np.asarray(_apply(conv, variables, x))
  w = np.asarray(variables['params']['w'], np.float64)[::-1, ::-1]
  xn = np.asarray(x, np.float64)
  want = np.zeros((2, 6, 4, 5))
  for i in range(3):
    for j in range(2):
      for a in range(4):
        for b in range(4):
          m, n = 2 * i + a - 1, 2 * j + b - 1
          if 0 <= m < 6 and 0 <= n < 4:
            want[:, m, n] += xn[:, i, j] @ w[a, b]
  want += np.asarray(variables['params']['b'])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_compact_res_block_matches_numpy():
  block = dvae.CompactResBlock(6)
  x = _randn((1, 4, 5, 6))
  variables = _params(block, x, bias_std=0.1)
  sd = {'r.' + k: v for k, v in _torch_state_dict(variables['params']).items()}
  xn = np.asarray(x, np.float64).transpose(0, 3, 1, 2)
  h = _np_conv(xn, sd, 'r.conv_1')
  h = _np_conv(np.maximum(h, 0), sd, 'r.conv_2')
  h = _np_conv(np.maximum(h, 0), sd, 'r.conv_3')
  np.testing.assert_allclose(_apply(block, variables, x),
                             (xn + h).transpose(0, 2, 3, 1), rtol=1e-4,
                             atol=1e-5)


# ----------------------------------------------------------------------------
# Shapes and dtypes.
# ----------------------------------------------------------------------------


def test_dalle_shapes_downsample_8():
  model = _tiny_dalle()
  assert model.downsample == 8
  images = jnp.full((2, 112, 112, 3), 0.5)
  variables = _params(model, images[:1, :16, :16])
  logits = _apply(model, variables, images, method='encode')
  assert logits.shape == (2, 14, 14, 16) and logits.dtype == jnp.float32
  codes = jax.nn.one_hot(jnp.zeros((1, 14, 14), jnp.int32), 16)
  out = _apply(model, variables, codes, method='decode_codes')
  assert out.shape == (1, 112, 112, 6) and out.dtype == jnp.float32
  res = _apply(model, variables, images[:1, :24, :40], rng=_key(0), tau=1.0,
               hard=True)
  assert res['logits'].shape == (1, 3, 5, 16)
  assert res['codes'].shape == (1, 3, 5, 16)
  assert res['out'].shape == (1, 24, 40, 6)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model = _tiny_dalle(dtype=jnp.bfloat16)
  images = _rand((1, 16, 16, 3))
  variables = _params(model, images)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  res = _apply(model, variables, images, rng=_key(1), tau=1.0)
  assert res['logits'].dtype == jnp.float32
  assert res['out'].dtype == jnp.float32
  ref = _apply(_tiny_dalle(), variables, images, method='encode')
  np.testing.assert_allclose(res['logits'], ref, atol=0.1)


@pytest.mark.parametrize('num_layers,grid', [(1, (7, 7)), (2, (7, 5)),
                                             (3, (3, 7))])
def test_compact_output_sizes_odd_grids(num_layers, grid):
  model = _tiny_compact(num_layers=num_layers, recon_loss='logit_laplace')
  d = 2**num_layers
  assert model.downsample == d
  images = jnp.full((2, grid[0] * d, grid[1] * d, 3), 0.3)
  variables = _params(model, images)
  res = _apply(model, variables, images, rng=_key(0), tau=1.0)
  assert res['logits'].shape == (2, *grid, 32)
  assert res['out'].shape == (2, grid[0] * d, grid[1] * d, 6)
  codes = jax.nn.one_hot(jnp.ones((1, *grid), jnp.int32), 32)
  out = _apply(model, variables, codes, method='decode_codes')
  assert out.shape == (1, grid[0] * d, grid[1] * d, 6)
  p = variables['params']
  assert p['decoder']['codebook'].shape == (32, 16)
  assert set(p['encoder']) == ({f'down_{i + 1}' for i in range(num_layers)}
                               | {'res_1', 'output'})


def test_compact_mse_has_3_channels_and_floors_odd_inputs():
  model = _tiny_compact()
  images = jnp.full((1, 15, 17, 3), 0.5)
  variables = _params(model, jnp.zeros((1, 8, 8, 3)))
  logits = _apply(model, variables, images, method='encode')
  assert logits.shape == (1, 3, 4, 32)
  out = _apply(model, variables, jax.nn.softmax(logits), method='decode_codes')
  assert out.shape == (1, 12, 16, 3)


@pytest.mark.parametrize('kwargs', [
    dict(arch='dall_e', recon_loss='mse'),
    dict(arch='vqgan'),
    dict(arch='compact', recon_loss='l1'),
    dict(arch='compact', input_norm='imagenet'),
    dict(arch='compact', num_layers=0),
])
def test_inconsistent_settings_raise(kwargs):
  with pytest.raises(ValueError):
    dvae.DiscreteVAE(**kwargs)


# ----------------------------------------------------------------------------
# Gumbel-softmax and KL.
# ----------------------------------------------------------------------------


def test_gumbel_low_tau_approaches_one_hot():
  logits = _randn((64, 10))
  soft = dvae.gumbel_softmax(_key(1), logits, 1.0, hard=False)
  sharp = dvae.gumbel_softmax(_key(1), logits, 1e-3, hard=False)
  assert soft.dtype == jnp.float32
  np.testing.assert_allclose(jnp.sum(soft, -1), 1.0, rtol=1e-5)
  assert float(jnp.mean(jnp.max(soft, -1))) < 0.9
  assert float(jnp.min(jnp.max(sharp, -1))) > 0.99
  # Same noise: the sharp sample picks the soft sample's argmax.
  np.testing.assert_array_equal(jnp.argmax(soft, -1), jnp.argmax(sharp, -1))


def test_gumbel_hard_is_one_hot_with_soft_gradient():
  logits = _randn((4, 3, 3, 7))
  weights = _randn(logits.shape, seed=2)
  rng = _key(1)
  hard = dvae.gumbel_softmax(rng, logits, 0.7, hard=True)
  soft = dvae.gumbel_softmax(rng, logits, 0.7, hard=False)
  np.testing.assert_array_equal(
      hard, jax.nn.one_hot(jnp.argmax(soft, -1), 7))  # Exactly one-hot.
  f = lambda h: lambda l: jnp.sum(weights * dvae.gumbel_softmax(rng, l, 0.7, h))
  g_hard = _run_jit(jax.grad(f(True)), logits)
  g_soft = _run_jit(jax.grad(f(False)), logits)
  assert float(jnp.max(jnp.abs(g_hard))) > 1e-3
  np.testing.assert_allclose(g_hard, g_soft, rtol=1e-6, atol=1e-7)


def test_gumbel_max_frequencies_match_softmax():
  probs = np.array([0.5, 0.25, 0.15, 0.07, 0.03])
  logits = jnp.broadcast_to(jnp.log(probs) + 1.3, (40_000, 5))
  y = dvae.gumbel_softmax(_key(3), logits, 2.0, hard=True)
  freq = np.asarray(jnp.mean(y, axis=0))
  np.testing.assert_allclose(freq, probs, atol=0.012)


def test_kl_to_uniform():
  kl_to_uniform = jax.jit(dvae.kl_to_uniform)
  v = 64
  kl0 = kl_to_uniform(jnp.full((2, 3, 3, v), 4.2))
  assert kl0.shape == (2, 3, 3)
  np.testing.assert_allclose(kl0, 0.0, atol=1e-5)
  peaked = 50.0 * jax.nn.one_hot(jnp.zeros((1, 2, 2), jnp.int32), v)
  np.testing.assert_allclose(kl_to_uniform(peaked), math.log(v),
                             rtol=1e-5)
  logits = _randn((5, v), scale=3.0)
  q = np.asarray(jax.nn.softmax(logits), np.float64)
  want = np.sum(q * np.log(q * v), -1)
  np.testing.assert_allclose(kl_to_uniform(logits), want, rtol=1e-4)
  # Stable with huge logits.
  assert np.isfinite(kl_to_uniform(jnp.array([[1e4, -1e4, 0.0]]))).all()


# ----------------------------------------------------------------------------
# Pixel maps, logit-Laplace, reconstruction.
# ----------------------------------------------------------------------------


def test_map_pixels_roundtrip():
  x = jnp.linspace(0.0, 1.0, 11)
  np.testing.assert_allclose(dvae.map_pixels(x), 0.8 * x + 0.1, rtol=1e-6)
  np.testing.assert_allclose(dvae.unmap_pixels(dvae.map_pixels(x)), x,
                             atol=1e-6)
  assert float(dvae.unmap_pixels(jnp.array(0.0))) == 0.0
  assert float(dvae.unmap_pixels(jnp.array(1.0))) == 1.0


def test_logit_laplace_nll_matches_numpy():
  target = _rand((2, 4, 5, 3))
  target = target.at[0, 0, 0].set(jnp.array([0.0, 1.0, 0.5]))
  raw = _randn((2, 4, 5, 6), seed=1)
  got = np.asarray(dvae.logit_laplace_nll(target, raw))
  x = 0.8 * np.asarray(target, np.float64) + 0.1
  mu = np.asarray(raw, np.float64)[..., :3]
  b = np.exp(np.asarray(raw, np.float64)[..., 3:])
  pdf = 1 / (2 * b * x * (1 - x)) * np.exp(-np.abs(np.log(x / (1 - x)) - mu)
                                           / b)
  assert got.shape == (2, 4, 5, 3)
  np.testing.assert_allclose(got, -np.log(pdf), rtol=1e-5, atol=1e-5)
  # The density integrates to 1 over (0, 1) (numerical check).
  xs = np.linspace(1e-6, 1 - 1e-6, 400_001)
  nll = dvae.logit_laplace_nll(
      jnp.asarray((xs - 0.1) / 0.8, jnp.float32)[None, :, None, None],
      jnp.broadcast_to(jnp.array([0.3, -0.5]), (1, xs.size, 1, 2)))
  np.testing.assert_allclose(np.trapezoid(np.exp(-np.asarray(nll, np.float64))
                                          .ravel(), xs), 1.0, atol=2e-3)


def test_reconstruct_inverts_map_pixels():
  model = _tiny_dalle()
  x = _rand((2, 8, 8, 3))
  m = dvae.map_pixels(x)
  raw = jnp.concatenate([jnp.log(m) - jnp.log1p(-m), jnp.zeros_like(x)], -1)
  got = model.apply({}, raw, method='reconstruct')
  np.testing.assert_allclose(got, x, atol=1e-5)
  mse_model = _tiny_compact(input_norm='half')
  got = mse_model.apply({}, (x - 0.5) / 0.5 + 0.0, method='reconstruct')
  np.testing.assert_allclose(got, x, atol=1e-6)
  dall_e_norm = _tiny_compact(input_norm='dall_e')
  got = dall_e_norm.apply({}, jnp.array([-5.0, 0.5, 5.0]), method='reconstruct')
  np.testing.assert_allclose(got, [0.0, 0.5, 1.0], atol=1e-6)


# ----------------------------------------------------------------------------
# Loss, tokenize, decode, stats.
# ----------------------------------------------------------------------------


def test_elbo_loss_terms_and_aux():
  model = _tiny_compact(recon_loss='logit_laplace', input_norm='dall_e')
  images = _rand((3, 8, 12, 3))
  variables = _params(model, images)
  rng = _key(5)
  loss, aux = _elbo(model, variables, images, rng, 0.9, 6.6, False)
  res = _apply(model, variables, images, rng=rng, tau=0.9)
  recon = jnp.mean(dvae.logit_laplace_nll(images, res['out']))
  kl = jnp.mean(dvae.kl_to_uniform(res['logits']))
  np.testing.assert_allclose(aux['recon_loss'], recon, rtol=1e-5)
  np.testing.assert_allclose(aux['kl'], kl, rtol=1e-5)
  np.testing.assert_allclose(loss, recon + 6.6 * kl / (4**2 * 3), rtol=1e-5)
  counts = aux['token_counts']
  assert counts.dtype == jnp.int32 and counts.shape == (32,)
  assert int(counts.sum()) == 3 * 2 * 3
  np.testing.assert_array_equal(
      counts, np.bincount(np.argmax(res['logits'], -1).ravel(), minlength=32))
  rec = np.asarray(_apply(model, variables, res['out'], method='reconstruct'))
  per_image = np.mean((rec - np.asarray(images)) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(aux['mse'], per_image.mean(), rtol=1e-5)
  np.testing.assert_allclose(aux['psnr'], np.mean(-10 * np.log10(per_image)),
                             rtol=1e-5)
  assert 0 <= float(aux['logits_entropy']) <= math.log(32) + 1e-5


def test_elbo_mse_and_kl_weight():
  model = _tiny_compact()
  images = _rand((2, 8, 8, 3))
  variables = _params(model, images)
  loss, aux = _elbo(model, variables, images, _key(1), 1.0, 2.0, True)
  res = _apply(model, variables, images, rng=_key(1), tau=1.0, hard=True)
  # MSE in the normalised ('half') space.
  np.testing.assert_allclose(
      aux['recon_loss'], jnp.mean((res['out'] - (images - 0.5) * 2) ** 2),
      rtol=1e-5)
  # The KL weight is beta / (d^2 * 3): with DALL-E's d = 8 that is beta / 192.
  np.testing.assert_allclose(loss - aux['recon_loss'],
                             2.0 * aux['kl'] / (4**2 * 3), rtol=1e-4, atol=1e-7)
  assert float(aux['kl']) > 0.0
  assert _tiny_dalle().downsample**2 * 3 == 192


def test_tokenize_deterministic_single_trace_and_decode():
  model = _tiny_compact()
  images = _rand((2, 16, 12, 3))
  variables = _params(model, images)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def tok(params, x):
    return dvae.tokenize(model, params, x)

  ids1 = tok(variables, images)
  ids2 = tok(variables, images)
  tok(variables, images * 0.5)  # New values, same shapes: no retrace.
  assert ids1.shape == (2, 4, 3) and ids1.dtype == jnp.int32
  np.testing.assert_array_equal(ids1, ids2)
  want = jnp.argmax(_apply(model, variables, images, method='encode'), -1)
  np.testing.assert_array_equal(ids1, want)
  # An encoder-only variables dict is enough to tokenize.
  enc_only = {'params': {'encoder': variables['params']['encoder']}}
  np.testing.assert_array_equal(
      _run_jit(functools.partial(dvae.tokenize, model), enc_only, images), ids1)
  rec = _run_jit(functools.partial(dvae.decode, model), variables, ids1)
  assert rec.shape == images.shape
  assert float(rec.min()) >= 0.0 and float(rec.max()) <= 1.0
  codes = jax.nn.one_hot(ids1, 32)
  want = model.apply(variables,
                     _apply(model, variables, codes, method='decode_codes'),
                     method='reconstruct')
  np.testing.assert_allclose(rec, want, rtol=1e-6)


def test_tokenize_decode_dalle():
  model = _tiny_dalle()
  images = _rand((1, 32, 24, 3))
  variables = _params(model, images)
  ids = jax.jit(dvae.tokenize, static_argnums=0)(model, variables, images)
  assert ids.shape == (1, 4, 3) and ids.dtype == jnp.int32
  rec = jax.jit(dvae.decode, static_argnums=0)(model, variables, ids)
  assert rec.shape == (1, 32, 24, 3)


def test_codebook_stats():
  codebook_stats = jax.jit(dvae.codebook_stats)
  uniform = codebook_stats(jnp.full((16,), 3, jnp.int32))
  np.testing.assert_allclose(uniform['perplexity'], 16.0, rtol=1e-5)
  np.testing.assert_allclose(uniform['usage'], 1.0)
  single = codebook_stats(jnp.array([0, 9, 0, 0], jnp.int32))
  np.testing.assert_allclose(single['perplexity'], 1.0, rtol=1e-6)
  np.testing.assert_allclose(single['usage'], 0.25)
  half = codebook_stats(jnp.array([5, 5, 0, 0, 0, 0, 0, 0]))
  np.testing.assert_allclose(half['perplexity'], 2.0, rtol=1e-5)
  np.testing.assert_allclose(half['usage'], 0.25)
  empty = codebook_stats(jnp.zeros((4,), jnp.int32))
  assert np.isfinite(empty['perplexity'])


# ----------------------------------------------------------------------------
# Training signal.
# ----------------------------------------------------------------------------


def _smooth_images(n, size, seed=0):
  """Random low-frequency RGB images in [0, 1]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size),
                       indexing='ij')
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
        lambda v: dvae.elbo_loss(model, v, images, rng, 1.0, 0.1, False),
        has_aux=True)(variables)
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
  assert float(aux['psnr']) > 25.0


@pytest.mark.parametrize('k,s,pad', [(1, 1, 0), (3, 1, 1), (4, 2, 1), (7, 1, 3), (4, 2, 0)])
def test_matmul_correlate_equals_xla_conv(k, s, pad):
  rng = np.random.default_rng(k * 10 + s)
  x = jnp.asarray(rng.normal(size=(2, 9, 10, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 5, 6)), jnp.float32)
  padding = ((pad, pad), (pad, pad))
  expected = jax.lax.conv_general_dilated(x, w, (s, s), padding,
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(dvae.correlate(x, w, s, padding), expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dvae._im2col_correlate(x, w, s, padding), expected, rtol=1e-4,
                             atol=1e-4)
  # The gradient (im2col's on CPU) equals XLA's convolution gradient.
  cot = jnp.asarray(rng.normal(size=expected.shape), jnp.float32)

  def grads(fn):
    return jax.grad(lambda a, b: jnp.sum(fn(a, b) * cot), argnums=(0, 1))(x, w)

  xla = lambda a, b: jax.lax.conv_general_dilated(  # pylint: disable=g-long-lambda
      a, b, (s, s), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  for got, want in zip(grads(lambda a, b: dvae.correlate(a, b, s, padding)), grads(xla)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('k,s', [(4, 2), (2, 2), (3, 1), (6, 2), (8, 4)])
def test_subpixel_transposed_correlate_equals_xla(k, s):
  pad = k - 1 - (k - s) // 2
  rng = np.random.default_rng(k + s)
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 4, 3)), jnp.float32)
  expected = jax.lax.conv_transpose(x, w, (s, s), ((pad, pad), (pad, pad)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  got = dvae.transposed_correlate(x, w, s, pad)
  assert got.shape == expected.shape == (2, 5 * s, 7 * s, 3)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
