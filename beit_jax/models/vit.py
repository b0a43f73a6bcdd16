"""The BEiT Vision Transformer (Flax Linen), exactly as microsoft/unilm `beit/` builds it.

One module, :class:`BEiT`, covers unilm's `VisionTransformerForMaskedImageModeling`
(`modeling_pretrain.py`) and `VisionTransformer` (`modeling_finetune.py`):

* patch embedding: a stride-`patch_size` convolution (written as patchify + matmul,
  which is the same operation) with kernel (p, p, 3, D) in HWIO layout;
* optional mask token: masked patch embeddings become `mask_token` *before* the cls
  token and the position terms are added (`x * (1 - w) + mask_token * w`);
* optional absolute position embedding; relative position bias either shared by all
  blocks (`rel_pos_bias/relative_position_bias_table`, the pretraining default) or one
  table per block (`blocks_i/attn/relative_position_bias_table`, fine-tuning);
* pre-LN blocks, LayerNorm eps 1e-6, exact (erf) GELU, qkv without bias plus learnable
  `q_bias` / `v_bias` (K has no bias), q scaled by head_dim^-0.5, LayerScale gammas
  when `init_values > 0`, stochastic depth `linspace(0, drop_path_rate, depth)`;
* heads: MIM (`norm` -> `lm_head` to the visual vocabulary, applied only at the
  positions asked for) and classification (`fc_norm(mean of patch tokens)` -> `head`,
  or `norm(x)[:, 0]` with `use_mean_pooling=False`).

Parameter names follow unilm's state-dict keys (`blocks.3.attn.qkv.weight` is
`blocks_3/attn/qkv/kernel`), so weights convert one-to-one.

Initialisation is unilm's (`modeling_pretrain.py` `_init_weights` / `fix_init_weight`,
`modeling_finetune.py` the same with timm's `trunc_normal_`): truncated normal std 0.02 with bounds
±`init_truncation` standard deviations (1.0 = unilm pretraining's ±1σ; 100 = timm's
absolute ±2 used by fine-tuning) for every Linear/Conv kernel and the cls / mask /
position tokens; zero biases, q/v biases and relative-position tables; LayerNorm (1, 0);
block l's `attn/proj` and `mlp/fc2` kernels divided by sqrt(2 l) (`fix_init_weight`);
the classifier head scaled by `init_scale`.

Precision: parameters are float32; `dtype` is the compute dtype of the matmuls and
activations (bfloat16 on accelerators). LayerNorm statistics, the attention softmax, the
MIM / classifier logits are float32 whatever `dtype` is.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beit_jax.models import attention as attention_lib
from beit_jax.models import ops

Array = jax.Array
DType = Any

LN_EPS = 1e-6
INIT_STD = 0.02

# name -> (embed_dim, depth, num_heads). "test" is for unit tests only.
VARIANTS: dict[str, tuple[int, int, int]] = {
  "test": (32, 2, 2),
  "mini": (128, 6, 4),
  "tiny": (192, 12, 3),
  "small": (384, 12, 6),
  "base": (768, 12, 12),
  "large": (1024, 24, 16),
}


def trunc_normal_init(std: float = INIT_STD, truncation: float = 1.0, scale: float = 1.0):
  """N(0, std) truncated to ±`truncation`·std, times `scale` (torch `trunc_normal_`).

  unilm's pretraining `trunc_normal_(t, std)` uses bounds a=-std, b=std, i.e.
  truncation=1. `scale` folds in post-init rescaling (fix_init_weight, init_scale).
  Hand-written: `nn.initializers.truncated_normal` rescales the std so that the truncated
  distribution has it, torch's does not.
  """

  def init(key, shape, dtype=jnp.float32):
    x = jax.random.truncated_normal(key, -truncation, truncation, shape, jnp.float32)
    return (x * (std * scale)).astype(dtype)

  return init


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
  """unilm's `relative_position_index` for a (Wh, Ww) patch grid, with the cls entries.

  Shape (N + 1, N + 1), N = Wh·Ww. For patches i, j: (dy + Wh - 1)(2Ww - 1) + (dx + Ww - 1)
  with dy = y_i - y_j, dx = x_i - x_j; row 0 (cls -> token) uses n - 3, column 0
  (token -> cls) n - 2 and (cls, cls) n - 1, where n = (2Wh - 1)(2Ww - 1) + 3.
  """
  wh, ww = grid
  coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  rel[:, :, 0] += wh - 1
  rel[:, :, 1] += ww - 1
  rel[:, :, 0] *= 2 * ww - 1
  n = num_relative_distance(grid)
  index = np.zeros((wh * ww + 1,) * 2, dtype=np.int32)
  index[1:, 1:] = rel.sum(-1)
  index[0, 0:] = n - 3
  index[0:, 0] = n - 2
  index[0, 0] = n - 1
  return index


def num_relative_distance(grid: tuple[int, int]) -> int:
  """Rows of the relative-position bias table: (2Wh - 1)(2Ww - 1) + 3."""
  return (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3


def gather_relative_bias(table: Array, grid: tuple[int, int]) -> Array:
  """(num_relative_distance, heads) table -> (heads, N + 1, N + 1) attention bias."""
  index = relative_position_index(grid)
  bias = jnp.take(table, jnp.asarray(index.reshape(-1)), axis=0)
  return bias.reshape(index.shape + (table.shape[-1],)).transpose(2, 0, 1)


class RelativePositionBias(nn.Module):
  """The shared relative-position bias (`rel_pos_bias` in unilm)."""

  grid: tuple[int, int]
  num_heads: int

  @nn.compact
  def __call__(self) -> Array:
    table = self.param(
      "relative_position_bias_table",
      nn.initializers.zeros,
      (num_relative_distance(self.grid), self.num_heads),
      jnp.float32,
    )
    return gather_relative_bias(table, self.grid)


class Attention(nn.Module):
  """Multi-head self-attention with q/v biases (no k bias) and an optional rel-pos table.

  Hand-written rather than `nn.MultiHeadDotProductAttention`: unilm's qkv has no bias but
  learnable q and v biases, and the relative position bias is added to the logits.
  `attention` picks the kernel of the core (`beit_jax.models.attention`: 'auto',
  'einsum', 'dot_product', ...); the params are the same whichever runs.
  """

  num_heads: int
  grid: tuple[int, int]
  use_rel_pos_bias: bool = False
  proj_init_scale: float = 1.0
  init_truncation: float = 1.0
  attention: str = "auto"
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, shared_bias: Array | None = None) -> Array:
    b, n, d = x.shape
    hd = d // self.num_heads
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
    w_init = trunc_normal_init(truncation=self.init_truncation)
    qkv = dense(3 * d, use_bias=False, kernel_init=w_init, name="qkv")(x)
    q_bias = self.param("q_bias", nn.initializers.zeros, (d,), jnp.float32)
    v_bias = self.param("v_bias", nn.initializers.zeros, (d,), jnp.float32)
    qkv = ops.add_broadcast(qkv, jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]))
    biases = []  # (heads, N, N) each, added to the logits.
    if self.use_rel_pos_bias:
      table = self.param(
        "relative_position_bias_table",
        nn.initializers.zeros,
        (num_relative_distance(self.grid), self.num_heads),
        jnp.float32,
      )
      biases.append(gather_relative_bias(table, self.grid))
    if shared_bias is not None:
      biases.append(shared_bias)
    kernel = attention_lib.resolve(self.attention, self.dtype, hd)
    if kernel == "einsum" or self.is_mutable_collection("intermediates"):
      # (3, B, heads, N, hd): batched matmuls over (B, heads) in the canonical layout.
      qkv = qkv.reshape(b, n, 3, self.num_heads, hd).transpose(2, 0, 3, 1, 4)
      out, attn = attention_lib.einsum_attention(
        qkv[0] * (hd**-0.5), qkv[1], qkv[2], biases, self.dtype
      )
      self.sow("intermediates", "attention", attn)  # Only kept when asked (beit_jax.viz).
      out = out.transpose(0, 2, 1, 3).reshape(b, n, d)
    else:
      qkv = qkv.reshape(b, n, 3, self.num_heads, hd)  # (B, N, 3, heads, hd): no transpose.
      bias = sum(biases[1:], biases[0]) if biases else None
      strict = self.attention == "dot_product_cudnn"  # Else no cuDNN falls back to XLA.
      out = attention_lib.dot_product_attention(
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias, hd**-0.5, kernel, strict=strict
      ).reshape(b, n, d)
    return dense(
      d,
      kernel_init=trunc_normal_init(truncation=self.init_truncation, scale=self.proj_init_scale),
      name="proj",
    )(out)


class Mlp(nn.Module):
  hidden_dim: int
  fc2_init_scale: float = 1.0
  init_truncation: float = 1.0
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
    x = dense(
      self.hidden_dim, kernel_init=trunc_normal_init(truncation=self.init_truncation), name="fc1"
    )(x)
    x = ops.gelu(x)
    return dense(
      d,
      kernel_init=trunc_normal_init(truncation=self.init_truncation, scale=self.fc2_init_scale),
      name="fc2",
    )(x)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis (params `scale`, `bias`, like `nn.LayerNorm`), statistics
  in float32, output in `dtype`; `ops.layer_norm`'s closed-form backward."""

  epsilon: float = LN_EPS
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    return ops.layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)


