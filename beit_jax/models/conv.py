"""Convolutions of the dVAEs (NHWC activations, HWIO kernels): the kernels and two Linen layers.

Kernels:

* `correlate`: cross-correlation, what `lax.conv_general_dilated` computes. On XLA:CPU its
  gradient is computed as patch extraction + one matmul ("im2col"), while the forward stays
  XLA's convolution: XLA:CPU runs convolution gradients far below matmul speed (a 3x3,
  64-channel conv at 32x32 trains about 4x slower than the same maths as a matmul), but its
  forward convolution is faster than im2col (the frozen tokenizer of the MIM step runs 1.4x
  faster with it).
* `transposed_correlate`: `lax.conv_transpose`; on XLA:CPU computed as a sub-pixel stride-1
  correlation + depth-to-space.

Both are the same linear maps as XLA's convolutions (tests/models/test_conv.py compares them);
`ops.cpu_kernels_enabled()` picks the CPU forms while tracing, and on GPU/TPU the XLA
convolutions run unchanged.

Layers: `Conv2d` (DALL-E's square "same" convolution, parameters `w` HWIO and `b`) and
`ConvTranspose2d` (PyTorch ``ConvTranspose2d(k, s, padding=(k-s)//2)``, as in lucidrains'
``DiscreteVAE``), both with float32 parameters and a configurable computation dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beit_jax.models import ops

Array = jax.Array
Dtype = Any
Padding = tuple[tuple[int, int], tuple[int, int]]

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def correlate(x: Array, w: Array, strides: int, padding: Padding) -> Array:
  """Cross-correlation of NHWC `x` with HWIO `w` (what `lax.conv` computes)."""
  kh, kw = w.shape[:2]
  if kh == kw == 1 and strides == 1 and padding == ((0, 0), (0, 0)):
    return jnp.einsum("bhwc,co->bhwo", x, w[0, 0])
  if not ops.cpu_kernels_enabled():
    return _xla_correlate(x, w, strides, padding)
  return _correlate_with_im2col_gradient(x, w, strides, padding)


def _xla_correlate(x: Array, w: Array, strides: int, padding: Padding) -> Array:
  return jax.lax.conv_general_dilated(
    x, w, window_strides=(strides, strides), padding=padding, dimension_numbers=_DIMENSIONS
  )


def _im2col_correlate(x: Array, w: Array, strides: int, padding: Padding) -> Array:
  """`correlate` as patch extraction + one matmul."""
  kh, kw = w.shape[:2]
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  ho = (xp.shape[1] - kh) // strides + 1
  wo = (xp.shape[2] - kw) // strides + 1
  cols = [
    xp[:, i : i + strides * (ho - 1) + 1 : strides, j : j + strides * (wo - 1) + 1 : strides, :]
    for i in range(kh)
    for j in range(kw)
  ]
  patches = jnp.concatenate(cols, axis=-1)  # (B, ho, wo, kh*kw*C), tap-major.
  return jnp.einsum("bhwk,ko->bhwo", patches, w.reshape(-1, w.shape[-1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _correlate_with_im2col_gradient(x: Array, w: Array, strides: int, padding: Padding) -> Array:
  """XLA's convolution forward with im2col's gradient (both the faster one on XLA:CPU)."""
  return _xla_correlate(x, w, strides, padding)


def _correlate_fwd(x, w, strides, padding):
  return _xla_correlate(x, w, strides, padding), (x, w)


def _correlate_bwd(strides, padding, residuals, g):
  x, w = residuals
  _, vjp = jax.vjp(lambda a, b: _im2col_correlate(a, b, strides, padding), x, w)
  return vjp(g)


_correlate_with_im2col_gradient.defvjp(_correlate_fwd, _correlate_bwd)


def transposed_correlate(x: Array, w: Array, strides: int, pad: int) -> Array:
  """`lax.conv_transpose(x, w, (s, s), ((pad, pad),) * 2)` (NHWC, HWIO).

  On CPU: output pixel s*m + r only sees input pixels m + d for a few offsets d, so the
  transposed conv is a small stride-1 correlation producing s*s*O channels (one group per
  phase r) followed by depth-to-space.
  """
  if not ops.cpu_kernels_enabled():
    return jax.lax.conv_transpose(
      x,
      w,
      strides=(strides, strides),
      padding=((pad, pad), (pad, pad)),
      dimension_numbers=_DIMENSIONS,
    )
  s, k = strides, w.shape[0]
  taps = [(r, t, (r + t - pad) // s) for r in range(s) for t in range(k) if (r + t - pad) % s == 0]
  d_lo = min(d for _, _, d in taps)
  d_hi = max(d for _, _, d in taps)
  n = d_hi - d_lo + 1
  b, h, wd, c = x.shape
  o = w.shape[-1]
  w_eff = jnp.zeros((n, n, c, s, s, o), w.dtype)
  for ry, ty, dy in taps:
    for rx, tx, dx in taps:
      w_eff = w_eff.at[dy - d_lo, dx - d_lo, :, ry, rx, :].set(w[ty, tx])
  y = correlate(x, w_eff.reshape(n, n, c, s * s * o), 1, ((-d_lo, d_hi), (-d_lo, d_hi)))
  y = y.reshape(b, h, wd, s, s, o).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, h * s, wd * s, o)


class Conv2d(nn.Module):
  """DALL-E's ``Conv2d``: a square convolution with "same" padding (k-1)//2.

  Parameters are float32 and named like DALL-E's: ``w`` with shape (k, k, n_in, n_out)
  (HWIO; DALL-E stores OIHW) initialised from N(0, 1/(n_in k^2)), and ``b`` with shape
  (n_out,) initialised to zeros.

  Attributes:
    features: number of output channels (n_out).
    kernel_size: spatial size k of the square kernel.
    strides: spatial stride.
    dtype: computation dtype; inputs and parameters are cast to it.
  """

  features: int
  kernel_size: int
  strides: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Convolves NHWC `x`; returns (B, H', W', features) in `dtype`."""
    k = self.kernel_size
    n_in = x.shape[-1]
    std = 1.0 / math.sqrt(n_in * k * k)
    w = self.param(
      "w", nn.initializers.normal(stddev=std), (k, k, n_in, self.features), jnp.float32
    )
    b = self.param("b", nn.initializers.zeros, (self.features,), jnp.float32)
    pad = (k - 1) // 2
    y = correlate(
      x.astype(self.dtype), w.astype(self.dtype), self.strides, ((pad, pad), (pad, pad))
    )
    return y + b.astype(self.dtype)


