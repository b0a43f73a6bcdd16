"""A compact dVAE encoder and decoder (lucidrains ``DiscreteVAE`` style), NHWC layout.

For small data and CPUs: strided 4x4 convolutions down and transposed convolutions up,
residual blocks, and a learned codebook that the decoder mixes the codes with.
`beit_jax.models.dvae` wraps the pair into the `DiscreteVAE` tokenizer (`dvae.compact_dvae`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beit_jax.models.conv import Conv2d, ConvTranspose2d

Array = jax.Array
Dtype = Any


def _check_num_layers(num_layers: int) -> None:
  if num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}")


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
    h = Conv2d(self.features, 3, dtype=self.dtype, name="conv_1")(x)
    h = Conv2d(self.features, 3, dtype=self.dtype, name="conv_2")(nn.relu(h))
    h = Conv2d(self.features, 1, dtype=self.dtype, name="conv_3")(nn.relu(h))
    return x.astype(self.dtype) + h


class CompactEncoder(nn.Module):
  """Compact encoder: images (B, H, W, 3) -> logits (B, H/2^L, W/2^L, V).

  ``down_1..down_L``: 4x4 stride-2 conv + ReLU (the first from the image channels to
  `hidden`); ``res_1..res_R``: `CompactResBlock`; ``output``: 1x1 conv to float32 vocab
  logits. Odd sizes are floored at each stride-2 conv.

  Attributes:
    num_layers: number L >= 1 of stride-2 convs.
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

  def __post_init__(self) -> None:
    _check_num_layers(self.num_layers)
    super().__post_init__()

  @property
  def downsample(self) -> int:
    """Spatial downsampling factor from pixels to code positions (2^L)."""
    return 2**self.num_layers

  @nn.compact
  def __call__(self, x: Array, features_only: bool = False) -> Array:
    """Encodes normalised images (B, H, W, C) to float32 logits; with `features_only`
    (bound params only) the (B, h, w, hidden) float32 features the ``output`` 1x1 conv
    maps to logits (what `dvae.kmeans_logits_init` clusters)."""
    for i in range(self.num_layers):
      x = nn.relu(Conv2d(self.hidden, 4, strides=2, dtype=self.dtype, name=f"down_{i + 1}")(x))
    for i in range(self.num_resblocks):
      x = CompactResBlock(self.hidden, dtype=self.dtype, name=f"res_{i + 1}")(x)
    if features_only:
      return x.astype(jnp.float32)
    return Conv2d(self.vocab_size, 1, dtype=jnp.float32, name="output")(x)


class CompactDecoder(nn.Module):
  """Compact decoder: codes (B, h, w, V) -> (B, 2^L h, 2^L w, C) float32.

  The codes (one-hot or soft) are mixed with a learned ``codebook`` (V, codebook_dim) by
  einsum (float32), then ``input`` 1x1 conv to `hidden` (float32), ``res_1..res_R``
  `CompactResBlock`, ``up_1..up_L`` 4x4 stride-2 transposed conv + ReLU, and ``output`` 1x1
  conv to `output_channels` (3 for MSE, 6 for logit-Laplace: mu then ln b).

  Attributes:
    num_layers: number L >= 1 of x2 transposed convs.
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

  def __post_init__(self) -> None:
    _check_num_layers(self.num_layers)
    super().__post_init__()

  @property
  def raw_channels(self) -> int:
    """Channels of the raw output (`output_channels`)."""
    return self.output_channels

  @nn.compact
  def __call__(self, codes: Array) -> Array:
    """Decodes one-hot or soft codes (B, h, w, V) to raw float32 outputs."""
    if codes.shape[-1] != self.vocab_size:
      raise ValueError(
        f"codes have {codes.shape[-1]} channels but model built for {self.vocab_size}"
      )
    codebook = self.param(
      "codebook",
      nn.initializers.normal(stddev=1.0),
      (self.vocab_size, self.codebook_dim),
      jnp.float32,
    )
    x = jnp.einsum("bhwv,vd->bhwd", codes.astype(jnp.float32), codebook)
    x = Conv2d(self.hidden, 1, dtype=jnp.float32, name="input")(x)
    for i in range(self.num_resblocks):
      x = CompactResBlock(self.hidden, dtype=self.dtype, name=f"res_{i + 1}")(x)
    for i in range(self.num_layers):
      x = nn.relu(ConvTranspose2d(self.hidden, 4, 2, dtype=self.dtype, name=f"up_{i + 1}")(x))
    out = Conv2d(self.output_channels, 1, dtype=self.dtype, name="output")(x)
    return out.astype(jnp.float32)
