"""Tests for beit_jax.models.attention: the dot_product path equals the einsum one (forward
and gradients, float32 on CPU), 'auto' resolves as documented, bad values fail early.

Programs are compiled without XLA's LLVM optimisation (as in test_vit.py): on this CPU
jaxlib it costs seconds per tiny backward pass.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beit_jax.models import attention, ops, vit

TINY = dict(image_size=16, patch_size=4)  # 4x4 grid: 17 tokens (odd, as BEiT's 197).
VOCAB = 32
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=_FAST_COMPILE)(*args)


def _random_params(model: vit.BEiT, seed: int = 0, scale: float = 0.3):
  """Every leaf random (zeros at init would hide the rel-pos tables and q/v biases)."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(vit.abstract_params(model), sep="/")
  out = {}
  for name, leaf in flat.items():
    value = scale * rng.standard_normal(leaf.shape)
    out[name] = jnp.asarray(1.0 + value if name.endswith("scale") else value, jnp.float32)
  return flax.traverse_util.unflatten_dict(out, sep="/")


def _close(a, b, tol=1e-5):
  """Every leaf of `a` within `tol` of `b`'s, relative to that leaf's largest entry (float32
  sums in another order differ by ~1e-6 of the scale, not of each small entry)."""

  def check(x, y):
    scale = max(float(np.abs(y).max()), 1.0)
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol * scale)

  jax.tree.map(check, a, b)


CASES = {
  # MIM model with the shared rel-pos bias and the mask token (pretraining).
  "mim_shared_bias": lambda **kw: vit.mim_model("test", vocab_size=VOCAB, **TINY, **kw),
  # MIM model with one rel-pos table per block.
  "mim_per_layer_bias": lambda **kw: vit.mim_model(
    "test",
    vocab_size=VOCAB,
    use_shared_rel_pos_bias=False,
    use_rel_pos_bias=True,
    **TINY,
    **kw,
  ),
  # No relative position bias at all (absolute positions instead).
  "mim_no_bias": lambda **kw: vit.mim_model(
    "test",
    vocab_size=VOCAB,
    use_shared_rel_pos_bias=False,
    use_abs_pos_emb=True,
    **TINY,
    **kw,
  ),
  # Fine-tuning classifier: per-block tables, no mask token.
  "classifier_per_layer_bias": lambda **kw: vit.classifier_model("test", 5, **TINY, **kw),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dot_product_equals_einsum_forward_and_gradients(case):
  einsum = CASES[case](attention="einsum")
  dot = CASES[case](attention="dot_product")
  params = _random_params(einsum)
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
  mask = np.zeros((2, 16), bool)
  mask[0, [1, 4, 5, 10]] = mask[1, [0, 2, 7, 8]] = True
  positions = jnp.asarray(np.stack([np.flatnonzero(m) for m in mask]), jnp.int32)
  mim = einsum.vocab_size > 0

  def outputs(model):
    def f(p, x):
      if mim:  # Masked input: the mask token path, logits at the masked positions.
        return model.apply({"params": p}, x, jnp.asarray(mask), positions, train=False)
      return model.apply({"params": p}, x, train=False)

    def loss(p, x):  # A fixed random cotangent: every output weighed differently.
      out = f(p, x)
      cotangent = np.random.default_rng(5).standard_normal(out.shape)
      return jnp.sum(out * jnp.asarray(cotangent, jnp.float32))

    return f, jax.grad(loss, argnums=(0, 1))

  def both(p, x):
    (f_e, g_e), (f_d, g_d) = outputs(einsum), outputs(dot)
    return (f_e(p, x), g_e(p, x)), (f_d(p, x), g_d(p, x))

  (out_e, grads_e), (out_d, grads_d) = _run(both, params, images)
  assert out_e.shape == ((2, 4, VOCAB) if mim else (2, 5))
  _close(out_d, out_e)
  _close(grads_d, grads_e)  # w.r.t. every param (rel-pos tables included) and the input.
  assert float(jnp.abs(grads_e[1]).max()) > 0


def test_dot_product_bfloat16_close_to_einsum():
  einsum = CASES["mim_shared_bias"](attention="einsum", dtype=jnp.bfloat16)
  dot = einsum.clone(attention="dot_product")
  params = _random_params(einsum)
  images = jnp.asarray(np.random.default_rng(2).standard_normal((2, 16, 16, 3)), jnp.float32)
  out_e, out_d = _run(
    lambda p, x: tuple(m.apply({"params": p}, x) for m in (einsum, dot)), params, images
  )
  assert out_d.dtype == jnp.float32
  np.testing.assert_allclose(out_d, out_e, atol=0.1 * float(jnp.abs(out_e).max()))


@pytest.mark.parametrize("with_bias", [True, False])
def test_pad_to_even_changes_nothing(with_bias):
  # cuDNN's padding (one masked token for an odd length), checked here with XLA's kernel.
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 17, 3, 8)), jnp.float32) for _ in range(3))
  bias = jnp.asarray(rng.standard_normal((3, 17, 17)), jnp.float32) if with_bias else None

  def run(pad):
    def loss(q, k, v, bias):
      out = attention.dot_product_attention(q, k, v, bias, 0.35, "xla", pad=pad)
      return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape)))

    argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
    return jax.value_and_grad(loss, argnums=argnums)(q, k, v, bias)

  padded, plain = _run(lambda: (run(True), run(False)))
  _close(padded, plain)