class ConvTranspose2d(nn.Module):
  """Transposed convolution that upsamples exactly by `strides`.

  Computes PyTorch ``ConvTranspose2d(k, s, padding=(k-s)//2)`` (k=4, s=2, padding=1 in
  lucidrains' DiscreteVAE) with the kernel stored spatially flipped: (H, W) -> (s H, s W).
  Parameters: ``w`` (k, k, n_in, n_out), initialised from N(0, s^2/(n_in k^2)) (each output
  pixel sees (k/s)^2 n_in inputs), and ``b`` (n_out,) zeros; both float32.

  Attributes:
    features: number of output channels.
    kernel_size: spatial size k of the square kernel; k - strides must be even and
      non-negative.
    strides: upsampling factor s.
    dtype: computation dtype.
  """

  features: int
  kernel_size: int = 4
  strides: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Upsamples NHWC `x`; returns (B, sH, sW, features) in `dtype`."""
    k, s = self.kernel_size, self.strides
    if k < s or (k - s) % 2:
      raise ValueError(f"kernel_size - strides must be even and >= 0, got k={k}, s={s}")
    n_in = x.shape[-1]
    std = s / math.sqrt(n_in * k * k)
    w = self.param(
      "w", nn.initializers.normal(stddev=std), (k, k, n_in, self.features), jnp.float32
    )
    b = self.param("b", nn.initializers.zeros, (self.features,), jnp.float32)
    torch_pad = (k - s) // 2
    pad = k - 1 - torch_pad
    y = transposed_correlate(x.astype(self.dtype), w.astype(self.dtype), s, pad)
    return y + b.astype(self.dtype)
