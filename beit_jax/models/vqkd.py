"""BEiT v2's visual tokenizer, VQ-KD (vector-quantised knowledge distillation), Flax Linen.

unilm `beit2/modeling_vqkd.py` (`VQKD`, `vqkd_encoder_base_decoder_3x768x12_*`):

* encoder: a ViT (`vit.BEiT` as unilm's `modeling_finetune.VisionTransformer` with absolute
  positions, no relative-position bias, no LayerScale, mean-pooling layout) on the same
  224 px view the backbone sees; its patch tokens through `fc_norm` (`encoder_norm`), then
  `encode_task_layer` = Linear(D, D) -> tanh -> Linear(D, code_dim), float32 (unilm runs
  it with autocast off);
* quantiser: `vector_quantizer.quantize` against the codebook (state, not a parameter:
  the caller passes it in and updates it with `vector_quantizer.ema_update`);
* decoder: a ViT on the (h, w, code_dim) grid of codes with patch size 1 (3 blocks of width
  768 for Base), `fc_norm` (`decoder_norm`), then `decode_task_layer` = Linear -> tanh ->
  Linear(D, teacher_dim), the prediction of the frozen teacher's patch features (CLIP
  ViT-B/16: 512, after its projection; DINO ViT-B/16: 768);
* loss: `cosine_distance(rec, teacher)` + the quantiser's commitment term.

Parameter names follow unilm's state dict (`encoder.blocks.0.attn.qkv.weight` ->
`encoder/blocks_0/attn/qkv/kernel`, `encoder.fc_norm` -> `encoder_norm`,
`encode_task_layer.0` / `.2` -> `encode_task_layer_0` / `_2`), so weights convert
one-to-one.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beit_jax.models import vector_quantizer as vq
from beit_jax.models import vit

Array = jax.Array
DType = Any

# name -> (encoder (width, depth, heads), decoder (width, depth, heads)); "test" for tests.
VARIANTS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
  "test": ((32, 2, 2), (32, 1, 2)),
  "mini": ((128, 6, 4), (128, 1, 4)),
  "base": ((768, 12, 12), (768, 3, 12)),  # vqkd_encoder_base_decoder_3x768x12
}
# timm's trunc_normal_(std=.02) bounds (absolute +-2, i.e. +-100 std): modeling_finetune's.
TIMM_TRUNCATION = 100.0


def task_layer(width: int, out: int, name: str) -> list[nn.Dense]:
  """unilm's `nn.Sequential(Linear(width, width), Tanh(), Linear(width, out))` as its two
  Dense layers (`<name>_0`, `<name>_2`), trunc-normal 0.02 kernels, zero biases, float32."""
  init = vit.trunc_normal_init(truncation=TIMM_TRUNCATION)
  return [
    nn.Dense(width, kernel_init=init, dtype=jnp.float32, name=f"{name}_0"),
    nn.Dense(out, kernel_init=init, dtype=jnp.float32, name=f"{name}_2"),
  ]


def cosine_distances(rec: Array, target: Array) -> Array:
  """``1 - cos(rec, target)`` at every position (...,), both divided by their plain norms
  (no epsilon, as unilm), float32."""
  rec = rec.astype(jnp.float32)
  target = target.astype(jnp.float32)
  rec = rec / jnp.linalg.norm(rec, axis=-1, keepdims=True)
  target = target / jnp.linalg.norm(target, axis=-1, keepdims=True)
  return 1.0 - jnp.sum(rec * target, axis=-1)


def cosine_distance(rec: Array, target: Array) -> Array:
  """unilm's `calculate_rec_loss` (cosine): the mean over positions of `cosine_distances`,
  a float32 scalar."""
  return jnp.mean(cosine_distances(rec, target))


class VQKD(nn.Module):
  """The VQ-KD tokenizer: images (B, H, W, 3), normalised as the task says, -> codes."""

  image_size: int = 224
  patch_size: int = 16
  encoder_width: int = 768
  encoder_depth: int = 12
  encoder_heads: int = 12
  decoder_width: int = 768
  decoder_depth: int = 3
  decoder_heads: int = 12
  mlp_ratio: float = 4.0
  code_dim: int = 32
  num_codes: int = 8192
  teacher_dim: int = 512
  beta: float = 1.0  # the commitment weight (unilm: NormEMAVectorQuantizer(beta=1.0))
  attention: str = "auto"
  dtype: DType = jnp.float32

  @property
  def vocab_size(self) -> int:
    """The number of visual tokens (the MIM head's size)."""
    return self.num_codes

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.patch_size
    return (side, side)

  def _vit(self, image_size, patch_size, width, depth, heads, name) -> vit.BEiT:
    return vit.BEiT(
      image_size=image_size,
      patch_size=patch_size,
      embed_dim=width,
      depth=depth,
      num_heads=heads,
      mlp_ratio=self.mlp_ratio,
      init_values=0.0,
      drop_path_rate=0.0,
      use_abs_pos_emb=True,
      use_shared_rel_pos_bias=False,
      use_rel_pos_bias=False,
      use_mask_token=False,
      vocab_size=0,
      num_classes=0,
      init_truncation=TIMM_TRUNCATION,
      attention=self.attention,
      dtype=self.dtype,
      name=name,
    )

  def setup(self) -> None:
    if self.image_size % self.patch_size:
      raise ValueError(
        f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}."
      )
    self.encoder = self._vit(
      self.image_size,
      self.patch_size,
      self.encoder_width,
      self.encoder_depth,
      self.encoder_heads,
      "encoder",
    )
    self.encoder_norm = vit.layer_norm("encoder_norm", jnp.float32)
    self.encode_task_layer = task_layer(self.encoder_width, self.code_dim, "encode_task_layer")
    self.decoder = self._vit(
      self.grid[0], 1, self.decoder_width, self.decoder_depth, self.decoder_heads, "decoder"
    )
    self.decoder_norm = vit.layer_norm("decoder_norm", jnp.float32)
    self.decode_task_layer = task_layer(self.decoder_width, self.teacher_dim, "decode_task_layer")

  def encode(self, images: Array) -> Array:
    """The features the quantiser sees: (B, h, w, code_dim) float32, not yet normalised."""
    x = self.encoder(images)[:, 1:]
    x = self.encoder_norm(x.astype(jnp.float32))
    first, second = self.encode_task_layer
    x = second(jnp.tanh(first(x)))
    b = x.shape[0]
    return x.reshape(b, *self.grid, self.code_dim)

  def decode(self, codes: Array) -> Array:
    """The teacher-feature predictions (B, h * w, teacher_dim), float32, of a code grid
    (B, h, w, code_dim)."""
    x = self.decoder(codes.astype(self.dtype))[:, 1:]
    x = self.decoder_norm(x.astype(jnp.float32))
    first, second = self.decode_task_layer
    return second(jnp.tanh(first(x)))

  def tokens(self, images: Array, codebook: Array) -> Array:
    """The visual tokens (B, h * w) int32: BEiT v2's MIM targets."""
    _, indices, _ = vq.quantize(self.encode(images), codebook, self.beta)
    return indices.reshape(indices.shape[0], -1)

  def __call__(self, images: Array, codebook: Array) -> dict[str, Array]:
    """``{"features": encoder features (l2-normalised, for the EMA update), "indices",
    "quant_loss", "rec": decoder output}`` for one batch; initialises every parameter."""
    z = self.encode(images)
    z_q, indices, quant_loss = vq.quantize(z, codebook, self.beta)
    return {
      "features": vq.l2norm(z),
      "indices": indices,
      "quant_loss": quant_loss,
      "rec": self.decode(z_q),
    }


def abstract_params(model: VQKD) -> Any:
  """ShapeDtypeStructs of the model's params."""
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  codebook = jax.ShapeDtypeStruct((model.num_codes, model.code_dim), jnp.float32)
  return jax.eval_shape(
    lambda x, e: model.init(jax.random.PRNGKey(0), x, e)["params"], images, codebook
  )
