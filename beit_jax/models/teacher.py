"""The frozen teachers VQ-KD distils: plain ViTs in timm's `VisionTransformer` layout.

BEiT v2 (`beit2/modeling_vqkd.py`, `get_regress_target`) regresses the patch features of
a frozen teacher:

* CLIP ViT-B/16's image tower (`vqkd_teacher/clip/model.py`, timm
  `vit_base_patch16_clip_quickgelu_224.openai`): bias-free patch conv, `ln_pre` before the
  blocks (timm `norm_pre`), QuickGELU, LayerNorm eps 1e-5, targets
  ``ln_post(x)[:, 1:] @ proj`` (512-d; timm holds `proj` as the `head` Linear with a zero
  bias);
* DINO ViT-B/16 (`vqkd_teacher/dino.py`, timm `vit_base_patch16_224.dino`): the original
  ViT (patch conv with bias, exact GELU, eps 1e-6), targets ``norm(x)[:, 1:]`` (768-d).

One module covers both (`kind` picks the layout, `TEACHERS`); the parameter names are
timm's with the dots inside a block made underscores (`blocks.3.attn.qkv.weight` ->
`blocks_3/attn_qkv/kernel`, fused q/k/v with a bias each; `patch_embed.proj` ->
`patch_embed`, its kernel (p * p * 3, D)), so timm state dicts convert one-to-one
(`beit_jax.convert.teacher`). The teacher
gets no gradient: the VQ-KD step wraps it in `stop_gradient`. Computation in float32
(the softmax and LayerNorm always; matmuls in `dtype`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beit_jax.models import ops, vit

Array = jax.Array
DType = Any


@dataclasses.dataclass(frozen=True)
class TeacherLayout:
  """What differs between the teachers' ViTs."""

  pre_norm: bool  # LayerNorm after the embeddings (CLIP's ln_pre); also no patch bias
  quick_gelu: bool  # x * sigmoid(1.702 x) (CLIP) instead of exact GELU
  ln_eps: float
  image_mean: tuple[float, float, float]  # unilm's ScalingLayerForClip / ScalingLayerForIM
  image_std: tuple[float, float, float]


TEACHERS: dict[str, TeacherLayout] = {
  "clip": TeacherLayout(
    pre_norm=True,
    quick_gelu=True,
    ln_eps=1e-5,
    image_mean=(0.48145466, 0.4578275, 0.40821073),
    image_std=(0.26862954, 0.26130258, 0.27577711),
  ),
  "dino": TeacherLayout(
    pre_norm=False,
    quick_gelu=False,
    ln_eps=1e-6,
    image_mean=(0.485, 0.456, 0.406),
    image_std=(0.229, 0.224, 0.225),
  ),
}


def scale_images(images: Array, kind: str) -> Array:
  """unilm's scaling layer: images in [-1, 1] -> [0, 1] (clamped on the 0..255 scale) ->
  the teacher's mean / std."""
  layout = TEACHERS[kind]
  x = jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0) / 255.0
  return (x - jnp.asarray(layout.image_mean)) / jnp.asarray(layout.image_std)


class TeacherBlock(nn.Module):
  """timm's pre-LN `Block`: x + attn(norm1(x)); x + mlp(norm2(x)); no LayerScale."""

  num_heads: int
  mlp_ratio: float
  ln_eps: float
  quick_gelu: bool
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, n, d = x.shape
    h = self.num_heads

    def dense(features, name):
      return nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32, name=name)

    y = vit.LayerNorm(self.ln_eps, self.dtype, name="norm1")(x)
    qkv = dense(3 * d, "attn_qkv")(y).reshape(b, n, 3, h, d // h)
    q, k, v = (qkv[:, :, i].astype(jnp.float32) for i in range(3))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * (d // h) ** -0.5, k)
    attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    x = x + dense(d, "attn_proj")(attn.reshape(b, n, d).astype(self.dtype))
    y = vit.LayerNorm(self.ln_eps, self.dtype, name="norm2")(x)
    y = dense(int(d * self.mlp_ratio), "mlp_fc1")(y)
    y = y * jax.nn.sigmoid(1.702 * y) if self.quick_gelu else ops.gelu(y)
    return x + dense(d, "mlp_fc2")(y)


class Teacher(nn.Module):
  """A frozen teacher ViT: images (B, H, W, 3), already `scale_images`-normalised, ->
  patch features (B, N, out_dim) float32 (out_dim = `proj_dim` if > 0, else the width)."""

  kind: str = "clip"
  image_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  proj_dim: int = 512  # CLIP's projection; 0 = none (DINO)
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    if self.kind not in TEACHERS:
      raise ValueError(f"Unknown teacher kind {self.kind!r}; choose from {sorted(TEACHERS)}.")
    layout = TEACHERS[self.kind]
    d = self.embed_dim
    grid = self.image_size // self.patch_size
    p = self.patch_size
    # The stride-p conv as patchify + matmul: kernel (p * p * 3, d), rows (row, col, channel).
    x = nn.Dense(
      d, use_bias=not layout.pre_norm, dtype=self.dtype, param_dtype=jnp.float32,
      name="patch_embed",
    )(vit.patchify(images.astype(self.dtype), p))  # fmt: skip
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d), jnp.float32)
    pos = self.param(
      "pos_embed", nn.initializers.normal(0.02), (1, 1 + grid * grid, d), jnp.float32
    )
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)).astype(x.dtype), x], 1)
    x = x + pos.astype(x.dtype)
    if layout.pre_norm:
      x = vit.LayerNorm(layout.ln_eps, self.dtype, name="norm_pre")(x)
    for i in range(self.depth):
      x = TeacherBlock(
        self.num_heads,
        self.mlp_ratio,
        layout.ln_eps,
        layout.quick_gelu,
        self.dtype,
        name=f"blocks_{i}",
      )(x)
    x = vit.LayerNorm(layout.ln_eps, jnp.float32, name="norm")(x.astype(jnp.float32))[:, 1:]
    if self.proj_dim:
      x = nn.Dense(self.proj_dim, dtype=jnp.float32, name="head")(x)
    return x


def abstract_params(model: Teacher) -> Any:
  """ShapeDtypeStructs of the teacher's params."""
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x)["params"], images)


def out_dim(model: Teacher) -> int:
  """The width of the teacher's patch features (the VQ-KD decoder's output)."""
  return model.proj_dim or model.embed_dim


def beit_patch_features(model: vit.BEiT, images: Array) -> Array:
  """A BEiT backbone of this project as the teacher (`model.apply(..., method=this)`):
  its last block's patch states through its own final LayerNorm (`fc_norm` of a
  mean-pooling classifier, else `norm`; none for a headless backbone), (B, N, D) float32
  — the counterpart of DINO's ``norm(x)[:, 1:]``. ``images`` are normalised as the
  backbone was trained."""
  x = model.encode(images)[:, 1:].astype(jnp.float32)
  if model.num_classes > 0 and model.use_mean_pooling:
    return model.fc_norm(x)
  if model.vocab_size > 0 or model.num_classes > 0:
    return model.norm(x)
  return x
