"""BEiT v2's pretraining model: the BEiT MIM ViT plus the patch-aggregation head.

unilm `beit2/modeling_pretrain.py` (`VisionTransformerForMaskedImageModelingCLS`): the
final layer's cls token is concatenated with the patch states of an early block (block 9 of
12 for Base, 21 of 24 for Large; ``early_layers``) and sent through ``head_layers`` (2)
extra blocks (`cls_pt_layers_i`, the shared relative-position bias passed to them too);
both the last block's and the extra blocks' patch states go through the same `norm` and
`lm_head` (unilm's `shared_lm_head=True`), and the pretraining loss is the sum of the two
masked-token cross-entropies. The cls token thereby has to carry what the early patch states
lack: the image's global summary. The extra blocks exist for pretraining only:
`backbone_params` drops them (the task's export is then a plain BEiT MIM export that
fine-tuning, linear probing and segmentation take unchanged; the checkpoints keep them).

Extra blocks' drop path: `linspace(0, rate, max(depth, early + head))[early + i]`; their
`layer` for the sqrt(2 l) rescale of `attn/proj` and `mlp/fc2` is ``early + i + 1``.

Initialisation trap (reproduced): unilm builds `cls_pt_layers` *after* the parent's
`self.apply(self._init_weights)`, so they keep PyTorch's default Linear init (kernel and
bias uniform in +-1/sqrt(fan_in)), then `fix_init_cls_pt_weight` rescales; `init_params`
does the same (the trunc-normal init of everything else is `vit.BEiT`'s).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from beit_jax.models import vit

Array = jax.Array
CLS_PT_PREFIX = "cls_pt_layers_"
# unilm's `--early_layers`: 9 for Base (12 blocks), 21 for Large (24 blocks).
EARLY_LAYERS = {12: 9, 24: 21}


def default_early_layers(depth: int) -> int:
  """unilm's early layer for a depth (9 of 12, 21 of 24), else depth - 3 (at least 1)."""
  return EARLY_LAYERS.get(depth, max(depth - 3, 1))


class BEiTv2(vit.BEiT):
  """`vit.BEiT` (MIM layout) with the patch-aggregation head; `mim_logits` gives
  ``(logits, cls_pt_logits)``, both (B, K, vocab) at `positions`."""

  early_layers: int = 9
  head_layers: int = 2

  def setup(self) -> None:
    super().setup()
    if not 0 < self.early_layers < self.depth:
      raise ValueError(
        f"early_layers={self.early_layers} must be in 1..{self.depth - 1} (depth {self.depth})."
      )
    if self.vocab_size <= 0:
      raise ValueError("BEiT v2 pretraining needs the MIM head (vocab_size > 0).")
    dpr = np.linspace(
      0.0, self.drop_path_rate, max(self.depth, self.early_layers + self.head_layers)
    )
    self.cls_pt_layers = [
      self.make_block(
        self.early_layers + i + 1, float(dpr[self.early_layers + i]), f"{CLS_PT_PREFIX}{i}"
      )
      for i in range(self.head_layers)
    ]

  def mim_logits(
    self, images: Array, mask: Array, positions: Array, *, train: bool = False
  ) -> tuple[Array, Array]:
    """``(logits, cls_pt_logits)`` (B, K, vocab) float32 at patch `positions` (B, K)."""
    x, layers = self.encode(images, mask, train=train, return_layers=True)
    y = jnp.concatenate([x[:, :1], layers[self.early_layers - 1][:, 1:]], axis=1)
    shared = self.rel_pos_bias() if self.use_shared_rel_pos_bias else None
    for block in self.cls_pt_layers:
      y = block(y, shared, not train)
    return self.token_logits(x, positions), self.token_logits(y, positions)

  def __call__(
    self,
    images: Array,
    mask: Array | None = None,
    positions: Array | None = None,
    *,
    train: bool = False,
  ) -> tuple[Array, Array]:
    """`mim_logits` (every patch, none masked, by default); initialises every parameter."""
    if mask is None:
      mask = jnp.zeros((images.shape[0], self.num_patches), bool)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(self.num_patches), mask.shape)
    return self.mim_logits(images, mask, positions, train=train)


def mim_model(variant: str, **overrides: Any) -> BEiTv2:
  """unilm `beit_{base,large}_patch16_224_8k_vocab_cls_pt`: `vit.mim_model`'s layout (shared
  rel-pos, LayerScale, mask token) with the head from block 9 (Base) / 21 (Large)."""
  kw = vit.mim_model(variant, **{k: v for k, v in overrides.items() if k not in _OWN})
  own = {k: overrides[k] for k in _OWN if k in overrides}
  own.setdefault("early_layers", default_early_layers(kw.depth))
  return BEiTv2(**{f.name: getattr(kw, f.name) for f in _FIELDS}, **own)


_OWN = ("early_layers", "head_layers")
_FIELDS = [
  f for f in vit.BEiT.__dataclass_fields__.values() if f.init and f.name not in ("parent", "name")
]


def init_params(model: BEiTv2, rng: Array, image_size: int | None = None) -> dict[str, Any]:
  """unilm's initial params: `model.init`, then the extra blocks' Linear kernels and biases
  redrawn from PyTorch's default U(+-1/sqrt(fan_in)) and `attn/proj`, `mlp/fc2` kernels
  divided by sqrt(2 (early + i + 1)) (`fix_init_cls_pt_weight`)."""
  size = image_size or model.image_size
  init_rng, torch_rng = jax.random.split(rng)
  params = model.init(init_rng, jnp.zeros((1, size, size, 3)))["params"]
  params = flax.core.unfreeze(params)
  for i in range(model.head_layers):
    name = f"{CLS_PT_PREFIX}{i}"
    rescale = 1.0 / np.sqrt(2.0 * (model.early_layers + i + 1))
    flat = flax.traverse_util.flatten_dict(params[name])
    for j, (path, value) in enumerate(sorted(flat.items())):
      if path[-1] not in ("kernel", "bias") or path[-2] not in ("qkv", "proj", "fc1", "fc2"):
        continue
      layer = path[:-1]
      fan_in = flat[layer + ("kernel",)].shape[0]
      bound = 1.0 / np.sqrt(fan_in)
      key = jax.random.fold_in(jax.random.fold_in(torch_rng, i), j)
      draw = jax.random.uniform(key, value.shape, jnp.float32, -bound, bound)
      if path[-1] == "kernel" and path[-2] in ("proj", "fc2"):
        draw = draw * rescale
      flat[path] = draw
    params[name] = flax.traverse_util.unflatten_dict(flat)
  return params


def backbone_params(params: dict[str, Any]) -> dict[str, Any]:
  """The params without the patch-aggregation blocks: a `vit.BEiT` MIM model's."""
  return {k: v for k, v in params.items() if not k.startswith(CLS_PT_PREFIX)}


def backbone_model(model: BEiTv2) -> vit.BEiT:
  """The `vit.BEiT` the backbone params belong to (same fields, no extra blocks)."""
  return vit.BEiT(**{f.name: getattr(model, f.name) for f in _FIELDS})