def test_auto_resolves_as_documented():
  for dtype in (jnp.float32, jnp.bfloat16):
    assert attention.resolve("auto", dtype, 64) == "einsum"  # CPU: measured.
    assert attention.resolve("auto", dtype, 64, platform="tpu") == "einsum"
    assert attention.resolve("dot_product", dtype, 64) == "xla"
    assert attention.resolve("einsum", dtype, 64, platform="gpu") == "einsum"
    assert attention.resolve("dot_product_cudnn", dtype, 64) == "cudnn"  # Forced.
    assert attention.resolve("dot_product_xla", dtype, 64, platform="gpu") == "xla"
  # GPU: cuDNN's kernel where it takes the case, else XLA's.
  assert attention.resolve("auto", jnp.bfloat16, 64, platform="gpu") == "cudnn"
  assert attention.resolve("auto", jnp.float16, 64, platform="gpu") == "cudnn"
  assert attention.resolve("auto", jnp.float32, 64, platform="gpu") == "xla"
  assert attention.resolve("auto", jnp.bfloat16, 12, platform="gpu") == "xla"
  with ops.compiling_for("gpu"):  # The platform is read at trace time.
    assert attention.resolve("auto", jnp.bfloat16, 64) == "cudnn"
  assert ops.platform() == "cpu"


def test_auto_traces_the_einsum_program_on_cpu():
  images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  model = CASES["mim_shared_bias"]()
  assert model.attention == "auto"
  params = vit.abstract_params(model)

  def jaxpr(m):
    return str(jax.make_jaxpr(lambda p, x: m.apply({"params": p}, x))(params, images))

  auto, einsum = jaxpr(model), jaxpr(model.clone(attention="einsum"))
  assert auto == einsum and auto != jaxpr(model.clone(attention="dot_product"))


def test_intermediates_use_einsum_whatever_the_option():
  # beit_jax.viz reads the sown attention maps: they exist with attention='dot_product'.
  einsum = CASES["mim_shared_bias"](attention="einsum")
  dot = einsum.clone(attention="dot_product")
  params = _random_params(einsum)
  images = jnp.asarray(np.random.default_rng(4).standard_normal((1, 16, 16, 3)), jnp.float32)

  def maps(m):
    def f(p, x):
      _, state = m.apply({"params": p}, x, method=vit.BEiT.encode, mutable=["intermediates"])
      return state["intermediates"]["blocks_1"]["attn"]["attention"][0]

    return f

  got, want = _run(lambda p, x: (maps(dot)(p, x), maps(einsum)(p, x)), params, images)
  assert got.shape == (1, 2, 17, 17)
  np.testing.assert_array_equal(got, want)


def test_bad_value_fails_at_construction():
  with pytest.raises(ValueError, match="choose one of auto, einsum, dot_product") as e:
    vit.mim_model("test", attention="flash")
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="attention='cudnn'"):
    attention.resolve("cudnn", jnp.bfloat16, 64)


def test_cudnn_refused_while_tracing_falls_back_unless_forced():
  # No cuDNN on this CPU: 'dot_product' (strict=False) runs XLA's kernel, the forced one raises.
  rng = np.random.default_rng(6)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 5, 2, 8)), jnp.bfloat16) for _ in range(3))
  bias = jnp.asarray(rng.standard_normal((2, 5, 5)), jnp.float32)
  got = attention.dot_product_attention(q, k, v, bias, 0.35, "cudnn", strict=False)
  want = attention.dot_product_attention(q, k, v, bias, 0.35, "xla")
  np.testing.assert_array_equal(got, want)
  with pytest.raises(RuntimeError, match="cuDNN"):
    attention.dot_product_attention(q, k, v, bias, 0.35, "cudnn", strict=True)
