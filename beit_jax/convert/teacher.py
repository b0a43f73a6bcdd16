"""timm `VisionTransformer` state dicts -> `beit_jax.models.teacher.Teacher` params (numpy).

The teachers of VQ-KD in timm's layouts: `vit_base_patch16_clip_quickgelu_224.openai`
(kind "clip": `norm_pre`, no patch bias, `head` = CLIP's projection) and
`vit_base_patch16_224.dino` (kind "dino": patch bias, no `norm_pre`, no head). Keys map as
`patch_embed.proj.weight` (D, 3, p, p) -> `patch_embed/kernel` (p * p * 3, D), Linear
`weight` (out, in) -> `kernel` (in, out), LayerNorm `weight` -> `scale`, and inside a block
`attn.qkv` -> `attn_qkv`, `mlp.fc1` -> `mlp_fc1` (and so on). A classifier-free timm model's
`fc_norm` / `head` are absent; `head` is kept only as the CLIP projection.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax
import numpy as np

from beit_jax.convert import beit as beit_convert
from beit_jax.models import teacher as teacher_lib
from beit_jax.models import vit

_HEADS_BY_WIDTH = {d: h for d, _, h in vit.VARIANTS.values()}


def _leaf(key: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  if key == "patch_embed.proj.weight":  # OIHW -> (p * p * 3, D), rows (row, col, channel)
    return ("patch_embed", "kernel"), value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
  if key == "patch_embed.proj.bias":
    return ("patch_embed", "bias"), value
  m = re.match(r"blocks\.(\d+)\.(attn|mlp)\.(\w+)\.(weight|bias)$", key)
  if m:
    path: tuple[str, ...] = (f"blocks_{m.group(1)}", f"{m.group(2)}_{m.group(3)}", m.group(4))
  elif m := re.match(r"blocks\.(\d+)\.(norm\d)\.(weight|bias)$", key):
    path = (f"blocks_{m.group(1)}", m.group(2), m.group(3))
  else:
    path = tuple(key.split("."))
  if path[-1] == "weight":
    if value.ndim == 2:
      return path[:-1] + ("kernel",), value.T
    return path[:-1] + ("scale",), value
  return path, value


def infer_model_kwargs(
  sd: Mapping[str, np.ndarray], kind: str, num_heads: int | None = None
) -> dict[str, Any]:
  """`Teacher` keyword arguments reproducing the state dict; refuses a layout that is not
  ``kind``'s."""
  if kind not in teacher_lib.TEACHERS:
    raise ValueError(f"Unknown teacher kind {kind!r}; choose from {sorted(teacher_lib.TEACHERS)}.")
  for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
    if key not in sd:
      raise ValueError(f"Not a timm VisionTransformer state dict: no {key!r}.")
  layout = teacher_lib.TEACHERS[kind]
  if ("norm_pre.weight" in sd) != layout.pre_norm or (
    "patch_embed.proj.bias" in sd
  ) == layout.pre_norm:
    raise ValueError(
      f"The state dict is not a {kind} teacher's layout (norm_pre: {'norm_pre.weight' in sd}, "
      f"patch bias: {'patch_embed.proj.bias' in sd}); pass the other --teacher kind."
    )
  d = sd["cls_token"].shape[-1]
  patch = sd["patch_embed.proj.weight"].shape[-1]
  grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
  if num_heads is None:
    if d not in _HEADS_BY_WIDTH:
      raise ValueError(f"Cannot infer the heads of a {d}-wide ViT; pass num_heads.")
    num_heads = _HEADS_BY_WIDTH[d]
  depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
  return dict(
    kind=kind,
    image_size=grid * patch,
    patch_size=patch,
    embed_dim=d,
    depth=depth,
    num_heads=num_heads,
    mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / d,
    proj_dim=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
  )


def timm_to_flax(
  checkpoint: Mapping[str, Any], kind: str, num_heads: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(params, Teacher kwargs)`` from a timm ViT checkpoint or state dict."""
  sd = {
    k: beit_convert.to_numpy(v).astype(np.float32)
    for k, v in beit_convert.unwrap_containers(checkpoint).items()
    if not k.startswith(("fc_norm.", "head_drop"))
  }
  if "head.weight" in sd and kind != "clip":
    sd.pop("head.weight"), sd.pop("head.bias", None)  # A classifier: not a DINO teacher part.
  kwargs = infer_model_kwargs(sd, kind, num_heads)
  flat = dict(_leaf(k, v) for k, v in sd.items())
  beit_convert.check_params(
    flat, teacher_lib.abstract_params(teacher_lib.Teacher(**kwargs)), kwargs
  )
  return flax.traverse_util.unflatten_dict(flat), kwargs
