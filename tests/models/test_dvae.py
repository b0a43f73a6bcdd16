"""Tests for beit_jax.models.dvae: the DiscreteVAE interface, from_config, the losses.

On this CPU jaxlib, compiling a threefry draw costs about 3 s per distinct
shape, so the tests draw data with numpy, fill parameters from `jax.eval_shape`
with numpy normals of DALL-E's scale (`_params`), and use 'unsafe_rbg' keys
for the Gumbel noise. `model.init` itself is exercised in
`test_real_init_creates_encoder_and_decoder`. The helpers here are shared with
test_dvae_dalle.py, test_dvae_compact.py and test_conv.py.
"""

import functools
import math

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from beit_jax.models import codebook, dvae, dvae_compact, dvae_dalle, ops
from beit_jax.models.conv import Conv2d


def _count(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _key(seed: int) -> jax.Array:
  """A PRNG key whose draws compile fast on CPU."""
  return jax.random.key(seed, impl="unsafe_rbg")


def _init(model, images, hard=False):
  """The documented init call (DiscreteVAE only)."""
  return model.init(_key(0), images, rng=_key(1), tau=1.0, hard=hard)


def _fill(shapes, seed=0, bias_std=0.0):
  """Numpy-filled variables with DALL-E's init scale for `shapes`."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "w":
      std = 1.0 / math.sqrt(np.prod(s.shape[:-1]))
    elif name == "b":
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
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run_jit(fn, *args):
  """Compiles `fn` for `args` with `_FAST_COMPILE` and runs it once."""
  return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)


def _apply(model, variables, *args, method="__call__", **kw):
  """`model.apply` under jit: one compile beats op-by-op dispatch on CPU."""
  return _run_jit(functools.partial(model.apply, method=method, **kw), variables, *args)


def _elbo(model, variables, images, rng, tau, beta, hard):
  """`dvae.elbo_loss` under jit."""
  return _run_jit(
    functools.partial(dvae.elbo_loss, model, tau=tau, beta=beta, hard=hard), variables, images, rng
  )


def _randn(shape, seed=0, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(0, scale, shape), jnp.float32)


def _rand(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _flat(tree) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


def _tiny_dalle(**kw) -> dvae.DiscreteVAE:
  cfg = dict(arch="dall_e", vocab_size=16, n_hid=8, n_init=8, n_blk_per_group=1)
  cfg.update(kw)
  return dvae.from_config(cfg)


def _tiny_compact(**kw) -> dvae.DiscreteVAE:
  cfg = dict(
    arch="compact",
    vocab_size=32,
    recon_loss="mse",
    input_norm="half",
    num_layers=2,
    hidden=16,
    num_resblocks=1,
    codebook_dim=16,
  )
  cfg.update(kw)
  return dvae.from_config(cfg)


def param_listing(model) -> str:
  """'path shape' lines (shape as AxBxC) of `model.init`'s parameters for 16x16 images."""
  shapes = jax.eval_shape(lambda: _init(model, jnp.zeros((1, 16, 16, 3))))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))
  flat, _ = jax.tree_util.tree_flatten_with_path(shapes["params"])
  return "\n".join(
    f"{'/'.join(k.key for k in path)} {'x'.join(map(str, a.shape))}" for path, a in flat
  )


# ----------------------------------------------------------------------------
# Construction.
# ----------------------------------------------------------------------------


def test_real_init_creates_encoder_and_decoder():
  model = _tiny_compact(num_layers=1, num_resblocks=0)
  images = jnp.zeros((2, 8, 8, 3))
  variables = _run_jit(lambda x: _init(model, x), images)
  shapes = jax.eval_shape(lambda: _init(model, images))
  assert set(variables["params"]) == {"encoder", "decoder"}
  assert _flat(variables["params"]) == _flat(shapes["params"])
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  # DALL-E's conv init: w ~ N(0, 1/(n_in k^2)), b = 0.
  conv = _run_jit(lambda x: Conv2d(64, 3).init(_key(3), x), jnp.zeros((1, 4, 4, 32)))["params"]
  assert conv["w"].shape == (3, 3, 32, 64)
  np.testing.assert_allclose(np.std(conv["w"]), 1 / math.sqrt(32 * 9), rtol=0.03)
  assert abs(float(np.mean(conv["w"]))) < 3e-3
  np.testing.assert_array_equal(conv["b"], np.zeros(64))
  enc_w = variables["params"]["encoder"]["down_1"]["w"]
  np.testing.assert_allclose(np.std(enc_w), 1 / math.sqrt(3 * 16), rtol=0.15)


