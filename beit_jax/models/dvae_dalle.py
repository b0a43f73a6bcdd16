"""The OpenAI DALL-E dVAE encoder and decoder in Flax Linen, NHWC layout.

An exact port of DALL-E's ``dall_e/encoder.py`` and ``dall_e/decoder.py``. The parameter
tree mirrors the PyTorch state dict one to one: torch
``blocks.group_1.block_1.res_path.conv_1.w`` (OIHW) is
``params['blocks']['group_1']['block_1']['res_path']['conv_1']['w']`` (HWIO) here, which is
what `beit_jax.convert.dalle` relies on. The encoder downsamples by 8 (112 px -> 14x14 tokens)
and the decoder predicts the 6 logit-Laplace parameters per pixel (mu for RGB, then ln b).

`beit_jax.models.dvae` wraps the pair into the `DiscreteVAE` tokenizer (`dvae.dalle_dvae`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beit_jax.models.conv import Conv2d

Array = jax.Array
Dtype = Any

DOWNSAMPLE = 8  # Three 2x2 max-pools.


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
      x = Conv2d(f, k, dtype=self.dtype, name=f"conv_{i + 1}")(nn.relu(x))
    return x


class DalleEncoderBlock(nn.Module):
  """DALL-E ``EncoderBlock``: ``id_path(x) + post_gain * res_path(x)``.

  ``res_path`` is ReLU->3x3 (n_in->n_out/4) -> ReLU->3x3 -> ReLU->3x3 -> ReLU->1x1 (->n_out);
  ``id_path`` is a 1x1 conv when n_in != n_out, else the identity;
  ``post_gain = 1 / n_layers**2``.

  Attributes:
    n_in: input channels (taken from the input; kept for DALL-E parity and checked against
      it).
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

  ``res_path`` is ReLU->1x1 (n_in->n_out/4) -> ReLU->3x3 -> ReLU->3x3 -> ReLU->3x3 (->n_out);
  ``id_path`` is a 1x1 conv when n_in != n_out, else the identity;
  ``post_gain = 1 / n_layers**2``.

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


def _dalle_block(
  block: DalleEncoderBlock | DalleDecoderBlock, x: Array, kernel_sizes: tuple[int, int, int, int]
) -> Array:
  """Shared body of the DALL-E encoder and decoder blocks (inside compact)."""
  if x.shape[-1] != block.n_in:
    raise ValueError(f"block built for {block.n_in} input channels, got {x.shape[-1]}")
  if block.n_out % 4:
    raise ValueError(f"n_out must be a multiple of 4, got {block.n_out}")
  n_hid = block.n_out // 4
  post_gain = 1.0 / block.n_layers**2
  if block.n_in != block.n_out:
    identity = Conv2d(block.n_out, 1, dtype=block.dtype, name="id_path")(x)
  else:
    identity = x.astype(block.dtype)
  res = _ResPath(
    (n_hid, n_hid, n_hid, block.n_out), kernel_sizes, dtype=block.dtype, name="res_path"
  )(x)
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
      x = self.block_cls(n_in, self.n_out, self.n_layers, dtype=self.dtype, name=f"block_{i + 1}")(
        x
      )
    if self.resample == "pool":
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    elif self.resample == "upsample":
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    elif self.resample != "none":
      raise ValueError(f"unknown resample {self.resample!r}")
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
    return Conv2d(self.features, self.kernel_size, dtype=self.dtype, name="conv")(nn.relu(x))


class _DalleEncoderBlocks(nn.Module):
  """DALL-E encoder's ``blocks`` Sequential (see `DalleEncoder`)."""

  group_count: int
  n_hid: int
  n_blk_per_group: int
  vocab_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_layers = self.group_count * self.n_blk_per_group
    h = self.n_hid
    x = Conv2d(h, 7, dtype=self.dtype, name="input")(x)
    groups = ((h, h, "pool"), (h, 2 * h, "pool"), (2 * h, 4 * h, "pool"), (4 * h, 8 * h, "none"))
    for g, (n_in, n_out, resample) in enumerate(groups):
      x = _DalleGroup(
        DalleEncoderBlock,
        n_in,
        n_out,
        self.n_blk_per_group,
        n_layers,
        resample,
        dtype=self.dtype,
        name=f"group_{g + 1}",
      )(x)
    # DALL-E builds the final 1x1 with use_float16=False: always float32.
    return _ReluConv(self.vocab_size, 1, dtype=jnp.float32, name="output")(x)


def _check_n_hid(n_hid: int) -> None:
  """DALL-E's widths n_hid, 2, 4 and 8 n_hid with a bottleneck of a quarter: a multiple of 4."""
  if n_hid % 4:
    raise ValueError(f"n_hid must be a multiple of 4, got {n_hid}")


