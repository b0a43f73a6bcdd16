"""Transformer nonlinearities (GELU, softmax, LayerNorm, broadcast bias add) and the one switch
for the package's CPU-only code paths, `cpu_kernels_enabled()`.

`cpu_kernels_enabled()` is True when JAX's default backend is XLA:CPU. It is read while
tracing (a Python bool, no runtime cost) and selects every kernel that was written for, and
measured on, XLA:CPU: the backward passes below and the dVAE's convolution forms
(`beit_jax.models.conv`). On GPU/TPU the plain JAX forms run, so XLA's fusions apply.

On CPU the functions here have the same values as `jax.nn.gelu(approximate=False)`,
`jax.nn.softmax` and `flax.linen.LayerNorm` (to float rounding), with backward passes
written as the closed forms PyTorch uses instead of what autodiff derives from the forward:

* `gelu`: x·Φ(x) with Φ from `erf` (torch's formula); d/dx = Φ(x) + x·φ(x). `jax.nn.gelu`
  goes through `erfc`, whose two-branch polynomial and its derivative cost several
  elementwise passes per MLP activation.
* `softmax`: backward y·(g − Σ g·y) from the saved output, instead of differentiating
  exp(x − max) / Σ exp through the division.
* `layer_norm`: two-pass statistics in float32; backward
  (ĝ − mean ĝ − x̂·mean(ĝ·x̂)) / σ with ĝ = g·scale, from the saved x̂ and 1/σ.
* `add_broadcast`: the bias gradient as a ones-matvec (`sum_leading`).

With the head-major attention layout they cut XLA:CPU's MIM train step time by 11-14%
(benchmarks/mim_step_vs_timm.py, README "Speed on CPU").
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp

Array = jax.Array

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


_TARGET_PLATFORM: list[str | None] = [None]  # Set while compiling for another platform.


def platform() -> str:
  """The platform traces are for ('cpu', 'gpu', 'tpu'): the default backend's, or the one
  `compiling_for` names (ahead-of-time compilation for a TPU on a CPU host must trace the
  TPU's ops). Read at trace time."""
  return _TARGET_PLATFORM[0] or jax.default_backend()


def cpu_kernels_enabled() -> bool:
  """True on XLA:CPU: selects the CPU-measured kernels (read at trace time, `platform`)."""
  return platform() == "cpu"


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
  """Traces inside this context choose the kernels of `platform` ('cpu', 'tpu', 'gpu')."""
  previous = _TARGET_PLATFORM[0]
  _TARGET_PLATFORM[0] = platform
  try:
    yield
  finally:
    _TARGET_PLATFORM[0] = previous


def gelu(x: Array) -> Array:
  """Exact (erf) GELU, x·Φ(x)."""
  # CPU: erf form with its closed-form derivative, fewer elementwise passes than autodiff of
  # jax.nn.gelu's erfc; elsewhere XLA fuses jax.nn.gelu's elementwise graph into one kernel.
  if cpu_kernels_enabled():
    return _gelu_erf(x)
  return jax.nn.gelu(x, approximate=False)


@jax.custom_jvp
def _gelu_erf(x: Array) -> Array:
  """x·0.5·(1 + erf(x/√2)), like torch."""
  return x * (0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF)))


@_gelu_erf.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  cdf = 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))
  pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
  return x * cdf, dx * (cdf + x * pdf)


def softmax(x: Array) -> Array:
  """Softmax over the last axis."""
  # CPU: backward from the saved output, measured faster on XLA:CPU than autodiff through the
  # division; elsewhere jax.nn.softmax, whose forward and backward XLA fuses.
  if cpu_kernels_enabled():
    return _softmax_closed_form_vjp(x)
  return jax.nn.softmax(x, axis=-1)


@jax.custom_vjp
def _softmax_closed_form_vjp(x: Array) -> Array:
  return _softmax(x)


def _softmax(x: Array) -> Array:
  e = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))
  return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_fwd(x):
  y = _softmax(x)
  return y, y


def _softmax_bwd(y, g):
  return (y * (g - jnp.sum(g * y, axis=-1, keepdims=True)),)


_softmax_closed_form_vjp.defvjp(_softmax_fwd, _softmax_bwd)


def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
  """LayerNorm over the last axis, statistics in float32, output in x's dtype."""
  # CPU: closed-form backward from the saved x̂ and 1/σ (measured faster on XLA:CPU);
  # elsewhere autodiff of the same float32 forward, which XLA fuses into a few kernels.
  if cpu_kernels_enabled():
    return _layer_norm_closed_form_vjp(x, scale, bias, eps)
  return _layer_norm_fwd(x, scale, bias, eps)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_closed_form_vjp(x: Array, scale: Array, bias: Array, eps: float) -> Array:
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
  dx = inv_std * (
    g_hat
    - jnp.mean(g_hat, axis=-1, keepdims=True)
    - x_hat * jnp.mean(g_hat * x_hat, axis=-1, keepdims=True)
  )
  return dx.astype(x_dtype), d_scale, d_bias


_layer_norm_closed_form_vjp.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def sum_leading(x: Array, num_axes: int) -> Array:
  """Sum over the first `num_axes` axes, as ones @ x.reshape(rows, -1): XLA:CPU runs this
  as a matrix-vector product, many times faster than its reduce over leading axes."""
  rows = math.prod(x.shape[:num_axes])
  ones = jnp.ones((1, rows), x.dtype)
  out = jnp.matmul(ones, x.reshape(rows, -1), preferred_element_type=jnp.float32)
  return out.reshape(x.shape[num_axes:])


def add_broadcast(x: Array, bias: Array) -> Array:
  """x + bias, bias broadcast over x's leading axes (cast to x's dtype)."""
  # CPU: the bias gradient as a ones-matvec, many times faster than XLA:CPU's reduce over
  # leading axes; elsewhere the plain add, whose reduction XLA runs natively and fuses.
  if cpu_kernels_enabled():
    return _add_broadcast_matvec_vjp(x, bias)
  return x + bias.astype(x.dtype)


@jax.custom_vjp
def _add_broadcast_matvec_vjp(x: Array, bias: Array) -> Array:
  return x + bias.astype(x.dtype)


def _add_broadcast_fwd(x, bias):
  return x + bias.astype(x.dtype), bias


def _add_broadcast_bwd(bias, g):
  return g, sum_leading(g, g.ndim - bias.ndim).astype(bias.dtype)


_add_broadcast_matvec_vjp.defvjp(_add_broadcast_fwd, _add_broadcast_bwd)
