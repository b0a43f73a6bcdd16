"""BEiT + UperNet semantic segmentation (Flax Linen), as unilm `beit/semantic_segmentation` has it.

The model is mmseg's `EncoderDecoder` of unilm's config `configs/_base_/models/upernet_beit.py`
(backbone `backbone/beit.py`, mmseg 0.11 `UPerHead` and `FCNHead`); Hugging Face's
`BeitForSemanticSegmentation` (`transformers/models/beit/modeling_beit.py`) ports it, and the
tests prove this module equal to that port. Everything is channels-last (NHWC).

* Backbone: `vit.BEiT` without heads (no mask token, per-block relative position bias by
  default, LayerScale, stochastic depth). The outputs of blocks `out_indices` (0-based, unilm's
  `if i in self.out_indices` over `enumerate(self.blocks)`: Base (3, 5, 7, 11), Large (7, 11,
  15, 23)) lose the cls token and become (B, H/p, W/p, D) maps. No final norm is applied to them
  (unilm's segmentation backbone has none; HF reads `hidden_states`, taken before
  `BeitModel.layernorm`). HF's own `config.out_indices` count differently: HF index i is
  `hidden_states[i - 1]`, the output of block i - 2; see `convert/segmentation.py`.
* Neck (unilm `fpn1..fpn4`, HF `BeitFPNNeck`): fpn1 = ConvTranspose 2x2/2 -> BatchNorm -> GELU
  (exact) -> ConvTranspose 2x2/2 (stride 4 for patch 16), fpn2 = ConvTranspose 2x2/2, fpn3 =
  identity, fpn4 = MaxPool 2x2/2. This is unilm's patch-16 neck; HF uses it whatever the patch
  size (unilm's patch-8 variant, with another neck, is not built here).
* UperNet head (`UPerHead`, HF `BeitUperHead`), `channels` wide (768 Base, 1024 Large): a
  pyramid pooling module on the coarsest map (adaptive average pools `pool_scales` -> 1x1
  ConvModule -> bilinear upsampling, concatenated with the map, 3x3 `bottleneck`); 1x1
  `lateral_convs` on the other maps; top-down path (upsample + add); 3x3 `fpn_convs`; every
  level upsampled to the finest, concatenated, 3x3 `fpn_bottleneck`; Dropout2d(0.1); 1x1
  `conv_seg` (with bias).
* Auxiliary head (`FCNHead`, HF `BeitFCNHead`) on the third map (in_index 2): `aux_num_convs`
  (1) 3x3 ConvModules of `aux_channels` (256), concat_input=False, Dropout2d(0.1), 1x1
  `conv_seg`. HF's defaults (`auxiliary_channels=256`, `auxiliary_num_convs=1`,
  `auxiliary_concat_input=False`) are unilm's.
* ConvModule (mmcv, HF `BeitConvLayer`): conv without bias -> BatchNorm -> ReLU.

Resizes are bilinear with align_corners=False, written with torch's formulas
(`resize_bilinear`), and the pools are torch's `AdaptiveAvgPool2d` (`adaptive_avg_pool`); both
use static indices, no matmul, so their precision does not depend on the backend's matmul
default. The logits are returned at the feature resolution (stride 4, before mmseg's final
resize); `resize_logits` brings them to the image size.

BatchNorm (`BatchNorm` below) is torch's: eps 1e-5, torch momentum 0.1 (0.9 here, the weight of
the old running value), normalisation by the biased batch variance but the running variance
updated with the unbiased one (n / (n - 1)), which `flax.linen.BatchNorm` does not do (it
matters: the PPM's 1x1 branch normalises only B values per channel). Statistics are float32 and
two-pass. Under `jax.jit` on a batch sharded over a device mesh, the mean and variance over the
batch axes are reductions over the *global* batch, i.e. what unilm's SyncBN does across GPUs.

Differences from the references, on purpose: Dropout2d before each classifier is mmseg's (HF
has none; set `dropout_rate=0` to train like HF). Initialisation follows mmseg/unilm: backbone
as `vit.classifier_model` (timm's truncated normal), ConvModule convs kaiming normal (fan_out,
ReLU), BatchNorm (1, 0), `conv_seg` N(0, 0.01) with zero bias, the transposed convs torch's
default U(+-1/sqrt(fan_in)), fan_in = out_channels * 4 (torch reads dim 1 of (in, out, k, k)).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beit_jax.models import ops, vit

Array = jax.Array
DType = Any

BN_MOMENTUM = 0.9  # torch's momentum 0.1.
BN_EPS = 1e-5  # torch BatchNorm2d / SyncBatchNorm default (mmseg's SyncBN, HF's BatchNorm2d).
# unilm's configs: `upernet_beit_{base_12,large_24}_*.py`.
UNILM_OUT_INDICES = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23)}
# Per variant: (init_values, drop_path_rate) of unilm's ADE20K configs.
UNILM_BACKBONE = {"base": (0.1, 0.1), "large": (1e-6, 0.2)}


def default_out_indices(depth: int) -> tuple[int, int, int, int]:
  """unilm's block indices for depth 12 and 24; otherwise the last block of each quarter
  ((0, 1, 2, 3) for 4 blocks, (0, 2, 3, 5) for 6)."""
  if depth in UNILM_OUT_INDICES:
    return UNILM_OUT_INDICES[depth]
  if depth < 4:
    raise ValueError(
      f"A {depth}-block backbone has no 4 distinct feature blocks; pass out_indices."
    )
  return tuple((k + 1) * depth // 4 - 1 for k in range(4))


# -- Resampling with torch's semantics -------------------------------------------------------
def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
  """torch `AdaptiveAvgPool2d` bins along one axis: [floor(i*size/out), ceil((i+1)*size/out))."""
  return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def adaptive_avg_pool(x: Array, out_size: int | tuple[int, int]) -> Array:
  """(B, H, W, C) -> (B, oh, ow, C), torch's `adaptive_avg_pool2d` (bins may overlap and need
  not divide H, W). The mean of a rectangle is the mean over its rows of the row means."""
  oh, ow = (out_size, out_size) if isinstance(out_size, int) else out_size
  _, h, w, _ = x.shape
  xf = x.astype(jnp.float32)
  rows = jnp.stack([xf[:, a:b].mean(axis=1) for a, b in adaptive_bins(h, oh)], axis=1)
  out = jnp.stack([rows[:, :, a:b].mean(axis=2) for a, b in adaptive_bins(w, ow)], axis=2)
  return out.astype(x.dtype)


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """torch `upsample_bilinear2d` (align_corners=False) along one axis, in float32 like its CPU
  kernel: src = max(scale * (dst + 0.5) - 0.5, 0), scale = in / out; taps i0 = floor(src),
  i1 = min(i0 + 1, in - 1); weight of i1 = src - i0. Returns (i0, i1, weight of i1)."""
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  return i0, i1, (src - i0).astype(np.float32)


def _lerp_axis(x: Array, axis: int, out_size: int) -> Array:
  i0, i1, w1 = _linear_taps(x.shape[axis], out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  w1 = jnp.asarray(w1.reshape(shape), x.dtype)
  return jnp.take(x, i0, axis=axis) * (1 - w1) + jnp.take(x, i1, axis=axis) * w1


def resize_bilinear(x: Array, size: tuple[int, int]) -> Array:
  """(B, H, W, C) -> (B, *size, C), torch `F.interpolate(mode="bilinear", align_corners=False)`
  (mmseg `resize`), up or down, without antialiasing; width first, then height, as torch."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return _lerp_axis(_lerp_axis(x, 2, size[1]), 1, size[0])