def test_discrete_vae_takes_its_parts_as_fields():
  model = dvae.from_config(
    dict(
      arch="compact",
      vocab_size=32,
      num_layers=2,
      hidden=8,
      num_resblocks=0,
      codebook_dim=8,
      recon_loss="mse",
      input_norm="half",
    )
  )
  assert isinstance(model.encoder, dvae_compact.CompactEncoder)
  assert isinstance(model.decoder, dvae_compact.CompactDecoder)
  assert (model.vocab_size, model.recon_loss, model.input_norm) == (32, "mse", "half")
  assert (model.downsample, model.output_channels) == (4, 3)
  # Linen names module-valued fields by the attribute: parameters under encoder / decoder.
  shapes = jax.eval_shape(lambda: _init(model, jnp.zeros((1, 8, 8, 3))))
  assert set(shapes["params"]) == {"encoder", "decoder"}
  assert "down_2" in shapes["params"]["encoder"] and "up_2" in shapes["params"]["decoder"]
  dalle = dvae.dalle_dvae(vocab_size=16, n_hid=8, n_init=8, n_blk_per_group=1)
  assert isinstance(dalle.encoder, dvae_dalle.DalleEncoder)
  assert (dalle.downsample, dalle.output_channels, dalle.recon_loss) == (8, 6, "logit_laplace")


def test_from_config_reads_task_configs_and_old_exports():
  # What an export's metadata.json holds (every key of both architectures, dtype a string).
  full = dict(
    arch="dall_e",
    vocab_size=16,
    recon_loss="logit_laplace",
    input_norm="dall_e",
    num_layers=3,
    hidden=256,
    num_resblocks=2,
    codebook_dim=512,
    n_hid=8,
    n_blk_per_group=1,
    group_count=4,
    n_init=8,
    dtype="bfloat16",
  )
  model = dvae.from_config(full)
  assert model.encoder.dtype == jnp.bfloat16 and model.decoder.dtype == jnp.bfloat16
  assert model.encoder.n_hid == 8 and model.decoder.n_init == 8
  assert param_listing(model) == param_listing(dvae.from_config(ml_collections.ConfigDict(full)))
  # Missing keys take the defaults: {} is the full-size DALL-E dVAE in float32.
  default = dvae.from_config({})
  assert (default.vocab_size, default.downsample, default.encoder.n_hid) == (8192, 8, 256)
  assert default.encoder.dtype == jnp.float32
  compact = dvae.from_config(dict(full, arch="compact", recon_loss="mse", dtype="float32"))
  assert isinstance(compact.encoder, dvae_compact.CompactEncoder)
  assert (compact.encoder.hidden, compact.decoder.codebook_dim, compact.downsample) == (256, 512, 8)
  with pytest.raises(ValueError, match="hiden"):
    dvae.from_config({"arch": "compact", "hiden": 16})
  with pytest.raises(ValueError, match="dtype"):
    dvae.from_config({"dtype": "float16"})


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(arch="dall_e", recon_loss="mse"),
    dict(arch="vqgan"),
    dict(arch="compact", recon_loss="l1"),
    dict(arch="compact", input_norm="imagenet"),
    dict(arch="compact", num_layers=0),
    dict(arch="dall_e", n_hid=10),
    dict(arch="compact", vocab_size=1),
  ],
)
def test_inconsistent_settings_raise(kwargs):
  with pytest.raises(ValueError):
    dvae.from_config(kwargs)


