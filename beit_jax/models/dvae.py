"""Discrete VAE (visual tokenizer) in Flax Linen, NHWC layout.

Two architectures are provided:

* ``'dall_e'``: an exact port of the OpenAI DALL-E dVAE (``dall_e/encoder.py``,
  ``dall_e/decoder.py``). The parameter tree mirrors the PyTorch state dict one
  to one: torch ``blocks.group_1.block_1.res_path.conv_1.w`` (OIHW) is
  ``params['blocks']['group_1']['block_1']['res_path']['conv_1']['w']`` (HWIO)
  here. The encoder downsamples by 8 (112 px -> 14x14 tokens) and the decoder
  predicts the 6 logit-Laplace parameters per pixel (mu for RGB, then ln b).
* ``'compact'``: a small lucidrains-``DiscreteVAE``-style model for small data
  and CPUs (strided 4x4 convs, residual blocks, a learned codebook).

`DiscreteVAE` wraps either one. Images in its public API are always float in
[0, 1] with shape (B, H, W, 3); the module applies its own input normalisation.
The module-level functions implement the Gumbel-softmax relaxation, the ELBO
with DALL-E's loss normalisation, tokenisation and decoding of token ids.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

LOGIT_LAPLACE_EPS = 0.1
ARCHS = ('dall_e', 'compact')
RECON_LOSSES = ('logit_laplace', 'mse')
INPUT_NORMS = ('dall_e', 'half')


# ----------------------------------------------------------------------------
# Convolution kernels.
#
# XLA:CPU runs convolution gradients far below matmul speed (a 3x3, 64-channel
# conv at 32x32 trains ~4x slower than the same maths as a matmul), so on CPU
# convolution gradients are computed as patch extraction + one matmul ("im2col"),
# the forward staying XLA's (faster there), and transposed convolutions as a
# sub-pixel convolution + depth-to-space. Both are
# the same linear maps as `lax.conv_general_dilated` / `lax.conv_transpose`
# (tests compare them); on GPU/TPU the XLA convolutions are used.
# ----------------------------------------------------------------------------


def _use_matmul_convs() -> bool:
  return jax.default_backend() == 'cpu'


def correlate(x: Array, w: Array, strides: int,
              padding: tuple[tuple[int, int], tuple[int, int]]) -> Array:
  """Cross-correlation of NHWC `x` with HWIO `w` (what `lax.conv` computes)."""
  kh, kw = w.shape[:2]
  if kh == kw == 1 and strides == 1 and padding == ((0, 0), (0, 0)):
    return jnp.einsum('bhwc,co->bhwo', x, w[0, 0])
  if not _use_matmul_convs():
    return _xla_correlate(x, w, strides, padding)
  return _correlate_with_im2col_gradient(x, w, strides, padding)


def _xla_correlate(x, w, strides, padding):
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(strides, strides), padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _im2col_correlate(x, w, strides, padding):
  kh, kw = w.shape[:2]
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  ho = (xp.shape[1] - kh) // strides + 1
  wo = (xp.shape[2] - kw) // strides + 1
  cols = [xp[:, i:i + strides * (ho - 1) + 1:strides,
             j:j + strides * (wo - 1) + 1:strides, :]
          for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(cols, axis=-1)  # (B, ho, wo, kh*kw*C), tap-major.
  return jnp.einsum('bhwk,ko->bhwo', patches, w.reshape(-1, w.shape[-1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _correlate_with_im2col_gradient(x, w, strides, padding):
  """XLA:CPU's convolution forward (faster than im2col: the frozen tokenizer of the MIM
  step runs 1.4x faster), with im2col's gradient (faster than XLA:CPU's conv gradients)."""
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

  Output pixel s*m + r only sees input pixels m + d for a few offsets d, so the
  transposed conv is a small stride-1 correlation producing s*s*O channels
  (one group per phase r) followed by depth-to-space.
  """
  if not _use_matmul_convs():
    return jax.lax.conv_transpose(
        x, w, strides=(strides, strides), padding=((pad, pad), (pad, pad)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  s, k = strides, w.shape[0]
  taps = [(r, t, (r + t - pad) // s) for r in range(s) for t in range(k)
          if (r + t - pad) % s == 0]
  d_lo = min(d for _, _, d in taps)
  d_hi = max(d for _, _, d in taps)
  n = d_hi - d_lo + 1
  b, h, wd, c = x.shape
  o = w.shape[-1]
  w_eff = jnp.zeros((n, n, c, s, s, o), w.dtype)
  for ry, ty, dy in taps:
    for rx, tx, dx in taps:
      w_eff = w_eff.at[dy - d_lo, dx - d_lo, :, ry, rx, :].set(w[ty, tx])
  y = correlate(x, w_eff.reshape(n, n, c, s * s * o), 1,
                ((-d_lo, d_hi), (-d_lo, d_hi)))
  y = y.reshape(b, h, wd, s, s, o).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, h * s, wd * s, o)


# ----------------------------------------------------------------------------
# Pixel maps.
# ----------------------------------------------------------------------------


def map_pixels(x01: Array, eps: float = LOGIT_LAPLACE_EPS) -> Array:
  """DALL-E's ``map_pixels``: squeezes [0, 1] into [eps, 1 - eps].

  Args:
    x01: pixels in [0, 1].
    eps: the logit-Laplace epsilon (0.1 in DALL-E).

  Returns:
    ``(1 - 2 eps) x + eps``, same shape and dtype as `x01`.
  """
  return (1.0 - 2.0 * eps) * x01 + eps


def unmap_pixels(x: Array, eps: float = LOGIT_LAPLACE_EPS) -> Array:
  """DALL-E's ``unmap_pixels``: inverse of `map_pixels`, clipped to [0, 1]."""
  return jnp.clip((x - eps) / (1.0 - 2.0 * eps), 0.0, 1.0)


def _normalize(x01: Array, input_norm: str) -> Array:
  """Maps [0, 1] images into the model's input space."""
  if input_norm == 'dall_e':
    return map_pixels(x01)
  if input_norm == 'half':
    return (x01 - 0.5) / 0.5
  raise ValueError(
      f'input_norm must be one of {INPUT_NORMS}, got {input_norm!r}')


def _denormalize(x: Array, input_norm: str) -> Array:
  """Inverse of `_normalize`, clipped to [0, 1]."""
  if input_norm == 'dall_e':
    return unmap_pixels(x)
  if input_norm == 'half':
    return jnp.clip(x * 0.5 + 0.5, 0.0, 1.0)
  raise ValueError(
      f'input_norm must be one of {INPUT_NORMS}, got {input_norm!r}')


# ----------------------------------------------------------------------------
# Convolutions.
# ----------------------------------------------------------------------------


class Conv2d(nn.Module):
  """DALL-E's ``Conv2d``: a square convolution with "same" padding (k-1)//2.

  Parameters are float32 and named like DALL-E's: ``w`` with shape
  (k, k, n_in, n_out) (HWIO; DALL-E stores OIHW) initialised from
  N(0, 1/(n_in k^2)), and ``b`` with shape (n_out,) initialised to zeros.

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
    w = self.param('w', nn.initializers.normal(stddev=std),
                   (k, k, n_in, self.features), jnp.float32)
    b = self.param('b', nn.initializers.zeros, (self.features,), jnp.float32)
    pad = (k - 1) // 2
    y = correlate(x.astype(self.dtype), w.astype(self.dtype), self.strides,
                  ((pad, pad), (pad, pad)))
    return y + b.astype(self.dtype)


class ConvTranspose2d(nn.Module):
  """Transposed convolution that upsamples exactly by `strides`.

  Computes PyTorch ``ConvTranspose2d(k, s, padding=(k-s)//2)`` (k=4, s=2,
  padding=1 in lucidrains' DiscreteVAE) with the kernel stored spatially
  flipped: (H, W) -> (s H, s W).
  Parameters: ``w`` (k, k, n_in, n_out), initialised from
  N(0, s^2/(n_in k^2)) (each output pixel sees (k/s)^2 n_in inputs), and ``b``
  (n_out,) zeros; both float32.

  Attributes:
    features: number of output channels.
    kernel_size: spatial size k of the square kernel; k - strides must be even
      and non-negative.
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
      raise ValueError(
          f'kernel_size - strides must be even and >= 0, got k={k}, s={s}')
    n_in = x.shape[-1]
    std = s / math.sqrt(n_in * k * k)
    w = self.param('w', nn.initializers.normal(stddev=std),
                   (k, k, n_in, self.features), jnp.float32)
    b = self.param('b', nn.initializers.zeros, (self.features,), jnp.float32)
    torch_pad = (k - s) // 2
    pad = k - 1 - torch_pad
    y = transposed_correlate(x.astype(self.dtype), w.astype(self.dtype), s, pad)
    return y + b.astype(self.dtype)


# ----------------------------------------------------------------------------
# DALL-E dVAE.
# ----------------------------------------------------------------------------


class _ResPath(nn.Module):
  """The ``res_path`` of a DALL-E block: [ReLU -> conv_i] for i = 1..4.

  Attributes:
    features: output channels of conv_1..conv_4.
    kernel_sizes: kernel sizes of conv_1..conv_4.
    dtype: computation dtype.
  """
  features: tuple[int, int, int, int]
  kernel_sizes: tuple[int, int, int, int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i, (f, k) in enumerate(zip(self.features, self.kernel_sizes)):
      x = Conv2d(f, k, dtype=self.dtype, name=f'conv_{i + 1}')(nn.relu(x))
    return x


class DalleEncoderBlock(nn.Module):
  """DALL-E ``EncoderBlock``: ``id_path(x) + post_gain * res_path(x)``.

  ``res_path`` is ReLU->3x3 (n_in->n_out/4) -> ReLU->3x3 -> ReLU->3x3 ->
  ReLU->1x1 (->n_out); ``id_path`` is a 1x1 conv when n_in != n_out, else the
  identity; ``post_gain = 1 / n_layers**2``.

  Attributes:
    n_in: input channels (taken from the input; kept for DALL-E parity and
      checked against it).
    n_out: output channels; a multiple of 4.
    n_layers: total number of blocks in the network (sets post_gain).
    dtype: computation dtype.
  """
  n_in: int
  n_out: int
  n_layers: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return _dalle_block(self, x, kernel_sizes=(3, 3, 3, 1))


class DalleDecoderBlock(nn.Module):
  """DALL-E ``DecoderBlock``: ``id_path(x) + post_gain * res_path(x)``.

  ``res_path`` is ReLU->1x1 (n_in->n_out/4) -> ReLU->3x3 -> ReLU->3x3 ->
  ReLU->3x3 (->n_out); ``id_path`` is a 1x1 conv when n_in != n_out, else the
  identity; ``post_gain = 1 / n_layers**2``.

  Attributes:
    n_in: input channels (checked against the input).
    n_out: output channels; a multiple of 4.
    n_layers: total number of blocks in the network (sets post_gain).
    dtype: computation dtype.
  """
  n_in: int
  n_out: int
  n_layers: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return _dalle_block(self, x, kernel_sizes=(1, 3, 3, 3))


def _dalle_block(block: DalleEncoderBlock | DalleDecoderBlock, x: Array,
                 kernel_sizes: tuple[int, int, int, int]) -> Array:
  """Shared body of the DALL-E encoder and decoder blocks (inside compact)."""
  if x.shape[-1] != block.n_in:
    raise ValueError(f'block built for {block.n_in} input channels, '
                     f'got {x.shape[-1]}')
  if block.n_out % 4:
    raise ValueError(f'n_out must be a multiple of 4, got {block.n_out}')
  n_hid = block.n_out // 4
  post_gain = 1.0 / block.n_layers**2
  if block.n_in != block.n_out:
    identity = Conv2d(block.n_out, 1, dtype=block.dtype, name='id_path')(x)
  else:
    identity = x.astype(block.dtype)
  res = _ResPath((n_hid, n_hid, n_hid, block.n_out), kernel_sizes,
                 dtype=block.dtype, name='res_path')(x)
  return identity + post_gain * res


class _DalleGroup(nn.Module):
  """A DALL-E ``group_i``: blocks ``block_1..block_n``, then pool/upsample.

  Attributes:
    block_cls: `DalleEncoderBlock` or `DalleDecoderBlock`.
    n_in: input channels of the first block.
    n_out: output channels of every block.
    n_blk: number of blocks.
    n_layers: total block count of the network (sets post_gain).
    resample: 'pool' (2x2 max-pool), 'upsample' (nearest x2) or 'none'.
    dtype: computation dtype.
  """
  block_cls: type[nn.Module]
  n_in: int
  n_out: int
  n_blk: int
  n_layers: int
  resample: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.n_blk):
      n_in = self.n_in if i == 0 else self.n_out
      x = self.block_cls(n_in, self.n_out, self.n_layers, dtype=self.dtype,
                         name=f'block_{i + 1}')(x)
    if self.resample == 'pool':
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
    elif self.resample == 'upsample':
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    elif self.resample != 'none':
      raise ValueError(f'unknown resample {self.resample!r}')
    return x


class _ReluConv(nn.Module):
  """DALL-E's ``output`` head: ReLU then a conv named ``conv``.

  Attributes:
    features: output channels.
    kernel_size: kernel size of the conv.
    dtype: computation dtype of the conv.
  """
  features: int
  kernel_size: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return Conv2d(self.features, self.kernel_size, dtype=self.dtype,
                  name='conv')(nn.relu(x))


class _DalleEncoderBlocks(nn.Module):
  """DALL-E encoder's ``blocks`` Sequential (see `DalleEncoder`)."""
  group_count: int
  n_hid: int
  n_blk_per_group: int
  input_channels: int
  vocab_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_layers = self.group_count * self.n_blk_per_group
    h = self.n_hid
    x = Conv2d(h, 7, dtype=self.dtype, name='input')(x)
    groups = ((h, h, 'pool'), (h, 2 * h, 'pool'), (2 * h, 4 * h, 'pool'),
              (4 * h, 8 * h, 'none'))
    for g, (n_in, n_out, resample) in enumerate(groups):
      x = _DalleGroup(DalleEncoderBlock, n_in, n_out, self.n_blk_per_group,
                      n_layers, resample, dtype=self.dtype,
                      name=f'group_{g + 1}')(x)
    # DALL-E builds the final 1x1 with use_float16=False: always float32.
    return _ReluConv(self.vocab_size, 1, dtype=jnp.float32, name='output')(x)


class DalleEncoder(nn.Module):
  """DALL-E dVAE encoder: images (B, H, W, C) -> logits (B, H/8, W/8, V).

  Structure (as ``dall_e/encoder.py``): ``input`` 7x7 conv (C -> n_hid);
  ``group_1`` n_hid -> n_hid, ``group_2`` -> 2 n_hid, ``group_3`` -> 4 n_hid,
  each followed by 2x2 max-pool; ``group_4`` -> 8 n_hid; ``output`` ReLU ->
  1x1 conv -> vocab logits in float32. The four groups are fixed as in DALL-E;
  `group_count` only enters ``n_layers = group_count * n_blk_per_group``
  (the residual post-gain 1/n_layers^2), exactly as in DALL-E. All parameters
  live under ``blocks``.

  Attributes:
    group_count: DALL-E's group_count (4).
    n_hid: base width (256).
    n_blk_per_group: blocks per group (2).
    input_channels: image channels (3).
    vocab_size: number of codes V (8192).
    dtype: computation dtype of every conv except the float32 output conv.
  """
  group_count: int = 4
  n_hid: int = 256
  n_blk_per_group: int = 2
  input_channels: int = 3
  vocab_size: int = 8192
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Encodes DALL-E-mapped pixels (B, H, W, C) to float32 logits."""
    if x.ndim != 4:
      raise ValueError(f'input shape {x.shape} is not 4d')
    if x.shape[-1] != self.input_channels:
      raise ValueError(f'input has {x.shape[-1]} channels but model built for '
                       f'{self.input_channels}')
    return _DalleEncoderBlocks(self.group_count, self.n_hid,
                               self.n_blk_per_group, self.input_channels,
                               self.vocab_size, dtype=self.dtype,
                               name='blocks')(x.astype(jnp.float32))


class _DalleDecoderBlocks(nn.Module):
  """DALL-E decoder's ``blocks`` Sequential (see `DalleDecoder`)."""
  group_count: int
  n_init: int
  n_hid: int
  n_blk_per_group: int
  output_channels: int
  vocab_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_layers = self.group_count * self.n_blk_per_group
    h = self.n_hid
    # DALL-E builds the input 1x1 with use_float16=False: always float32.
    x = Conv2d(self.n_init, 1, dtype=jnp.float32, name='input')(x)
    groups = ((self.n_init, 8 * h, 'upsample'), (8 * h, 4 * h, 'upsample'),
              (4 * h, 2 * h, 'upsample'), (2 * h, h, 'none'))
    for g, (n_in, n_out, resample) in enumerate(groups):
      x = _DalleGroup(DalleDecoderBlock, n_in, n_out, self.n_blk_per_group,
                      n_layers, resample, dtype=self.dtype,
                      name=f'group_{g + 1}')(x)
    return _ReluConv(2 * self.output_channels, 1, dtype=self.dtype,
                     name='output')(x)


class DalleDecoder(nn.Module):
  """DALL-E dVAE decoder: codes (B, h, w, V) -> (B, 8h, 8w, 2 C) float32.

  Structure (as ``dall_e/decoder.py``): ``input`` 1x1 conv V -> n_init
  (float32); ``group_1`` n_init -> 8 n_hid, ``group_2`` -> 4 n_hid,
  ``group_3`` -> 2 n_hid, each followed by nearest x2 upsampling; ``group_4``
  -> n_hid; ``output`` ReLU -> 1x1 conv -> 2 C channels: the logit-Laplace mu
  for the C colour channels, then ln b for them. As in DALL-E the four groups
  are fixed and `group_count` only sets n_layers. All parameters live under
  ``blocks``. The output is returned as float32.

  Attributes:
    group_count: DALL-E's group_count (4).
    n_init: width after the input conv (128).
    n_hid: base width (256).
    n_blk_per_group: blocks per group (2).
    output_channels: image channels C (3).
    vocab_size: number of codes V (8192).
    dtype: computation dtype of every conv except the float32 input conv.
  """
  group_count: int = 4
  n_init: int = 128
  n_hid: int = 256
  n_blk_per_group: int = 2
  output_channels: int = 3
  vocab_size: int = 8192
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, codes: Array) -> Array:
    """Decodes one-hot or soft codes (B, h, w, V) to raw float32 outputs."""
    if codes.ndim != 4:
      raise ValueError(f'input shape {codes.shape} is not 4d')
    if codes.shape[-1] != self.vocab_size:
      raise ValueError(f'input has {codes.shape[-1]} channels but model built '
                       f'for {self.vocab_size}')
    out = _DalleDecoderBlocks(self.group_count, self.n_init, self.n_hid,
                              self.n_blk_per_group, self.output_channels,
                              self.vocab_size, dtype=self.dtype,
                              name='blocks')(codes.astype(jnp.float32))
    return out.astype(jnp.float32)


# ----------------------------------------------------------------------------
# Compact dVAE (lucidrains DiscreteVAE style).
# ----------------------------------------------------------------------------


class CompactResBlock(nn.Module):
  """lucidrains ``ResBlock``: x + conv1x1(relu(conv3x3(relu(conv3x3(x))))).

  Attributes:
    features: channels (input and output).
    dtype: computation dtype.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = Conv2d(self.features, 3, dtype=self.dtype, name='conv_1')(x)
    h = Conv2d(self.features, 3, dtype=self.dtype, name='conv_2')(nn.relu(h))
    h = Conv2d(self.features, 1, dtype=self.dtype, name='conv_3')(nn.relu(h))
    return x.astype(self.dtype) + h


class CompactEncoder(nn.Module):
  """Compact encoder: images (B, H, W, 3) -> logits (B, H/2^L, W/2^L, V).

  ``down_1..down_L``: 4x4 stride-2 conv + ReLU (the first from the image
  channels to `hidden`); ``res_1..res_R``: `CompactResBlock`; ``output``: 1x1
  conv to float32 vocab logits. Odd sizes are floored at each stride-2 conv.

  Attributes:
    num_layers: number L of stride-2 convs.
    hidden: channel width.
    num_resblocks: number R of residual blocks.
    vocab_size: number of codes V.
    dtype: computation dtype of every conv except the float32 output conv.
  """
  num_layers: int
  hidden: int
  num_resblocks: int
  vocab_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Encodes normalised images (B, H, W, C) to float32 logits."""
    for i in range(self.num_layers):
      x = nn.relu(Conv2d(self.hidden, 4, strides=2, dtype=self.dtype,
                         name=f'down_{i + 1}')(x))
    for i in range(self.num_resblocks):
      x = CompactResBlock(self.hidden, dtype=self.dtype, name=f'res_{i + 1}')(x)
    return Conv2d(self.vocab_size, 1, dtype=jnp.float32, name='output')(x)


class CompactDecoder(nn.Module):
  """Compact decoder: codes (B, h, w, V) -> (B, 2^L h, 2^L w, C) float32.

  The codes (one-hot or soft) are mixed with a learned ``codebook``
  (V, codebook_dim) by einsum (float32), then ``input`` 1x1 conv to `hidden`
  (float32), ``res_1..res_R`` `CompactResBlock`, ``up_1..up_L`` 4x4 stride-2
  transposed conv + ReLU, and ``output`` 1x1 conv to `output_channels` (3 for
  MSE, 6 for logit-Laplace: mu then ln b).

  Attributes:
    num_layers: number L of x2 transposed convs.
    hidden: channel width.
    num_resblocks: number R of residual blocks.
    vocab_size: number of codes V.
    codebook_dim: codebook embedding size.
    output_channels: channels of the raw output.
    dtype: computation dtype after the input 1x1 conv.
  """
  num_layers: int
  hidden: int
  num_resblocks: int
  vocab_size: int
  codebook_dim: int
  output_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, codes: Array) -> Array:
    """Decodes one-hot or soft codes (B, h, w, V) to raw float32 outputs."""
    if codes.shape[-1] != self.vocab_size:
      raise ValueError(f'codes have {codes.shape[-1]} channels but model built '
                       f'for {self.vocab_size}')
    codebook = self.param('codebook', nn.initializers.normal(stddev=1.0),
                          (self.vocab_size, self.codebook_dim), jnp.float32)
    x = jnp.einsum('bhwv,vd->bhwd', codes.astype(jnp.float32), codebook)
    x = Conv2d(self.hidden, 1, dtype=jnp.float32, name='input')(x)
    for i in range(self.num_resblocks):
      x = CompactResBlock(self.hidden, dtype=self.dtype, name=f'res_{i + 1}')(x)
    for i in range(self.num_layers):
      x = nn.relu(ConvTranspose2d(self.hidden, 4, 2, dtype=self.dtype,
                                  name=f'up_{i + 1}')(x))
    out = Conv2d(self.output_channels, 1, dtype=self.dtype, name='output')(x)
    return out.astype(jnp.float32)


# ----------------------------------------------------------------------------
# The wrapper.
# ----------------------------------------------------------------------------


def _reconstruct(raw_out: Array, recon_loss: str, input_norm: str) -> Array:
  """Raw decoder output -> images in [0, 1] (see `DiscreteVAE.reconstruct`)."""
  raw_out = raw_out.astype(jnp.float32)
  if recon_loss == 'logit_laplace':
    mu = raw_out[..., :raw_out.shape[-1] // 2]
    return unmap_pixels(jax.nn.sigmoid(mu))
  return _denormalize(raw_out, input_norm)


class DiscreteVAE(nn.Module):
  """Discrete VAE tokenizer: encoder -> Gumbel-softmax codes -> decoder.

  Parameters live under ``encoder`` and ``decoder``; with ``arch='dall_e'``
  ``params['encoder']`` is exactly the DALL-E encoder's tree (``blocks/...``)
  and can be exported alone. Images are float in [0, 1], (B, H, W, 3); the
  module normalises them itself (`input_norm`).

  Attributes:
    arch: 'dall_e' (`DalleEncoder`/`DalleDecoder`) or 'compact'
      (`CompactEncoder`/`CompactDecoder`).
    vocab_size: number of codes V.
    recon_loss: 'logit_laplace' (decoder emits mu and ln b per channel, 6
      channels) or 'mse' (decoder emits the normalised image, 3 channels).
      'dall_e' requires 'logit_laplace'.
    input_norm: encoder input normalisation: 'dall_e' (map_pixels, 0.8x+0.1)
      or 'half' ((x-0.5)/0.5). With 'mse' the decoder output lives in the same
      space.
    num_layers: compact: number of stride-2 layers (downsample 2**num_layers).
    hidden: compact: channel width.
    num_resblocks: compact: residual blocks in encoder and decoder.
    codebook_dim: compact: codebook embedding size.
    n_hid: DALL-E: base width.
    n_blk_per_group: DALL-E: blocks per group.
    group_count: DALL-E: group count (sets the residual post-gain).
    n_init: DALL-E: decoder width after the input conv.
    dtype: computation dtype of the convs; the encoder's final 1x1 and the
      decoder's input 1x1 always run in float32, and logits and decoder
      outputs are float32.
  """
  arch: str = 'dall_e'
  vocab_size: int = 8192
  recon_loss: str = 'logit_laplace'
  input_norm: str = 'dall_e'
  num_layers: int = 3
  hidden: int = 64
  num_resblocks: int = 1
  codebook_dim: int = 512
  n_hid: int = 256
  n_blk_per_group: int = 2
  group_count: int = 4
  n_init: int = 128
  dtype: Dtype = jnp.float32

  def __post_init__(self) -> None:
    if self.arch not in ARCHS:
      raise ValueError(f'arch must be one of {ARCHS}, got {self.arch!r}')
    if self.recon_loss not in RECON_LOSSES:
      raise ValueError(
          f'recon_loss must be one of {RECON_LOSSES}, got {self.recon_loss!r}')
    if self.input_norm not in INPUT_NORMS:
      raise ValueError(
          f'input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}')
    if self.arch == 'dall_e' and self.recon_loss != 'logit_laplace':
      raise ValueError(
          "arch='dall_e' has a 6-channel logit-Laplace decoder, so recon_loss "
          f"must be 'logit_laplace', got {self.recon_loss!r}")
    if self.vocab_size < 2:
      raise ValueError(f'vocab_size must be >= 2, got {self.vocab_size}')
    if self.arch == 'compact' and self.num_layers < 1:
      raise ValueError(f'num_layers must be >= 1, got {self.num_layers}')
    if self.arch == 'dall_e' and self.n_hid % 4:
      raise ValueError(f'n_hid must be a multiple of 4, got {self.n_hid}')
    super().__post_init__()

  @property
  def downsample(self) -> int:
    """Spatial downsampling factor from pixels to code positions."""
    return 8 if self.arch == 'dall_e' else 2**self.num_layers

  @property
  def output_channels(self) -> int:
    """Channels of the raw decoder output (6 logit-Laplace, 3 MSE)."""
    return 6 if self.recon_loss == 'logit_laplace' else 3

  def setup(self) -> None:
    if self.arch == 'dall_e':
      self.encoder = DalleEncoder(self.group_count, self.n_hid,
                                  self.n_blk_per_group, 3, self.vocab_size,
                                  dtype=self.dtype)
      self.decoder = DalleDecoder(self.group_count, self.n_init, self.n_hid,
                                  self.n_blk_per_group, 3, self.vocab_size,
                                  dtype=self.dtype)
    else:
      self.encoder = CompactEncoder(self.num_layers, self.hidden,
                                    self.num_resblocks, self.vocab_size,
                                    dtype=self.dtype)
      self.decoder = CompactDecoder(self.num_layers, self.hidden,
                                    self.num_resblocks, self.vocab_size,
                                    self.codebook_dim, self.output_channels,
                                    dtype=self.dtype)

  def encode(self, images01: Array) -> Array:
    """Images in [0, 1] (B, H, W, 3) -> float32 logits (B, h, w, V)."""
    x = _normalize(images01.astype(jnp.float32), self.input_norm)
    return self.encoder(x).astype(jnp.float32)

  def decode_codes(self, codes: Array) -> Array:
    """One-hot or soft codes (B, h, w, V) -> raw float32 output (B, H, W, C)."""
    return self.decoder(codes)

  def reconstruct(self, raw_out: Array) -> Array:
    """Raw decoder output -> images in [0, 1].

    logit-Laplace: ``clip((sigmoid(mu) - 0.1) / 0.8, 0, 1)``; MSE: the output
    mapped back through `input_norm`'s inverse and clipped to [0, 1].

    Args:
      raw_out: (B, H, W, C) raw decoder output.

    Returns:
      (B, H, W, 3) float32 images in [0, 1].
    """
    return _reconstruct(raw_out, self.recon_loss, self.input_norm)

  def __call__(self, images01: Array, *, rng: Array, tau: float | Array = 1.0,
               hard: bool = False) -> dict[str, Array]:
    """Encode, sample Gumbel-softmax codes, decode.

    Args:
      images01: (B, H, W, 3) float images in [0, 1].
      rng: PRNG key for the Gumbel noise.
      tau: Gumbel-softmax temperature (may be traced).
      hard: straight-through one-hot codes when True (Python bool).

    Returns:
      dict with ``logits`` (B, h, w, V) float32, ``codes`` (B, h, w, V)
      float32 and ``out`` (B, H, W, C) float32 raw decoder output.
    """
    logits = self.encode(images01)
    codes = gumbel_softmax(rng, logits, tau, hard)
    out = self.decode_codes(codes)
    return {'logits': logits, 'codes': codes, 'out': out}


# ----------------------------------------------------------------------------
# Pure functions: relaxation, losses, tokenize/decode.
# ----------------------------------------------------------------------------


def gumbel_softmax(rng: Array, logits: Array, tau: float | Array,
                   hard: bool = False) -> Array:
  """Gumbel-softmax sample over the last axis, float32.

  ``y = softmax((logits + g) / tau)`` with g ~ Gumbel(0, 1). With ``hard``
  the forward value is exactly ``one_hot(argmax(y))`` and the gradient is the
  soft one (straight-through): ``one_hot + (y - stop_gradient(y))``.

  Args:
    rng: PRNG key.
    logits: (..., V) unnormalised log-probabilities.
    tau: temperature > 0.
    hard: straight-through one-hot output when True (Python bool).

  Returns:
    (..., V) float32 codes.
  """
  logits = logits.astype(jnp.float32)
  g = jax.random.gumbel(rng, logits.shape, jnp.float32)
  y = jax.nn.softmax((logits + g) / tau, axis=-1)
  if hard:
    y_hard = jax.nn.one_hot(jnp.argmax(y, axis=-1), logits.shape[-1],
                            dtype=jnp.float32)
    # y - stop_gradient(y) is exactly 0 forward: the value is exactly one-hot.
    y = y_hard + (y - jax.lax.stop_gradient(y))
  return y


def kl_to_uniform(logits: Array) -> Array:
  """KL(softmax(logits) || uniform over V), per position.

  Args:
    logits: (B, h, w, V) logits.

  Returns:
    (B, h, w) float32 ``sum q log q + log V``, from log_softmax.
  """
  logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(logq) * logq, axis=-1) + math.log(logits.shape[-1])


def logit_laplace_nll(target01: Array, raw_out: Array) -> Array:
  """Per-subpixel negative log-likelihood of DALL-E's logit-Laplace.

  With x = map_pixels(target01) in [0.1, 0.9], mu = raw[..., :C] and
  ln b = raw[..., C:], the density on (0, 1) is
  ``1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b)``, so
  ``nll = log(2 b) + log(x (1 - x)) + |logit(x) - mu| / b``.

  Args:
    target01: (B, H, W, C) target pixels in [0, 1].
    raw_out: (B, H, W, 2C) raw decoder output.

  Returns:
    (B, H, W, C) float32 NLL.
  """
  x = map_pixels(target01.astype(jnp.float32))
  raw_out = raw_out.astype(jnp.float32)
  c = raw_out.shape[-1] // 2
  mu, ln_b = raw_out[..., :c], raw_out[..., c:]
  logit_x = jnp.log(x) - jnp.log1p(-x)
  return (math.log(2.0) + ln_b + jnp.log(x) + jnp.log1p(-x)
          + jnp.abs(logit_x - mu) * jnp.exp(-ln_b))


def elbo_loss(model: DiscreteVAE, params: Any, images01: Array, rng: Array,
              tau: float | Array, beta: float | Array,
              hard: bool = False) -> tuple[Array, dict[str, Array]]:
  """Negative ELBO with DALL-E's normalisation, and training metrics.

  ``loss = mean_subpixels(recon) + beta * mean_positions(KL) / (d^2 * 3)``
  with d = `model.downsample`: DALL-E divides the summed loss by the number
  of subpixels (256*256*3), so the KL weight is beta/192 at d = 8. The recon
  term is the logit-Laplace NLL, or for 'mse' the squared error in the
  normalised input space.

  Args:
    model: the `DiscreteVAE`.
    params: its variables dict as returned by ``model.init``.
    images01: (B, H, W, 3) float images in [0, 1]; H, W multiples of d.
    rng: PRNG key for the Gumbel noise.
    tau: Gumbel-softmax temperature.
    beta: KL weight.
    hard: straight-through one-hot codes.

  Returns:
    ``(loss, aux)``; aux holds float32 scalars ``recon_loss``, ``kl`` (mean
    per position, nats), ``mse`` (in [0, 1] pixel space of the
    reconstruction), ``psnr`` (dB, per image then averaged),
    ``logits_entropy`` (mean per position, nats) and ``token_counts`` (int32
    (V,) histogram of argmax(logits) over the batch).
  """
  images01 = images01.astype(jnp.float32)
  res = model.apply(params, images01, rng=rng, tau=tau, hard=hard)
  logits, out = res['logits'], res['out']
  if model.recon_loss == 'logit_laplace':
    recon = jnp.mean(logit_laplace_nll(images01, out))
  else:
    recon = jnp.mean(jnp.square(out - _normalize(images01, model.input_norm)))
  kl = jnp.mean(kl_to_uniform(logits))
  loss = recon + beta * kl / (model.downsample**2 * 3)

  recon_images = jax.lax.stop_gradient(
      _reconstruct(out, model.recon_loss, model.input_norm))
  mse_per_image = jnp.mean(jnp.square(recon_images - images01), axis=(1, 2, 3))
  psnr = jnp.mean(-10.0 * jnp.log10(jnp.maximum(mse_per_image, 1e-10)))
  logq = jax.nn.log_softmax(jax.lax.stop_gradient(logits), axis=-1)
  entropy = jnp.mean(-jnp.sum(jnp.exp(logq) * logq, axis=-1))
  ids = jnp.argmax(logits, axis=-1).reshape(-1)
  token_counts = jnp.zeros((model.vocab_size,), jnp.int32).at[ids].add(1)
  aux = {
      'recon_loss': recon,
      'kl': kl,
      'mse': jnp.mean(mse_per_image),
      'psnr': psnr,
      'logits_entropy': entropy,
      'token_counts': token_counts,
  }
  return loss, aux


def tokenize(model: DiscreteVAE, params: Any, images01: Array) -> Array:
  """Token ids = argmax of the encoder logits (no noise).

  Jit with the model static, e.g. ``jax.jit(tokenize, static_argnums=0)`` or
  ``jax.jit(functools.partial(tokenize, model))``.

  Args:
    model: the `DiscreteVAE`.
    params: the variables dict as returned by ``model.init``; an encoder-only
      ``{'params': {'encoder': ...}}`` also works since only the encoder runs.
    images01: (B, H, W, 3) float images in [0, 1].

  Returns:
    (B, h, w) int32 token ids.
  """
  logits = model.apply(params, images01, method=DiscreteVAE.encode)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def decode(model: DiscreteVAE, params: Any, ids: Array) -> Array:
  """Token ids (B, h, w) -> images in [0, 1] (B, d h, d w, 3).

  Args:
    model: the `DiscreteVAE`.
    params: its variables dict (must contain the decoder).
    ids: (B, h, w) integer token ids.

  Returns:
    float32 reconstructed images in [0, 1].
  """
  codes = jax.nn.one_hot(ids, model.vocab_size, dtype=jnp.float32)
  out = model.apply(params, codes, method=DiscreteVAE.decode_codes)
  return _reconstruct(out, model.recon_loss, model.input_norm)


def codebook_stats(token_counts: Array) -> dict[str, Array]:
  """Codebook usage statistics from a token histogram.

  Args:
    token_counts: (V,) counts of each code.

  Returns:
    dict with ``perplexity`` = exp(entropy of the normalised histogram) (1 when
    one code is used, V when all are used equally) and ``usage`` = fraction of
    codes with count > 0; float32 scalars.
  """
  counts = jnp.asarray(token_counts, jnp.float32)
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)),
                               0.0))
  return {'perplexity': jnp.exp(entropy),
          'usage': jnp.mean((counts > 0).astype(jnp.float32))}


__all__ = [
    'Conv2d', 'ConvTranspose2d', 'DalleEncoderBlock', 'DalleDecoderBlock',
    'DalleEncoder', 'DalleDecoder', 'CompactResBlock', 'CompactEncoder',
    'CompactDecoder', 'DiscreteVAE', 'gumbel_softmax', 'kl_to_uniform',
    'map_pixels', 'unmap_pixels', 'logit_laplace_nll', 'elbo_loss',
    'tokenize', 'decode', 'codebook_stats',
]