def layer_norm(name: str, dtype: DType) -> LayerNorm:
  """LayerNorm eps 1e-6, statistics in float32."""
  return LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name)


def drop_path(rate: float, name: str) -> nn.Dropout:
  """Stochastic depth per sample (timm `drop_path`: x / keep * Bernoulli(keep), one draw
  per example): dropout broadcast over every axis but the batch."""
  return nn.Dropout(rate, broadcast_dims=(1, 2), name=name)


class Block(nn.Module):
  """Pre-LN transformer block with LayerScale and stochastic depth.

  `layer` is 1-based (unilm's `fix_init_weight` divides this block's attention-output
  and fc2 kernels by sqrt(2 layer)).
  """

  num_heads: int
  mlp_ratio: float
  grid: tuple[int, int]
  layer: int
  drop_path_rate: float = 0.0
  init_values: float = 0.0
  use_rel_pos_bias: bool = False
  init_truncation: float = 1.0
  attention: str = "auto"
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, shared_bias: Array | None, deterministic: bool) -> Array:
    d = x.shape[-1]
    rescale = 1.0 / np.sqrt(2.0 * self.layer)

    y = Attention(
      self.num_heads,
      self.grid,
      self.use_rel_pos_bias,
      proj_init_scale=rescale,
      init_truncation=self.init_truncation,
      attention=self.attention,
      dtype=self.dtype,
      name="attn",
    )(layer_norm("norm1", self.dtype)(x), shared_bias)
    if self.init_values > 0:
      y = y * self.param(
        "gamma_1", nn.initializers.constant(self.init_values), (d,), jnp.float32
      ).astype(y.dtype)
    x = x + drop_path(self.drop_path_rate, "drop_path_1")(y, deterministic=deterministic)

    y = Mlp(
      int(d * self.mlp_ratio),
      fc2_init_scale=rescale,
      init_truncation=self.init_truncation,
      dtype=self.dtype,
      name="mlp",
    )(layer_norm("norm2", self.dtype)(x))
    if self.init_values > 0:
      y = y * self.param(
        "gamma_2", nn.initializers.constant(self.init_values), (d,), jnp.float32
      ).astype(y.dtype)
    return x + drop_path(self.drop_path_rate, "drop_path_2")(y, deterministic=deterministic)


