"""Schedules and optimizers shared by every task.

`warmup_cosine` is unilm's `utils.cosine_scheduler` evaluated per step (warmup from 0 by
`linspace`, endpoint included, then a cosine over the remaining steps); `cosine_ramp` is
the annealing schedule of the DALL-E paper (App. A.2) for tau, beta and the lr.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

Schedule = Callable[[jax.Array], jax.Array]


def warmup_cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0) -> Schedule:
  """unilm `cosine_scheduler` as a function of the step (clamped at `final` after the end).

  Warmup is `linspace(0, base, warmup_steps)[step]`, i.e. it reaches `base` at step
  warmup_steps - 1; step warmup_steps + i then takes
  `final + 0.5 (base - final)(1 + cos(pi i / (total - warmup)))`.

  Hand-written: `optax.warmup_cosine_decay_schedule` reaches the peak at step
  warmup_steps, one step after unilm's `linspace`, so every warmup lr differs.
  """
  if warmup_steps > total_steps:
    raise ValueError(f"warmup_steps={warmup_steps} exceeds total_steps={total_steps}.")
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = base * step / max(warmup_steps - 1, 1) if warmup_steps > 1 else jnp.zeros_like(step)
    i = jnp.clip(step - warmup_steps, 0, decay_steps)
    cos = final + 0.5 * (base - final) * (1 + jnp.cos(jnp.pi * i / decay_steps))
    return jnp.where(step < warmup_steps, warm, cos)

  return schedule


def warmup_poly(
  base: float,
  total_steps: int,
  warmup_steps: int = 0,
  warmup_ratio: float = 1e-6,
  power: float = 1.0,
  min_lr: float = 0.0,
) -> Schedule:
  """mmcv's `PolyLrUpdaterHook` with linear warmup (by iteration), as unilm's segmentation
  configs set it (`policy='poly', warmup='linear', warmup_iters=1500, warmup_ratio=1e-6,
  power=1.0, min_lr=0.0, by_epoch=False`).

  Step s (0-based, mmcv's `runner.iter` before the iteration) takes the poly lr
  `(base - min_lr) (1 - s / total) ** power + min_lr`, times `1 - (1 - s / warmup)
  (1 - warmup_ratio)` while s < warmup (mmcv `get_warmup_lr`: the warmup scales the
  regular lr of that step, it does not ramp to a fixed peak).
  """
  if warmup_steps > total_steps:
    raise ValueError(f"warmup_steps={warmup_steps} exceeds total_steps={total_steps}.")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    # (total - step) / total and ratio + (1 - ratio) step / warmup: mmcv's 1 - step / total
    # and 1 - k, rearranged so that float32 keeps their precision near the ends.
    remaining = jnp.clip((total_steps - step) / total_steps, 0.0, 1.0)
    regular = (base - min_lr) * remaining**power + min_lr
    if warmup_steps <= 0:
      return regular
    warm = warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
    return jnp.where(step < warmup_steps, regular * warm, regular)

  return schedule


def cosine_ramp(start: float, end: float, steps: int) -> Schedule:
  """Half-cosine from `start` (step 0) to `end` (step >= `steps`)."""

  def schedule(step):
    t = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
    return end + (start - end) * 0.5 * (1 + jnp.cos(jnp.pi * t))

  return schedule


def weight_decay_mask(params: Any, skip: Sequence[str] = ()) -> Any:
  """True where weight decay applies: unilm's rule (no decay on 1-D leaves, biases, skip list)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  mask = {
    k: v.ndim > 1 and not k.endswith("bias") and not any(s in k.split("/") for s in skip)
    for k, v in flat.items()
  }
  return flax.traverse_util.unflatten_dict(mask, sep="/")


def vit_layer_id(path: str, depth: int) -> int:
  """unilm `get_num_layer_for_vit` for a '/'-joined param path of `models.vit.BEiT`.

  cls/mask/pos tokens and the patch embedding -> 0; `blocks_i` -> i + 1; the shared
  rel-pos table and everything else (norms, heads) -> depth + 1.
  """
  top = path.split("/")[0]
  if top in ("cls_token", "mask_token", "pos_embed", "patch_embed"):
    return 0
  if top.startswith("blocks_"):
    return int(top[len("blocks_") :]) + 1
  return depth + 1


def layerwise_lr_scales(params: Any, decay: float, depth: int, backbone: str = "") -> Any:
  """Per-leaf lr multipliers `decay ** (depth + 1 - layer_id)` (unilm LayerDecayValueAssigner).

  `backbone`: the name of the subtree holding the ViT (segmentation: 'backbone'); every
  leaf outside it (neck, heads) gets layer id depth + 1, scale 1 — unilm's segmentation
  `get_num_layer_for_vit` (mmcv_custom/layer_decay_optimizer_constructor.py), whose
  `num_layers - layer_id - 1` with num_layers = depth + 2 is the same exponent."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  prefix = backbone + "/" if backbone else ""

  def layer_id(key: str) -> int:
    if not key.startswith(prefix):
      return depth + 1
    return vit_layer_id(key[len(prefix) :], depth)

  scales = {k: float(decay ** (depth + 1 - layer_id(k))) for k in flat}
  return flax.traverse_util.unflatten_dict(scales, sep="/")


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
  """Multiplies each update leaf by a fixed per-leaf scale (layer-wise lr decay).

  Placed after AdamW it scales the whole step, lr · (adam + wd · p), exactly as unilm's
  per-group `lr_scale` does.
  """

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def make_optimizer(
  optim_config: ml_collections.ConfigDict,
  lr: Schedule,
  wd_skip: Sequence[str] = (),
  lr_scales: Any = None,
) -> optax.GradientTransformation:
  """AdamW (decoupled wd, masked) behind optional global-norm clipping.

  `wd_skip` names extra params without weight decay (unilm's `no_weight_decay()`);
  `lr_scales` (a pytree like the params, e.g. from `layerwise_lr_scales`) multiplies
  each leaf's step.
  """
  if optim_config.name != "adamw":
    raise ValueError(f"optim.name={optim_config.name!r} is not supported; use 'adamw'.")
  parts = []
  if optim_config.clip_grad_norm and optim_config.clip_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.clip_grad_norm))
  parts.append(
    optax.adamw(
      learning_rate=lr,
      b1=optim_config.b1,
      b2=optim_config.b2,
      eps=optim_config.eps,
      weight_decay=optim_config.weight_decay,
      mask=lambda p: weight_decay_mask(p, wd_skip),
    )
  )
  if lr_scales is not None:
    parts.append(scale_by_tree(lr_scales))
  return optax.chain(*parts)