@pytest.mark.parametrize(
  "make, match",
  [
    (
      lambda: dvae.DiscreteVAE(
        dvae_compact.CompactEncoder(1, 8, 0, 16),
        dvae_compact.CompactDecoder(1, 8, 0, 32, 8, 3),
        32,
        "mse",
        "half",
      ),
      "vocab_size 16",
    ),
    (
      lambda: dvae.DiscreteVAE(
        dvae_compact.CompactEncoder(1, 8, 0, 32),
        dvae_compact.CompactDecoder(1, 8, 0, 32, 8, 3),
        32,
        "logit_laplace",
        "half",
      ),
      "needs 6 decoder output channels",
    ),
    (
      lambda: dvae.DiscreteVAE(
        dvae_dalle.DalleEncoder(n_hid=8, vocab_size=16),
        dvae_dalle.DalleDecoder(n_hid=8, vocab_size=16),
        16,
        "mse",
        "dall_e",
      ),
      "needs 3 decoder output channels",
    ),
    (
      lambda: dvae.DiscreteVAE(
        dvae_dalle.DalleEncoder(n_hid=8, vocab_size=16),
        dvae_dalle.DalleDecoder(n_hid=8, vocab_size=16),
        16,
        "logit_laplace",
        "imagenet",
      ),
      "input_norm",
    ),
  ],
)
def test_discrete_vae_checks_its_parts(make, match):
  with pytest.raises(ValueError, match=match):
    make()


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
  np.testing.assert_array_equal(hard, jax.nn.one_hot(jnp.argmax(soft, -1), 7))  # Exactly one-hot.

  def f(h):
    return lambda logits: jnp.sum(weights * dvae.gumbel_softmax(rng, logits, 0.7, h))

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
  np.testing.assert_allclose(kl_to_uniform(peaked), math.log(v), rtol=1e-5)
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
  np.testing.assert_allclose(dvae.unmap_pixels(dvae.map_pixels(x)), x, atol=1e-6)
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
  pdf = 1 / (2 * b * x * (1 - x)) * np.exp(-np.abs(np.log(x / (1 - x)) - mu) / b)
  assert got.shape == (2, 4, 5, 3)
  np.testing.assert_allclose(got, -np.log(pdf), rtol=1e-5, atol=1e-5)
  # The density integrates to 1 over (0, 1) (numerical check).
  xs = np.linspace(1e-6, 1 - 1e-6, 400_001)
  nll = dvae.logit_laplace_nll(
    jnp.asarray((xs - 0.1) / 0.8, jnp.float32)[None, :, None, None],
    jnp.broadcast_to(jnp.array([0.3, -0.5]), (1, xs.size, 1, 2)),
  )
  np.testing.assert_allclose(
    np.trapezoid(np.exp(-np.asarray(nll, np.float64)).ravel(), xs), 1.0, atol=2e-3
  )


def test_reconstruct_inverts_map_pixels():
  model = _tiny_dalle()
  x = _rand((2, 8, 8, 3))
  m = dvae.map_pixels(x)
  raw = jnp.concatenate([jnp.log(m) - jnp.log1p(-m), jnp.zeros_like(x)], -1)
  got = model.apply({}, raw, method="reconstruct")
  np.testing.assert_allclose(got, x, atol=1e-5)
  mse_model = _tiny_compact(input_norm="half")
  got = mse_model.apply({}, (x - 0.5) / 0.5 + 0.0, method="reconstruct")
  np.testing.assert_allclose(got, x, atol=1e-6)
  dall_e_norm = _tiny_compact(input_norm="dall_e")
  got = dall_e_norm.apply({}, jnp.array([-5.0, 0.5, 5.0]), method="reconstruct")
  np.testing.assert_allclose(got, [0.0, 0.5, 1.0], atol=1e-6)


# ----------------------------------------------------------------------------
# Loss, tokenize, decode, stats, backends.
# ----------------------------------------------------------------------------