def resize_logits(logits: Array, image_size: int | tuple[int, int]) -> Array:
  """Stride-4 logits (B, h, w, K) -> (B, H, W, K) float32 at the image size, bilinearly with
  align_corners=False (mmseg `EncoderDecoder.encode_decode`)."""
  size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  return resize_bilinear(logits.astype(jnp.float32), size)


# -- Layers --------------------------------------------------------------------------------
def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm(nn.Module):
  """torch `BatchNorm2d` over the last axis; variables named like `flax.linen.BatchNorm`'s
  (params `scale`, `bias`; batch_stats `mean`, `var`). See the module docstring."""

  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPS
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      n = int(np.prod(x.shape[:-1]))
      if n < 2:
        raise ValueError(
          f"BatchNorm in training needs more than 1 value per channel, got input {x.shape}."
        )
      mean = xf.mean(axes)
      var = jnp.square(xf - mean).mean(axes)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var * (n / (n - 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return ((xf - mean) * mul + bias).astype(self.dtype)


class ConvModule(nn.Module):
  """mmcv `ConvModule` / HF `BeitConvLayer`: k x k conv (no bias, 'same' padding) -> BatchNorm
  -> ReLU. Params `conv/kernel` (HWIO), `bn/{scale,bias}`."""

  features: int
  kernel_size: int = 1
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    k, p = self.kernel_size, self.kernel_size // 2
    x = nn.Conv(
      self.features,
      (k, k),
      padding=((p, p), (p, p)),
      use_bias=False,
      kernel_init=KAIMING_FAN_OUT,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="conv",
    )(x)
    return nn.relu(BatchNorm(dtype=self.dtype, name="bn")(x, train))


class ConvTranspose2x2(nn.Module):
  """torch `ConvTranspose2d(kernel_size=2, stride=2)`: each input pixel becomes a 2x2 block,
  out[2i + a, 2j + b] = x[i, j] @ kernel[a, b] + bias. Kernel (2, 2, in, out) is torch's
  (in, out, 2, 2) weight transposed (2, 3, 0, 1)."""

  features: int
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    bound = 1.0 / np.sqrt(self.features * 4)
    kernel = self.param("kernel", _uniform(bound), (2, 2, c, self.features), jnp.float32)
    bias = self.param("bias", _uniform(bound), (self.features,), jnp.float32)
    y = jnp.einsum("nhwc,abco->nhawbo", x.astype(self.dtype), kernel.astype(self.dtype))
    b, h, _, w, _, o = y.shape
    return y.reshape(b, 2 * h, 2 * w, o) + bias.astype(self.dtype)


def cls_seg(x: Array, num_classes: int, rate: float, train: bool) -> Array:
  """mmseg `BaseDecodeHead.cls_seg`: Dropout2d (whole channels per sample) -> 1x1 `conv_seg`
  with bias, float32 logits. Call inside a compact method (the layers join that module)."""
  x = nn.Dropout(rate, broadcast_dims=(1, 2), name="dropout")(x, deterministic=not train)
  return nn.Conv(
    num_classes,
    (1, 1),
    kernel_init=nn.initializers.normal(0.01),
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    name="conv_seg",
  )(x)


class UPerHead(nn.Module):
  """mmseg `UPerHead` (HF `BeitUperHead`) on four maps, finest first; logits at the finest.

  Params `psp_modules_i`, `bottleneck`, `lateral_convs_i`, `fpn_convs_i`, `fpn_bottleneck`
  (ConvModules) and `conv_seg`; mmseg's keys with `.i` -> `_i` (`psp_modules.i.1` -> `_i`).
  """

  num_classes: int
  channels: int
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  dropout_rate: float = 0.1
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, feats: list[Array], train: bool) -> Array:
    conv = functools.partial(ConvModule, self.channels, dtype=self.dtype)
    top = feats[-1]
    size = top.shape[1:3]
    ppm = [top]
    for i, s in enumerate(self.pool_scales):  # mmseg `PPM`: pool -> 1x1 -> upsample.
      y = conv(1, name=f"psp_modules_{i}")(adaptive_avg_pool(top, s), train)
      ppm.append(resize_bilinear(y, size))
    laterals = [conv(1, name=f"lateral_convs_{i}")(f, train) for i, f in enumerate(feats[:-1])]
    laterals.append(conv(3, name="bottleneck")(jnp.concatenate(ppm, axis=-1), train))
    for i in range(len(laterals) - 1, 0, -1):  # Top-down: each level gets the coarser one.
      laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
    outs = [conv(3, name=f"fpn_convs_{i}")(x, train) for i, x in enumerate(laterals[:-1])]
    outs.append(laterals[-1])
    finest = outs[0].shape[1:3]
    outs = [outs[0]] + [resize_bilinear(x, finest) for x in outs[1:]]
    x = conv(3, name="fpn_bottleneck")(jnp.concatenate(outs, axis=-1), train)
    return cls_seg(x, self.num_classes, self.dropout_rate, train)


class FCNHead(nn.Module):
  """mmseg `FCNHead` (HF `BeitFCNHead`) with concat_input=False: `num_convs` 3x3 ConvModules
  (`convs_i`) on map `in_index`, then `conv_seg`."""

  num_classes: int
  channels: int = 256
  num_convs: int = 1
  in_index: int = 2
  dropout_rate: float = 0.1
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, feats: list[Array], train: bool) -> Array:
    x = feats[self.in_index]
    for i in range(self.num_convs):
      x = ConvModule(self.channels, 3, dtype=self.dtype, name=f"convs_{i}")(x, train)
    return cls_seg(x, self.num_classes, self.dropout_rate, train)