class DalleEncoder(nn.Module):
  """DALL-E dVAE encoder: images (B, H, W, C) -> logits (B, H/8, W/8, V).

  Structure (as ``dall_e/encoder.py``): ``input`` 7x7 conv (C -> n_hid); ``group_1``
  n_hid -> n_hid, ``group_2`` -> 2 n_hid, ``group_3`` -> 4 n_hid, each followed by 2x2
  max-pool; ``group_4`` -> 8 n_hid; ``output`` ReLU -> 1x1 conv -> vocab logits in float32.
  The four groups are fixed as in DALL-E; `group_count` only enters
  ``n_layers = group_count * n_blk_per_group`` (the residual post-gain 1/n_layers^2),
  exactly as in DALL-E. All parameters live under ``blocks``.

  Attributes:
    group_count: DALL-E's group_count (4).
    n_hid: base width (256); a multiple of 4.
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

  def __post_init__(self) -> None:
    _check_n_hid(self.n_hid)
    super().__post_init__()

  @property
  def downsample(self) -> int:
    """Spatial downsampling factor from pixels to code positions (8)."""
    return DOWNSAMPLE

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Encodes DALL-E-mapped pixels (B, H, W, C) to float32 logits."""
    if x.ndim != 4:
      raise ValueError(f"input shape {x.shape} is not 4d")
    if x.shape[-1] != self.input_channels:
      raise ValueError(
        f"input has {x.shape[-1]} channels but model built for {self.input_channels}"
      )
    return _DalleEncoderBlocks(
      self.group_count,
      self.n_hid,
      self.n_blk_per_group,
      self.vocab_size,
      dtype=self.dtype,
      name="blocks",
    )(x.astype(jnp.float32))


class _DalleDecoderBlocks(nn.Module):
  """DALL-E decoder's ``blocks`` Sequential (see `DalleDecoder`)."""

  group_count: int
  n_init: int
  n_hid: int
  n_blk_per_group: int
  output_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_layers = self.group_count * self.n_blk_per_group
    h = self.n_hid
    # DALL-E builds the input 1x1 with use_float16=False: always float32.
    x = Conv2d(self.n_init, 1, dtype=jnp.float32, name="input")(x)
    groups = (
      (self.n_init, 8 * h, "upsample"),
      (8 * h, 4 * h, "upsample"),
      (4 * h, 2 * h, "upsample"),
      (2 * h, h, "none"),
    )
    for g, (n_in, n_out, resample) in enumerate(groups):
      x = _DalleGroup(
        DalleDecoderBlock,
        n_in,
        n_out,
        self.n_blk_per_group,
        n_layers,
        resample,
        dtype=self.dtype,
        name=f"group_{g + 1}",
      )(x)
    return _ReluConv(2 * self.output_channels, 1, dtype=self.dtype, name="output")(x)


class DalleDecoder(nn.Module):
  """DALL-E dVAE decoder: codes (B, h, w, V) -> (B, 8h, 8w, 2 C) float32.

  Structure (as ``dall_e/decoder.py``): ``input`` 1x1 conv V -> n_init (float32);
  ``group_1`` n_init -> 8 n_hid, ``group_2`` -> 4 n_hid, ``group_3`` -> 2 n_hid, each
  followed by nearest x2 upsampling; ``group_4`` -> n_hid; ``output`` ReLU -> 1x1 conv ->
  2 C channels: the logit-Laplace mu for the C colour channels, then ln b for them. As in
  DALL-E the four groups are fixed and `group_count` only sets n_layers. All parameters live
  under ``blocks``. The output is returned as float32.

  Attributes:
    group_count: DALL-E's group_count (4).
    n_init: width after the input conv (128).
    n_hid: base width (256); a multiple of 4.
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

  def __post_init__(self) -> None:
    _check_n_hid(self.n_hid)
    super().__post_init__()

  @property
  def raw_channels(self) -> int:
    """Channels of the raw output: 2 C (mu, then ln b)."""
    return 2 * self.output_channels

  @nn.compact
  def __call__(self, codes: Array) -> Array:
    """Decodes one-hot or soft codes (B, h, w, V) to raw float32 outputs."""
    if codes.ndim != 4:
      raise ValueError(f"input shape {codes.shape} is not 4d")
    if codes.shape[-1] != self.vocab_size:
      raise ValueError(
        f"input has {codes.shape[-1]} channels but model built for {self.vocab_size}"
      )
    out = _DalleDecoderBlocks(
      self.group_count,
      self.n_init,
      self.n_hid,
      self.n_blk_per_group,
      self.output_channels,
      dtype=self.dtype,
      name="blocks",
    )(codes.astype(jnp.float32))
    return out.astype(jnp.float32)
