"""The MIM model and train step of the `pretrain` task: BEiT's, and BEiT v2's with patch
aggregation.

* `make_model`: `config.model` -> `vit.mim_model` (BEiT), or with
  `model.patch_aggregation=True` `beit_v2.mim_model` (unilm
  `VisionTransformerForMaskedImageModelingCLS`: the last block's cls token with block
  `early_layers`' patch states through `head_layers` extra blocks, the LM head shared);
* `init_params`: the model's initial params (unilm's init; for v2 with the extra blocks'
  PyTorch-default init and rescale, `beit_v2.init_params`);
* `make_mim_update` / `make_train_step`: normalise, mask, logits at the masked positions,
  cross-entropy (BEiT v2: the sum of the two heads' cross-entropies, unilm
  `engine_for_pretraining.py`'s ``loss_1 + loss_2``), AdamW; the tokenizer's ids of its
  view first (`make_train_step`);
* `backbone`: what the export holds — BEiT v2's extra blocks dropped, a plain MIM BEiT that
  fine-tuning, probing and segmentation take unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from beit_jax import pixels
from beit_jax.models import beit_v2, vit
from beit_jax.models import tokenizer as tokenizer_lib
from beit_jax.tasks.mim_eval import IMAGE_KEY, MASK_KEY, TOKENIZER_KEY
from beit_jax.training import losses, optim
from beit_jax.training.train_state import TrainState

LOSS_ON = ("masked", "all")  # Which patches' tokens the loss predicts (paper Table 4).
# What the ViT predicts: the tokenizer's ids (BEiT) or the normalised pixels of the patches
# with an L2 loss (paper Table 4's pixel-regression ablation; no tokenizer is used).
TARGETS = ("tokens", "pixels")


def make_model(
  model_config: Mapping[str, Any], image_size: int, vocab_size: int, dtype: Any = jnp.float32
) -> vit.BEiT:
  """The MIM model from `config.model` (a named variant plus overrides); a
  `beit_v2.BEiTv2` when `patch_aggregation` is set (`early_layers` 0: unilm's 9 of 12 /
  21 of 24, else depth - 3)."""
  m = dict(model_config)
  build = vit.mim_model
  extra = {}
  if m.get("patch_aggregation", False):
    build = beit_v2.mim_model
    extra = dict(head_layers=m.get("head_layers", 2))
    if m.get("early_layers", 0):
      extra["early_layers"] = m["early_layers"]
  return build(
    m["variant"],
    **extra,
    image_size=image_size,
    patch_size=m["patch_size"],
    vocab_size=vocab_size,
    init_values=m["init_values"],
    drop_path_rate=m["drop_path_rate"],
    use_abs_pos_emb=m["use_abs_pos_emb"],
    use_shared_rel_pos_bias=m["use_shared_rel_pos_bias"],
    use_rel_pos_bias=not m["use_shared_rel_pos_bias"],
    remat=m["remat"],
    attention=m["attention"],
    dtype=dtype,
  )


def init_params(model: vit.BEiT, rng: jax.Array) -> Any:
  """Initial params: unilm's init of `vit.BEiT`; BEiT v2's extra blocks as unilm leaves them."""
  if isinstance(model, beit_v2.BEiTv2):
    return beit_v2.init_params(model, rng)
  size = model.image_size
  return model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32))["params"]


def eval_model(model: vit.BEiT) -> vit.BEiT:
  """The plain MIM BEiT inside (BEiT v2's without the extra blocks): what the MIM eval and
  pictures apply to the full params (a v2 model's extra blocks are unused there)."""
  if isinstance(model, beit_v2.BEiTv2):
    return beit_v2.backbone_model(model)
  return model


def backbone(model: vit.BEiT, params: Any) -> tuple[vit.BEiT, Any]:
  """(model, params) of the plain MIM BEiT inside: BEiT v2's without the extra blocks."""
  if isinstance(model, beit_v2.BEiTv2):
    return eval_model(model), beit_v2.backbone_params(params)
  return model, params


# ----------------------------------------------------------------------------------
# The MIM step.
# ----------------------------------------------------------------------------------
def make_mim_update(
  model: vit.BEiT,
  tx: optax.GradientTransformation,
  lr_fn: optim.Schedule,
  max_masked: int,
  input_norm: str,
  inject_at_steps: tuple[int, ...] = (),
  loss_on: str = "masked",
  target: str = "tokens",
):
  """`update(state, images_uint8, mask, token_ids) -> (state, metrics)`: the ViT half of
  the step (normalise, mask tokens, logits at the masked positions, cross-entropy, AdamW)
  given the target ids (B, N) of every patch. `loss_on='all'` (the paper's ablation)
  predicts the tokens of every patch, masked or not; `mlm_acc` is then over all patches.
  `target='pixels'` (the other ablation) regresses each chosen patch's pixels, normalised
  per patch (`losses.normalized_patch_pixels`), with an L2 loss; `token_ids` is unused.
  A `beit_v2.BEiTv2` model adds its patch-aggregation head's cross-entropy to the loss
  (`loss` = `mim_loss` + `cls_pt_loss`; accuracies `mlm_acc`, `cls_pt_acc`)."""
  two_heads = isinstance(model, beit_v2.BEiTv2)
  if two_heads and target != "tokens":
    raise ValueError("BEiT v2's patch aggregation predicts tokens; use target='tokens'.")
  if loss_on not in LOSS_ON:
    raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
  if target not in TARGETS:
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")

  def update(state: TrainState, images: jax.Array, mask: jax.Array, ids: jax.Array | None):
    images = pixels.normalize(images, input_norm)
    mask = mask.astype(bool)
    positions, weights = losses.masked_positions(mask, max_masked)
    masked_weights = weights
    if loss_on == "all":
      positions = jnp.broadcast_to(jnp.arange(mask.shape[1], dtype=jnp.int32), mask.shape)
      weights = jnp.ones(mask.shape, jnp.float32)
    if target == "pixels":
      patch_targets = losses.normalized_patch_pixels(images, model.patch_size)
      targets = jnp.take_along_axis(patch_targets, positions[..., None], axis=1)
    else:
      targets = jnp.take_along_axis(ids, positions, axis=1)

    def loss_fn(params):
      logits = model.apply(
        {"params": params},
        images,
        mask,
        positions,
        train=True,
        rngs={"dropout": state.step_rng()},
        method=type(model).mim_logits,
      )
      if target == "pixels":
        return losses.masked_pixel_loss(logits, targets, weights), {}
      if two_heads:
        logits, cls_pt_logits = logits
        loss, acc = losses.masked_token_loss(logits, targets, weights)
        cls_pt_loss, cls_pt_acc = losses.masked_token_loss(cls_pt_logits, targets, weights)
        return loss + cls_pt_loss, dict(
          mlm_acc=acc, cls_pt_acc=cls_pt_acc, mim_loss=loss, cls_pt_loss=cls_pt_loss
        )
      loss, acc = losses.masked_token_loss(logits, targets, weights)
      return loss, {"mlm_acc": acc}

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, update_metrics = state.apply_gradients(
      grads, tx, loss, inject_at_steps=inject_at_steps
    )
    metrics = dict(
      loss=loss,
      **accuracy,
      lr=lr_fn(state.step),
      masked_per_image=jnp.mean(jnp.sum(masked_weights, axis=1)),
      **update_metrics,
    )
    return new_state, metrics

  return update


def make_train_step(
  model: vit.BEiT,
  tokenizer: tokenizer_lib.Tokenizer,
  tx: optax.GradientTransformation,
  lr_fn: optim.Schedule,
  max_masked: int,
  input_norm: str,
  inject_at_steps: tuple[int, ...] = (),
  loss_on: str = "masked",
  target: str = "tokens",
):
  """`train_step(state, batch, tokenizer_params) -> (state, metrics)`, for `jax.jit`:
  the frozen tokenizer's ids of the tokenizer view, then `make_mim_update` (with
  `target='pixels'` the tokenizer is not run and `tokenizer_params` is ignored)."""
  update = make_mim_update(
    model, tx, lr_fn, max_masked, input_norm, inject_at_steps, loss_on, target
  )

  def train_step(state: TrainState, batch: Mapping[str, jax.Array], tokenizer_params: Any):
    if target == "pixels":
      return update(state, batch[IMAGE_KEY], batch[MASK_KEY], None)
    ids = tokenizer_lib.tokenize(tokenizer, tokenizer_params, pixels.to_unit(batch[TOKENIZER_KEY]))
    ids = jax.lax.stop_gradient(ids.reshape(ids.shape[0], -1))
    return update(state, batch[IMAGE_KEY], batch[MASK_KEY], ids)

  return train_step