# -- The model -----------------------------------------------------------------------------
class Segmenter(nn.Module):
  """BEiT backbone + FPN neck + UperNet head (+ FCN auxiliary head); NHWC images in.

  `__call__(images, train=...)` returns (logits, aux_logits), float32 (B, H/4, W/4,
  num_classes) for patch 16 (aux_logits None without the auxiliary head). Train mode uses batch
  statistics and updates `batch_stats` (apply with `mutable=["batch_stats"]`), and drops
  (rng 'dropout') when `dropout_rate` or `drop_path_rate` > 0.

  Param tree: `backbone/...` (`vit.BEiT`'s names), `fpn1_0`, `fpn1_1` (BatchNorm), `fpn1_3`,
  `fpn2_0` (unilm's `backbone.fpn1.0` ...), `decode_head/...`, `auxiliary_head/...`.
  """

  image_size: int = 512
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  init_values: float = 0.1
  drop_path_rate: float = 0.1
  use_abs_pos_emb: bool = False
  use_rel_pos_bias: bool = True
  use_shared_rel_pos_bias: bool = False
  out_indices: tuple[int, ...] = (3, 5, 7, 11)
  num_classes: int = 150
  channels: int = 768
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  use_auxiliary_head: bool = True
  aux_channels: int = 256
  aux_num_convs: int = 1
  aux_in_index: int = 2
  dropout_rate: float = 0.1
  init_truncation: float = 100.0
  remat: bool = False
  attention: str = "auto"
  dtype: DType = jnp.float32

  def setup(self) -> None:
    if len(self.out_indices) != 4 or not all(0 <= i < self.depth for i in self.out_indices):
      raise ValueError(
        f"out_indices={self.out_indices} must be 4 block indices in [0, {self.depth})."
      )
    if self.aux_num_convs < 1 or not 0 <= self.aux_in_index < 4:
      raise ValueError(
        f"aux_num_convs={self.aux_num_convs} must be >= 1 and aux_in_index="
        f"{self.aux_in_index} one of the 4 maps."
      )
    self.backbone = backbone_model(self, name="backbone")
    d = self.embed_dim
    self.fpn1_0 = ConvTranspose2x2(d, self.dtype)
    self.fpn1_1 = BatchNorm(dtype=self.dtype)
    self.fpn1_3 = ConvTranspose2x2(d, self.dtype)
    self.fpn2_0 = ConvTranspose2x2(d, self.dtype)
    self.decode_head = UPerHead(
      self.num_classes, self.channels, tuple(self.pool_scales), self.dropout_rate, self.dtype
    )
    if self.use_auxiliary_head:
      self.auxiliary_head = FCNHead(
        self.num_classes,
        self.aux_channels,
        self.aux_num_convs,
        self.aux_in_index,
        self.dropout_rate,
        self.dtype,
      )

  def features(self, images: Array, *, train: bool) -> list[Array]:
    """The four neck outputs, strides p/4, p/2, p, 2p (4, 8, 16, 32 for patch 16)."""
    _, layers = self.backbone.encode(images, train=train, return_layers=True)
    b = images.shape[0]
    gh, gw = self.backbone.grid
    maps = [layers[i][:, 1:].reshape(b, gh, gw, self.embed_dim) for i in self.out_indices]
    x = self.fpn1_3(ops.gelu(self.fpn1_1(self.fpn1_0(maps[0]), train)))
    return [
      x,
      self.fpn2_0(maps[1]),
      maps[2],
      nn.max_pool(maps[3], (2, 2), strides=(2, 2)),
    ]

  def __call__(self, images: Array, *, train: bool) -> tuple[Array, Array | None]:
    feats = self.features(images, train=train)
    logits = self.decode_head(feats, train)
    aux = self.auxiliary_head(feats, train) if self.use_auxiliary_head else None
    return logits, aux