def patchify(images: Array, patch_size: int) -> Array:
  """(B, H, W, C) -> (B, N, p*p*C): the patches in row-major order (the token order of the
  ViT), each flattened as (row, column, channel) — the layout of `PatchEmbed`'s kernel."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class PatchEmbed(nn.Module):
  """Conv(k=s=patch) as patchify + matmul; kernel (p, p, 3, D) HWIO, bias (D,)."""

  patch_size: int
  embed_dim: int
  init_truncation: float = 1.0
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    c = images.shape[-1]
    p = self.patch_size
    kernel = self.param(
      "kernel",
      trunc_normal_init(truncation=self.init_truncation),
      (p, p, c, self.embed_dim),
      jnp.float32,
    )
    bias = self.param("bias", nn.initializers.zeros, (self.embed_dim,), jnp.float32)
    patches = patchify(images, p).astype(self.dtype)
    x = patches @ kernel.reshape(p * p * c, self.embed_dim).astype(self.dtype)
    return x + bias.astype(self.dtype)


class BEiT(nn.Module):
  """BEiT ViT with a MIM head (`vocab_size > 0`) and/or a classifier (`num_classes > 0`).

  Inputs are normalised images (B, H, W, 3) with H, W = `image_size`.
  """

  image_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  init_values: float = 0.1
  drop_path_rate: float = 0.1
  use_abs_pos_emb: bool = False
  use_shared_rel_pos_bias: bool = True
  use_rel_pos_bias: bool = False
  use_mask_token: bool = True
  vocab_size: int = 8192
  num_classes: int = 0
  use_mean_pooling: bool = True
  init_scale: float = 0.001
  init_truncation: float = 1.0
  remat: bool = False
  attention: str = "auto"
  dtype: DType = jnp.float32

  def __post_init__(self) -> None:
    attention_lib.check_choice(self.attention)  # At construction, before any trace.
    super().__post_init__()

  @property
  def grid(self) -> tuple[int, int]:
    return (self.image_size // self.patch_size,) * 2

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  def no_weight_decay(self) -> tuple[str, ...]:
    """Params AdamW does not decay besides biases and norms (unilm `no_weight_decay()`,
    both models; the mask token is decayed)."""
    return ("pos_embed", "cls_token")

  def setup(self) -> None:
    if self.image_size % self.patch_size:
      raise ValueError(
        f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}."
      )
    if self.embed_dim % self.num_heads:
      raise ValueError(
        f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}."
      )
    token_init = trunc_normal_init(truncation=self.init_truncation)
    d = self.embed_dim
    self.patch_embed = PatchEmbed(
      self.patch_size, d, self.init_truncation, self.dtype, name="patch_embed"
    )
    self.cls_token = self.param("cls_token", token_init, (1, 1, d), jnp.float32)
    if self.use_mask_token:
      self.mask_token = self.param("mask_token", token_init, (1, 1, d), jnp.float32)
    if self.use_abs_pos_emb:
      self.pos_embed = self.param(
        "pos_embed", token_init, (1, self.num_patches + 1, d), jnp.float32
      )
    if self.use_shared_rel_pos_bias:
      self.rel_pos_bias = RelativePositionBias(self.grid, self.num_heads, name="rel_pos_bias")
    dpr = np.linspace(0.0, self.drop_path_rate, self.depth)
    self.blocks = [self.make_block(i + 1, float(dpr[i]), f"blocks_{i}") for i in range(self.depth)]
    use_norm = self.vocab_size > 0 or (self.num_classes > 0 and not self.use_mean_pooling)
    if use_norm:
      self.norm = layer_norm("norm", jnp.float32)
    if self.vocab_size > 0:
      self.lm_head = nn.Dense(
        self.vocab_size,
        kernel_init=token_init,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        name="lm_head",
      )
    if self.num_classes > 0:
      if self.use_mean_pooling:
        self.fc_norm = layer_norm("fc_norm", jnp.float32)
      head_init = trunc_normal_init(truncation=self.init_truncation, scale=self.init_scale)
      self.head = nn.Dense(
        self.num_classes,
        kernel_init=head_init,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        name="head",
      )

  def make_block(self, layer: int, drop_path_rate: float, name: str) -> Block:
    """A block of this model's layout (rematerialised with `remat`); `layer` is 1-based."""
    block_cls = nn.remat(Block, static_argnums=(3,)) if self.remat else Block
    return block_cls(
      self.num_heads,
      self.mlp_ratio,
      self.grid,
      layer=layer,
      drop_path_rate=drop_path_rate,
      init_values=self.init_values,
      use_rel_pos_bias=self.use_rel_pos_bias,
      init_truncation=self.init_truncation,
      attention=self.attention,
      dtype=self.dtype,
      name=name,
    )

  # -- Backbone ---------------------------------------------------------------------
  def embed(self, images: Array, mask: Array | None = None) -> Array:
    """Patch embeddings (masked ones -> mask token), cls token, absolute positions."""
    b, h, w, _ = images.shape
    if (h, w) != (self.image_size,) * 2:
      raise ValueError(f"Expected {self.image_size}x{self.image_size} images, got {h}x{w}.")
    x = self.patch_embed(images)
    if mask is not None:
      if not self.use_mask_token:
        raise ValueError("This model has no mask token (use_mask_token=False).")
      wgt = mask.reshape(b, -1, 1).astype(x.dtype)
      x = x * (1 - wgt) + self.mask_token.astype(x.dtype) * wgt
    cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (b, 1, self.embed_dim))
    x = jnp.concatenate([cls, x], axis=1)
    if self.use_abs_pos_emb:
      x = x + self.pos_embed.astype(x.dtype)
    return x

  def encode(
    self,
    images: Array,
    mask: Array | None = None,
    *,
    train: bool = False,
    return_layers: bool = False,
  ) -> Array | tuple[Array, list[Array]]:
    """Block outputs (B, 1 + N, D) without the final norm; optionally every block's."""
    x = self.embed(images, mask)
    shared = self.rel_pos_bias() if self.use_shared_rel_pos_bias else None
    layers = []
    for block in self.blocks:
      x = block(x, shared, not train)
      if return_layers:
        layers.append(x)
    return (x, layers) if return_layers else x

  # -- Heads --------------------------------------------------------------------------
  def mim_logits(
    self, images: Array, mask: Array, positions: Array, *, train: bool = False
  ) -> Array:
    """Vocabulary logits (B, K, vocab) at patch `positions` (B, K) of the masked input.

    `mask` (B, N) bool marks the patches replaced by the mask token; `positions` are
    patch indices (0-based, cls excluded), usually the masked ones padded to a static K.
    """
    return self.token_logits(self.encode(images, mask, train=train), positions)

  def token_logits(self, x: Array, positions: Array) -> Array:
    """The MIM head on block states (B, 1 + N, D): norm -> the patches at `positions` -> lm_head."""
    x = self.norm(x[:, 1:].astype(jnp.float32))
    return self.lm_head(jnp.take_along_axis(x, positions[:, :, None].astype(jnp.int32), axis=1))

  def classify(self, images: Array, *, train: bool = False) -> Array:
    """Class logits (B, num_classes), float32."""
    x = self.encode(images, train=train)
    return self.head(self.pooled_features(x))

  def pooled_features(self, x: Array) -> Array:
    """fc_norm(mean of patch tokens), or norm(x)[:, 0] without mean pooling."""
    x = x.astype(jnp.float32)
    if self.use_mean_pooling:
      return self.fc_norm(x[:, 1:].mean(axis=1))
    return self.norm(x)[:, 0]

  def __call__(
    self,
    images: Array,
    mask: Array | None = None,
    positions: Array | None = None,
    *,
    train: bool = False,
  ) -> Array:
    """MIM logits when `mask`/`positions` are given (MIM model), else class logits;
    a model with neither head returns the encoder output. Initialises every parameter."""
    if self.vocab_size > 0:
      if mask is None:
        mask = jnp.zeros((images.shape[0], self.num_patches), bool)
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(self.num_patches), mask.shape)
      logits = self.mim_logits(images, mask, positions, train=train)
      if self.num_classes > 0:  # Touch the classifier so init creates it too.
        return logits, self.head(self.pooled_features(self.encode(images, train=train)))
      return logits
    if self.num_classes > 0:
      return self.classify(images, train=train)
    return self.encode(images, train=train)