def test_elbo_loss_terms_and_aux():
  model = _tiny_compact(recon_loss="logit_laplace", input_norm="dall_e")
  images = _rand((3, 8, 12, 3))
  variables = _params(model, images)
  rng = _key(5)
  loss, aux = _elbo(model, variables, images, rng, 0.9, 6.6, False)
  res = _apply(model, variables, images, rng=rng, tau=0.9)
  recon = jnp.mean(dvae.logit_laplace_nll(images, res["out"]))
  kl = jnp.mean(dvae.kl_to_uniform(res["logits"]))
  np.testing.assert_allclose(aux["recon_loss"], recon, rtol=1e-5)
  np.testing.assert_allclose(aux["kl"], kl, rtol=1e-5)
  np.testing.assert_allclose(loss, recon + 6.6 * kl / (4**2 * 3), rtol=1e-5)
  counts = aux["token_counts"]
  assert counts.dtype == jnp.int32 and counts.shape == (32,)
  assert int(counts.sum()) == 3 * 2 * 3
  np.testing.assert_array_equal(
    counts, np.bincount(np.argmax(res["logits"], -1).ravel(), minlength=32)
  )
  rec = np.asarray(_apply(model, variables, res["out"], method="reconstruct"))
  per_image = np.mean((rec - np.asarray(images)) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(aux["mse"], per_image.mean(), rtol=1e-5)
  np.testing.assert_allclose(aux["psnr"], np.mean(-10 * np.log10(per_image)), rtol=1e-5)
  assert 0 <= float(aux["logits_entropy"]) <= math.log(32) + 1e-5


def test_elbo_mse_and_kl_weight():
  model = _tiny_compact()
  images = _rand((2, 8, 8, 3))
  variables = _params(model, images)
  loss, aux = _elbo(model, variables, images, _key(1), 1.0, 2.0, True)
  res = _apply(model, variables, images, rng=_key(1), tau=1.0, hard=True)
  # MSE in the normalised ('half') space.
  np.testing.assert_allclose(
    aux["recon_loss"], jnp.mean((res["out"] - (images - 0.5) * 2) ** 2), rtol=1e-5
  )
  # The KL weight is beta / (d^2 * 3): with DALL-E's d = 8 that is beta / 192.
  np.testing.assert_allclose(
    loss - aux["recon_loss"], 2.0 * aux["kl"] / (4**2 * 3), rtol=1e-4, atol=1e-7
  )
  assert float(aux["kl"]) > 0.0
  assert _tiny_dalle().downsample ** 2 * 3 == 192


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
  want = jnp.argmax(_apply(model, variables, images, method="encode"), -1)
  np.testing.assert_array_equal(ids1, want)
  # An encoder-only variables dict is enough to tokenize.
  enc_only = {"params": {"encoder": variables["params"]["encoder"]}}
  np.testing.assert_array_equal(
    _run_jit(functools.partial(dvae.tokenize, model), enc_only, images), ids1
  )
  rec = _run_jit(functools.partial(dvae.decode, model), variables, ids1)
  assert rec.shape == images.shape
  assert float(rec.min()) >= 0.0 and float(rec.max()) <= 1.0
  codes = jax.nn.one_hot(ids1, 32)
  want = model.apply(
    variables, _apply(model, variables, codes, method="decode_codes"), method="reconstruct"
  )
  np.testing.assert_allclose(rec, want, rtol=1e-6)


def test_tokenize_decode_dalle():
  model = _tiny_dalle()
  images = _rand((1, 32, 24, 3))
  variables = _params(model, images)
  ids = jax.jit(dvae.tokenize, static_argnums=0)(model, variables, images)
  assert ids.shape == (1, 4, 3) and ids.dtype == jnp.int32
  rec = jax.jit(dvae.decode, static_argnums=0)(model, variables, ids)
  assert rec.shape == (1, 32, 24, 3)


def test_generic_backend_path_matches_cpu_path(monkeypatch):
  """The plain XLA path (GPU/TPU) gives the CPU path's loss and gradients."""
  monkeypatch.setattr(ops, "cpu_kernels_enabled", lambda: True)
  model = _tiny_compact(recon_loss="logit_laplace", input_norm="dall_e")
  images = _rand((2, 8, 8, 3))
  variables = _params(model, images, bias_std=0.1)

  def loss_and_grads(v, x):
    return jax.value_and_grad(lambda p: dvae.elbo_loss(model, p, x, _key(2), 0.8, 1.5, True)[0])(v)

  def encoder_jaxpr():  # A new function each time: traced again.
    return str(jax.make_jaxpr(lambda v, x: model.apply(v, x, method="encode"))(variables, images))

  assert "_correlate_with_im2col_gradient" in encoder_jaxpr()
  cpu = _run_jit(lambda v, x: loss_and_grads(v, x), variables, images)
  monkeypatch.setattr(ops, "cpu_kernels_enabled", lambda: False)
  assert "_correlate_with_im2col_gradient" not in encoder_jaxpr()
  generic = _run_jit(lambda v, x: loss_and_grads(v, x), variables, images)
  for got, want in zip(jax.tree.leaves(generic), jax.tree.leaves(cpu)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Codebook diversity and k-means initialisation.
# ----------------------------------------------------------------------------


def test_elbo_adds_the_weighted_diversity_term():
  model = _tiny_compact()
  images = _rand((2, 8, 8, 3))
  variables = _params(model, images)
  run = functools.partial(_run_jit, functools.partial(dvae.elbo_loss, model, tau=1.0, beta=2.0))
  loss0, aux0 = run(variables, images, _key(1))
  loss1, aux1 = _run_jit(
    functools.partial(dvae.elbo_loss, model, tau=1.0, beta=2.0, diversity=0.5),
    variables,
    images,
    _key(1),
  )
  res = _apply(model, variables, images, rng=_key(1), tau=1.0)
  spread = codebook.diversity_loss(res["logits"])
  assert 0.0 < float(spread) < 1.0
  np.testing.assert_allclose(aux1["diversity_loss"], spread, rtol=1e-5)
  np.testing.assert_allclose(aux0["diversity_loss"], spread, rtol=1e-5)
  np.testing.assert_allclose(loss1 - loss0, 0.5 * spread, rtol=1e-4)


def test_kmeans_logits_init_makes_argmax_the_nearest_centroid():
  model = _tiny_compact()  # vocab 32, hidden 16, 8x8 -> 2x2 codes.
  images = _rand((16, 8, 8, 3), seed=3)
  variables = _params(model, images)
  before = np.asarray(_apply(model, variables, images, method="encode"))
  params = jax.jit(lambda p, x, r: dvae.kmeans_logits_init(model, p, x, r))(
    variables["params"], images, _key(2)
  )
  # Only the encoder's output layer changes.
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), variables["params"], params)
  flat = flax.traverse_util.flatten_dict(changed, sep="/")
  assert {k for k, v in flat.items() if v} == {"encoder/output/w", "encoder/output/b"}
  feats = np.asarray(_apply(model, {"params": params}, images, method="encode_features"))
  logits = np.asarray(_apply(model, {"params": params}, images, method="encode"))
  w = np.asarray(params["encoder"]["output"]["w"])[0, 0]  # (hidden, V)
  b = np.asarray(params["encoder"]["output"]["b"])
  np.testing.assert_allclose(logits, feats @ w + b, rtol=1e-4, atol=1e-4)
  # w_v = 2 s c_v and b_v = -s |c_v|^2 with one scale s > 0: recover s and the centroids.
  scale = -(w**2).sum(0) / (4 * b)
  np.testing.assert_allclose(scale, scale[0], rtol=1e-4)
  assert scale[0] > 0
  centroids = (w / (2 * scale)).T  # (V, hidden)
  dist = ((feats.reshape(-1, 1, 16) - centroids[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(logits.reshape(-1, 32).argmax(-1), dist.argmin(-1))
  # 64 feature vectors for 32 codes: k-means gives every code a position; random init did not.
  assert len(np.unique(logits.argmax(-1))) == 32
  assert len(np.unique(before.argmax(-1))) < 32


def test_restart_dead_codes_splits_busy_codes_into_the_dead_ones():
  model = _tiny_compact()  # vocab 32, hidden 16, 8x8 -> 2x2 codes.
  images = _rand((16, 8, 8, 3), seed=4)
  params = _params(model, images)["params"]
  out = params["encoder"]["output"]  # Codes 20..31 made dead: their logits far below.
  bias = np.asarray(out["b"]).copy()
  bias[20:] -= 30.0
  params = {**params, "encoder": {**params["encoder"], "output": {**out, "b": bias}}}
  res = _apply(model, {"params": params}, images, rng=_key(1), tau=1.0)
  probs = np.asarray(jax.nn.softmax(res["logits"], -1)).reshape(-1, 32)
  ids = probs.argmax(-1).astype(np.int32)
  mean_probs = probs.mean(0)
  below = 0.5  # Codes under half a uniform share are dead.
  dead = mean_probs < below / 32
  assert dead[20:].all() and 0 < dead.sum() < 32
  new, count = jax.jit(dvae.restart_dead_codes, static_argnums=(4,))(
    params, mean_probs, ids, _key(5), below
  )
  assert int(count) == dead.sum()
  w0, b0 = (np.asarray(params["encoder"]["output"][k]) for k in ("w", "b"))
  w1, b1 = (np.asarray(new["encoder"]["output"][k]) for k in ("w", "b"))
  c0, c1 = np.asarray(params["decoder"]["codebook"]), np.asarray(new["decoder"]["codebook"])
  # Live codes keep their rows; nothing outside the three code-indexed arrays changes.
  np.testing.assert_array_equal(w1[..., ~dead], w0[..., ~dead])
  np.testing.assert_array_equal(b1[~dead], b0[~dead])
  np.testing.assert_array_equal(c1[~dead], c0[~dead])
  rest = flax.traverse_util.flatten_dict(
    jax.tree.map(lambda a, b: bool(np.any(a != b)), params, new)
  )
  assert {k for k, v in rest.items() if v} == {
    ("encoder", "output", "w"),
    ("encoder", "output", "b"),
    ("decoder", "codebook"),
  }
  # Each dead code is a copy of a code that won somewhere in the batch: the same bias and
  # codebook row, weights within 1% noise.
  used = set(np.unique(ids))
  for v in np.flatnonzero(dead):
    (donor,) = [u for u in used if b0[u] == b1[v] and np.array_equal(c0[u], c1[v])][:1]
    np.testing.assert_allclose(w1[..., v], w0[..., donor], rtol=0.05, atol=1e-6)
    assert not np.array_equal(w1[..., v], w0[..., donor])
  # Below 0 nothing is dead.
  same, none = dvae.restart_dead_codes(params, jnp.asarray(mean_probs), ids, _key(5), 0.0)
  assert int(none) == 0
  chex.assert_trees_all_equal(same, params)