def backbone_model(model: Segmenter, **module_kwargs: Any) -> vit.BEiT:
  """The `vit.BEiT` that `model` runs as its backbone (no heads, no mask token): the model
  pretrained weights are loaded into (`models.transfer.transfer_params` on the
  `backbone` subtree) and whose layer ids the layer-wise lr decay reads."""
  return vit.BEiT(
    image_size=model.image_size,
    patch_size=model.patch_size,
    embed_dim=model.embed_dim,
    depth=model.depth,
    num_heads=model.num_heads,
    mlp_ratio=model.mlp_ratio,
    init_values=model.init_values,
    drop_path_rate=model.drop_path_rate,
    use_abs_pos_emb=model.use_abs_pos_emb,
    use_shared_rel_pos_bias=model.use_shared_rel_pos_bias,
    use_rel_pos_bias=model.use_rel_pos_bias,
    use_mask_token=False,
    vocab_size=0,
    num_classes=0,
    init_truncation=model.init_truncation,
    remat=model.remat,
    attention=model.attention,
    dtype=model.dtype,
    **module_kwargs,
  )


def architecture(model: Segmenter) -> dict[str, Any]:
  """The model's constructor arguments except `dtype`, `attention` and `remat` (how it
  computes, not what; JSON-able: tuples become lists; `Segmenter(**a)` rebuilds it)."""
  skip = ("parent", "name", "dtype", "attention", "remat")
  out = {}
  for f in dataclasses.fields(model):
    if f.name not in skip:
      value = getattr(model, f.name)
      out[f.name] = list(value) if isinstance(value, tuple) else value
  return out


