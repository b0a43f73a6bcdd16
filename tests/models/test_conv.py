"""Tests for beit_jax.models.conv: the CPU kernels equal XLA's convolutions, the layers.

`_torch_state_dict` and `_np_conv` (torch's conv2d in numpy) also serve
test_dvae_dalle.py and test_dvae_compact.py.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beit_jax.models import conv, ops
from tests.models.test_dvae import _apply, _params, _randn


def _torch_state_dict(flax_params) -> dict[str, np.ndarray]:
  """Flax tree -> DALL-E-style state dict (dotted keys, OIHW weights)."""
  out = {}
  for path, v in flax.traverse_util.flatten_dict(flax_params).items():
    v = np.asarray(v, np.float64)
    out[".".join(path)] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v
  return out


def _np_conv(x, sd, key):
  """torch F.conv2d(x, w, b, padding=(k-1)//2) in numpy, NCHW."""
  w, b = sd[key + ".w"], sd[key + ".b"]
  k = w.shape[-1]
  p = (k - 1) // 2
  n, _, h, wd = x.shape
  xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
  y = np.zeros((n, w.shape[0], h, wd))
  for i in range(k):
    for j in range(k):
      y += np.einsum("nchw,oc->nohw", xp[:, :, i : i + h, j : j + wd], w[:, :, i, j])
  return y + b[None, :, None, None]


def test_conv_transpose_matches_torch_scatter_definition():
  # torch ConvTranspose2d(k=4, s=2, padding=1): out[s*i + a - p] += x[i] W[a],
  # with W the stored kernel flipped spatially.
  layer = conv.ConvTranspose2d(5, 4, 2)
  x = _randn((2, 3, 2, 3))
  variables = _params(layer, x, bias_std=0.1)
  got = np.asarray(_apply(layer, variables, x))
  w = np.asarray(variables["params"]["w"], np.float64)[::-1, ::-1]
  xn = np.asarray(x, np.float64)
  want = np.zeros((2, 6, 4, 5))
  for i in range(3):
    for j in range(2):
      for a in range(4):
        for b in range(4):
          m, n = 2 * i + a - 1, 2 * j + b - 1
          if 0 <= m < 6 and 0 <= n < 4:
            want[:, m, n] += xn[:, i, j] @ w[a, b]
  want += np.asarray(variables["params"]["b"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,s,pad", [(1, 1, 0), (3, 1, 1), (4, 2, 1), (7, 1, 3), (4, 2, 0)])
def test_matmul_correlate_equals_xla_conv(k, s, pad):
  rng = np.random.default_rng(k * 10 + s)
  x = jnp.asarray(rng.normal(size=(2, 9, 10, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 5, 6)), jnp.float32)
  padding = ((pad, pad), (pad, pad))
  expected = jax.lax.conv_general_dilated(
    x, w, (s, s), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  np.testing.assert_allclose(conv.correlate(x, w, s, padding), expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
    conv._im2col_correlate(x, w, s, padding), expected, rtol=1e-4, atol=1e-4
  )
  # The gradient (im2col's on CPU) equals XLA's convolution gradient.
  cot = jnp.asarray(rng.normal(size=expected.shape), jnp.float32)

  def grads(fn):
    return jax.grad(lambda a, b: jnp.sum(fn(a, b) * cot), argnums=(0, 1))(x, w)

  def xla(a, b):
    return jax.lax.conv_general_dilated(
      a, b, (s, s), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  for got, want in zip(grads(lambda a, b: conv.correlate(a, b, s, padding)), grads(xla)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("k,s", [(4, 2), (2, 2), (3, 1), (6, 2), (8, 4)])
def test_subpixel_transposed_correlate_equals_xla(k, s):
  pad = k - 1 - (k - s) // 2
  rng = np.random.default_rng(k + s)
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 4, 3)), jnp.float32)
  expected = jax.lax.conv_transpose(
    x, w, (s, s), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  got = conv.transposed_correlate(x, w, s, pad)
  assert got.shape == expected.shape == (2, 5 * s, 7 * s, 3)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _conv_cases():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 10, 5)), jnp.float32)
  w3 = jnp.asarray(rng.normal(size=(3, 3, 5, 6)), jnp.float32)
  w4 = jnp.asarray(rng.normal(size=(4, 4, 5, 3)), jnp.float32)
  return {
    "correlate": (lambda a, b: conv.correlate(a, b, 2, ((1, 1), (1, 1))), x, w3),
    "transposed": (lambda a, b: conv.transposed_correlate(a, b, 2, 2), x, w4),
  }


@pytest.mark.parametrize("case", ["correlate", "transposed"])
def test_backend_switch_selects_the_cpu_kernels_and_the_xla_ones_agree(case, monkeypatch):
  fn, x, w = _conv_cases()[case]
  cot = jnp.asarray(
    np.random.default_rng(1).normal(size=jax.eval_shape(fn, x, w).shape), jnp.float32
  )

  def value_and_grads(f):
    return jax.value_and_grad(lambda a, b: jnp.sum(f(a, b) * cot), argnums=(0, 1))(x, w)

  monkeypatch.setattr(ops, "cpu_kernels_enabled", lambda: True)  # What CPU selects.
  cpu_jaxpr = str(jax.make_jaxpr(lambda a, b: fn(a, b))(x, w))
  cpu = value_and_grads(lambda a, b: fn(a, b))
  if case == "correlate":
    assert "_correlate_with_im2col_gradient" in cpu_jaxpr
  else:
    assert "lhs_dilation=(2, 2)" not in cpu_jaxpr  # Sub-pixel form, no dilated input.
  monkeypatch.setattr(ops, "cpu_kernels_enabled", lambda: False)
  xla_jaxpr = str(jax.make_jaxpr(lambda a, b: fn(a, b))(x, w))
  assert "_correlate_with_im2col_gradient" not in xla_jaxpr
  if case == "transposed":
    assert "lhs_dilation=(2, 2)" in xla_jaxpr  # lax.conv_transpose.
  xla = value_and_grads(lambda a, b: fn(a, b))
  for got, want in zip(jax.tree.leaves(xla), jax.tree.leaves(cpu)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
