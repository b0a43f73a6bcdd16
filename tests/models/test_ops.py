"""The hand-written gradients equal autodiff of the plain formulas (and torch's GELU); the
backend switch selects them on CPU, and the plain forms it selects elsewhere agree."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from beit_jax.models import ops


def _x(shape, seed=0, scale=3.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale)


def _grads(f, *args):
  """Gradients of sum(f(*args) * w) for a fixed random w (a non-trivial cotangent)."""
  w = _x(jax.eval_shape(f, *args).shape, seed=7, scale=1.0)
  return jax.grad(
    lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w), argnums=tuple(range(len(args)))
  )(*args)


def test_gelu_values_and_gradient_match_the_erf_formula_and_torch():
  x = _x((64, 96))
  np.testing.assert_allclose(ops.gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
  expected = torch.nn.functional.gelu(torch.from_numpy(np.array(x))).numpy()
  np.testing.assert_allclose(ops.gelu(x), expected, atol=1e-6)
  (got,), (ref,) = _grads(ops.gelu, x), _grads(lambda v: jax.nn.gelu(v, approximate=False), x)
  np.testing.assert_allclose(got, ref, atol=2e-6)
  # Second derivative (jvp of the custom jvp) stays usable.
  second = jax.grad(lambda v: jax.grad(lambda u: ops.gelu(u).sum())(v).sum())(x)
  assert np.isfinite(np.asarray(second)).all()


def test_softmax_values_and_gradient():
  x = _x((2, 3, 17, 17))
  np.testing.assert_allclose(ops.softmax(x), jax.nn.softmax(x, axis=-1), atol=1e-7)
  (got,), (ref,) = _grads(ops.softmax, x), _grads(lambda v: jax.nn.softmax(v, axis=-1), x)
  np.testing.assert_allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_flax_layernorm_values_and_gradients(dtype):
  x = (_x((4, 9, 32)) + 5.0).astype(dtype)  # an offset mean exercises the centring.
  scale, bias = _x((32,), 1, 0.5) + 1.0, _x((32,), 2, 0.5)
  ref_ln = nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32)
  params = {"params": {"scale": scale, "bias": bias}}

  def ref(v, s, b):
    return ref_ln.apply({"params": {"scale": s, "bias": b}}, v)

  def ours(v, s, b):
    return ops.layer_norm(v, s, b, 1e-6)

  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(
    np.asarray(ours(x, scale, bias), np.float32),
    np.asarray(ref_ln.apply(params, x), np.float32),
    atol=tol,
  )
  for got, want in zip(_grads(ours, x, scale, bias), _grads(ref, x, scale, bias)):
    assert got.dtype == want.dtype
    np.testing.assert_allclose(
      np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol * 10, rtol=tol
    )


def test_add_broadcast_gradient_sums_the_leading_axes():
  x, bias = _x((5, 3, 7, 7)), _x((3, 7, 7), 1)
  np.testing.assert_array_equal(ops.add_broadcast(x, bias), x + bias[None])
  got = _grads(ops.add_broadcast, x, bias)
  ref = _grads(lambda a, b: a + b[None], x, bias)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(g, r, atol=1e-5)
  np.testing.assert_allclose(ops.sum_leading(x, 2), x.sum((0, 1)), atol=1e-5)


def test_cpu_kernels_enabled_follows_the_default_backend():
  assert ops.cpu_kernels_enabled() == (jax.default_backend() == "cpu")
  assert isinstance(ops.cpu_kernels_enabled(), bool)  # A Python bool: decided while tracing.


# (name of the CPU kernel in the jaxpr, function, its arguments, value atol; 10x for grads).
def _switch_cases():
  x_ln = _x((4, 9, 32)) + 5.0
  ln_args = (x_ln, _x((32,), 1, 0.5) + 1.0, _x((32,), 2, 0.5))
  return {
    "gelu": ("_gelu_erf", ops.gelu, (_x((64, 96)),), 2e-6),
    "softmax": ("_softmax_closed_form_vjp", ops.softmax, (_x((2, 3, 17, 17)),), 1e-6),
    "layer_norm": (
      "_layer_norm_closed_form_vjp",
      lambda v, s, b: ops.layer_norm(v, s, b, 1e-6),
      ln_args,
      1e-5,
    ),
    "layer_norm_bf16": (
      "_layer_norm_closed_form_vjp",
      lambda v, s, b: ops.layer_norm(v, s, b, 1e-6),
      (x_ln.astype(jnp.bfloat16),) + ln_args[1:],
      3e-2,
    ),
    "add_broadcast": (
      "_add_broadcast_matvec_vjp",
      ops.add_broadcast,
      (_x((5, 3, 7, 7)), _x((3, 7, 7), 1)),
      1e-5,
    ),
  }


@pytest.mark.parametrize(
  "case", ["gelu", "softmax", "layer_norm", "layer_norm_bf16", "add_broadcast"]
)
def test_backend_switch_selects_the_cpu_kernels_and_the_plain_forms_agree(case, monkeypatch):
  kernel, f, args, atol = _switch_cases()[case]
  monkeypatch.setattr(ops, "cpu_kernels_enabled", lambda: True)  # What CPU selects.
  assert kernel in str(jax.make_jaxpr(lambda *a: f(*a))(*args))
  cpu_value, cpu_grads = f(*args), _grads(lambda *a: f(*a), *args)
  monkeypatch.setattr(ops, "cpu_kernels_enabled", lambda: False)
  assert kernel not in str(jax.make_jaxpr(lambda *a: f(*a))(*args))
  value, grads = f(*args), _grads(lambda *a: f(*a), *args)
  assert value.dtype == cpu_value.dtype
  np.testing.assert_allclose(
    np.asarray(value, np.float32), np.asarray(cpu_value, np.float32), atol=atol
  )
  for got, want in zip(grads, cpu_grads):
    assert got.dtype == want.dtype
    np.testing.assert_allclose(
      np.asarray(got, np.float32),
      np.asarray(want, np.float32),
      atol=atol * 10,
      rtol=3e-2 if case.endswith("bf16") else 1e-5,
    )