def from_architecture(kwargs: dict[str, Any], **overrides: Any) -> Segmenter:
  """`Segmenter` from `architecture`'s dict (lists back to tuples), with `overrides`."""
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  kw.update(overrides)
  return Segmenter(**kw)


def segmenter(variant: str, num_classes: int, image_size: int, **overrides: Any) -> Segmenter:
  """unilm's ADE20K UperNet for a `vit.VARIANTS` name: per-block rel-pos, no abs pos,
  `channels` = width, `out_indices` from `default_out_indices(depth)`, LayerScale / drop
  path of unilm's config for base and large (0.1 / 0.1 otherwise)."""
  init_values, dpr = UNILM_BACKBONE.get(variant, (0.1, 0.1))
  kw: dict[str, Any] = dict(
    num_classes=num_classes,
    image_size=image_size,
    init_values=init_values,
    drop_path_rate=dpr,
    use_rel_pos_bias=True,
    use_shared_rel_pos_bias=False,
    use_abs_pos_emb=False,
  )
  kw.update(overrides)
  kwargs = vit.model_kwargs(variant, **kw)
  kwargs.setdefault("channels", kwargs["embed_dim"])
  kwargs["out_indices"] = tuple(kwargs.get("out_indices") or default_out_indices(kwargs["depth"]))
  kwargs["pool_scales"] = tuple(kwargs.get("pool_scales", (1, 2, 3, 6)))
  return Segmenter(**kwargs)


def abstract_variables(model: Segmenter, batch: int = 1) -> dict[str, Any]:
  """ShapeDtypeStructs of {'params', 'batch_stats'} (nothing is allocated)."""
  images = jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: dict(model.init(jax.random.PRNGKey(0), x, train=False)), images)


def param_count(model: Segmenter) -> int:
  """Number of parameters (batch statistics excluded)."""
  leaves = jax.tree.leaves(abstract_variables(model)["params"])
  return int(sum(np.prod(x.shape) for x in leaves))