def model_kwargs(variant: str, **overrides: Any) -> dict[str, Any]:
  """Keyword arguments of :class:`BEiT` for a named variant (see `VARIANTS`)."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown ViT variant {variant!r}; choose one of {sorted(VARIANTS)}.")
  d, depth, heads = VARIANTS[variant]
  kwargs: dict[str, Any] = dict(embed_dim=d, depth=depth, num_heads=heads)
  kwargs.update(overrides)
  return kwargs


def mim_model(variant: str, **overrides: Any) -> BEiT:
  """unilm `beit_*_patch16_224_8k_vocab`: MIM head, shared rel-pos, mask token."""
  kw = dict(
    vocab_size=8192,
    num_classes=0,
    use_mask_token=True,
    use_shared_rel_pos_bias=True,
    use_rel_pos_bias=False,
    use_abs_pos_emb=False,
    init_values=0.1,
    init_truncation=1.0,
  )
  kw.update(overrides)
  return BEiT(**model_kwargs(variant, **kw))


def classifier_model(variant: str, num_classes: int, **overrides: Any) -> BEiT:
  """unilm fine-tuning `beit_*_patch16_224`: per-block rel-pos, mean pooling, no mask token."""
  kw = dict(
    vocab_size=0,
    num_classes=num_classes,
    use_mask_token=False,
    use_shared_rel_pos_bias=False,
    use_rel_pos_bias=True,
    use_abs_pos_emb=False,
    use_mean_pooling=True,
    init_values=0.1,
    init_truncation=100.0,
  )
  kw.update(overrides)
  return BEiT(**model_kwargs(variant, **kw))


def architecture(model: BEiT) -> dict[str, Any]:
  """The model's constructor arguments except `dtype` and `attention` (how it computes, not
  what; JSON-able; `BEiT(**a)` rebuilds it)."""
  skip = ("parent", "name", "dtype", "attention")
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in skip}


def param_count(model: BEiT, batch: int = 1) -> int:
  """Number of parameters, from `jax.eval_shape` (nothing is allocated)."""
  shapes = abstract_params(model, batch)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def abstract_params(model: BEiT, batch: int = 1) -> Any:
  """ShapeDtypeStructs of the model's params."""
  images = jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x)["params"], images)
