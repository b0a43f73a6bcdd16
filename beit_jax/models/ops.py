"""Transformer nonlinearities with hand-written gradients (GELU, softmax, LayerNorm, bias).

Same values as `jax.nn.gelu(approximate=False)`, `jax.nn.softmax` and `flax.linen.LayerNorm`
(to float rounding), but with backward passes written as the closed forms PyTorch uses
instead of what autodiff derives from the forward graph:

* `gelu`: x·Φ(x) with Φ from `erf` (torch's formula); d/dx = Φ(x) + x·φ(x). `jax.nn.gelu`
  goes through `erfc`, whose two-branch polynomial and its derivative cost several
  elementwise passes per MLP activation.
* `softmax`: backward y·(g − Σ g·y) from the saved output, instead of differentiating
  exp(x − max) / Σ exp through the division.
* `layer_norm`: two-pass statistics in float32; backward
  (ĝ − mean ĝ − x̂·mean(ĝ·x̂)) / σ with ĝ = g·scale, from the saved x̂ and 1/σ.

With `add_broadcast` (the attention bias's gradient as a ones-matvec) and the head-major
attention layout they cut XLA:CPU's MIM train step time by 11-14%
(benchmarks/mim_step_vs_timm.py, README "Speed on CPU"); on GPU/TPU they give the same
values, their speed there is not measured yet.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_jvp
def gelu(x: Array) -> Array:
  """Exact (erf) GELU, x·Φ(x), computed as x·0.5·(1 + erf(x/√2)) like torch."""
  return x * (0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF)))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  cdf = 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))
  pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
  return x * cdf, dx * (cdf + x * pdf)


@jax.custom_vjp
def softmax(x: Array) -> Array:
  """Softmax over the last axis."""
  return _softmax(x)


def _softmax(x: Array) -> Array:
  e = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))
  return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_fwd(x):
  y = _softmax(x)
  return y, y


def _softmax_bwd(y, g):
  return (y * (g - jnp.sum(g * y, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
  """LayerNorm over the last axis, statistics in float32, output in x's dtype."""
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _normalize(x: Array, eps: float) -> tuple[Array, Array]:
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centred = x - mean
  inv_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
  return centred * inv_std, inv_std


def _layer_norm_fwd(x, scale, bias, eps):
  x_hat, inv_std = _normalize(x, eps)
  y = (x_hat * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
  return y, (x_hat, inv_std, scale, bias)


def _layer_norm_bwd(eps, res, g):
  del eps
  x_hat, inv_std, scale, bias = res
  x_dtype = g.dtype  # y, hence its cotangent, has x's dtype.
  g = g.astype(jnp.float32)
  axes = tuple(range(g.ndim - 1))
  d_scale = jnp.sum(g * x_hat, axis=axes).astype(scale.dtype)
  d_bias = jnp.sum(g, axis=axes).astype(bias.dtype)
  g_hat = g * scale.astype(jnp.float32)
  dx = inv_std * (g_hat - jnp.mean(g_hat, axis=-1, keepdims=True)
                  - x_hat * jnp.mean(g_hat * x_hat, axis=-1, keepdims=True))
  return dx.astype(x_dtype), d_scale, d_bias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def sum_leading(x: Array, num_axes: int) -> Array:
  """Sum over the first `num_axes` axes, as ones @ x.reshape(rows, -1): XLA:CPU runs this
  as a matrix-vector product, many times faster than its reduce over leading axes."""
  rows = math.prod(x.shape[:num_axes])
  ones = jnp.ones((1, rows), x.dtype)
  out = jnp.matmul(ones, x.reshape(rows, -1), preferred_element_type=jnp.float32)
  return out.reshape(x.shape[num_axes:])


@jax.custom_vjp
def add_broadcast(x: Array, bias: Array) -> Array:
  """x + bias, bias broadcast over x's leading axes; its gradient via `sum_leading`."""
  return x + bias.astype(x.dtype)


def _add_broadcast_fwd(x, bias):
  return add_broadcast(x, bias), bias


def _add_broadcast_bwd(bias, g):
  return g, sum_leading(g, g.ndim - bias.ndim).astype(bias.dtype)


add_broadcast.defvjp(_add_broadcast_fwd, _add_broadcast_bwd)

