"""unilm BEiT v2 VQ-KD tokenizer checkpoints -> `beit_jax.models.vqkd.VQKD` params + codebook.

unilm's released tokenizers (`vqkd_encoder_base_decoder_3x768x12_clip-*.pth`,
`..._dino-*.pth`, `modeling_vqkd.py`) hold, under `model` (or `state_dict`):

* `encoder.*`, `decoder.*`: two `modeling_finetune.VisionTransformer`s (timm / unilm BEiT
  keys, absolute positions, no relative-position tables, mean-pooling layout: their
  `fc_norm` is our `encoder_norm` / `decoder_norm`), mapped by `convert.beit.to_flax_leaf`;
* `encode_task_layer.{0,2}`, `decode_task_layer.{0,2}`: Linear (out, in) -> Dense kernel
  (in, out);
* `quantize.embedding.weight` (K, code_dim): the codebook, returned apart from the params
  (it is state, not a parameter); `quantize.embedding.{cluster_size,embed_avg,initted}` and
  `quantize.cluster_size` (training statistics) are dropped, as are `teacher_model.*`,
  `scaling_layer.*` and `loss.*` (what unilm itself drops when it loads a tokenizer).

The architecture is read from the shapes (`infer_model_kwargs`); heads, which no weight
shows without a relative-position table, are the standard ones of the width unless given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import numpy as np

from beit_jax.convert import beit as beit_convert
from beit_jax.models import vqkd as vqkd_lib

DROPPED_PREFIXES = ("teacher_model.", "scaling_layer.", "loss.")
DROPPED_KEYS = (
  "quantize.embedding.cluster_size",
  "quantize.embedding.embed_avg",
  "quantize.embedding.initted",
  "quantize.cluster_size",
)
CODEBOOK_KEY = "quantize.embedding.weight"
TOWERS = ("encoder", "decoder")
TASK_LAYERS = ("encode_task_layer", "decode_task_layer")


def split_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
  """``{"encoder": …, "decoder": …, "encode_task_layer": …, "decode_task_layer": …,
  "codebook": {"weight": …}}``, each a flat {key without its prefix: numpy array}."""
  sd = beit_convert.unwrap_containers(checkpoint)
  parts: dict[str, dict[str, np.ndarray]] = {k: {} for k in TOWERS + TASK_LAYERS}
  parts["codebook"] = {}
  for key, value in sd.items():
    if key.startswith("module."):
      key = key[len("module.") :]
    if key.startswith(DROPPED_PREFIXES) or key in DROPPED_KEYS:
      continue
    if key == CODEBOOK_KEY:
      parts["codebook"]["weight"] = beit_convert.to_numpy(value)
      continue
    part, _, rest = key.partition(".")
    if part not in parts or not rest:
      raise ValueError(
        f"Not a VQ-KD tokenizer state dict: key {key!r} is none of encoder.*, decoder.*, "
        "encode_task_layer.*, decode_task_layer.*, quantize.*."
      )
    if rest.endswith(beit_convert.DROPPED_SUFFIXES):
      continue
    parts[part][rest] = beit_convert.to_numpy(value)
  for name in TOWERS:
    if "cls_token" not in parts[name]:
      raise ValueError(f"Not a VQ-KD tokenizer state dict: no {name}.cls_token.")
  if "weight" not in parts["codebook"]:
    raise ValueError(f"Not a VQ-KD tokenizer state dict: no {CODEBOOK_KEY}.")
  return parts


def infer_model_kwargs(
  parts: Mapping[str, Mapping[str, np.ndarray]],
  encoder_heads: int | None = None,
  decoder_heads: int | None = None,
) -> dict[str, Any]:
  """`VQKD` keyword arguments reproducing the split state dict's architecture."""
  enc = beit_convert.infer_model_kwargs(parts["encoder"], encoder_heads)
  dec = beit_convert.infer_model_kwargs(parts["decoder"], decoder_heads)
  if dec["patch_size"] != 1 or dec["image_size"] * enc["patch_size"] != enc["image_size"]:
    raise ValueError(
      f"The decoder ({dec['image_size']}^2 grid, patch {dec['patch_size']}) does not read the "
      f"encoder's {enc['image_size'] // enc['patch_size']}^2 code grid with patch 1."
    )
  if enc["mlp_ratio"] != dec["mlp_ratio"]:
    raise ValueError(f"Encoder MLP ratio {enc['mlp_ratio']} != decoder's {dec['mlp_ratio']}.")
  codebook = parts["codebook"]["weight"]
  return dict(
    image_size=enc["image_size"],
    patch_size=enc["patch_size"],
    encoder_width=enc["embed_dim"],
    encoder_depth=enc["depth"],
    encoder_heads=enc["num_heads"],
    decoder_width=dec["embed_dim"],
    decoder_depth=dec["depth"],
    decoder_heads=dec["num_heads"],
    mlp_ratio=enc["mlp_ratio"],
    code_dim=int(codebook.shape[1]),
    num_codes=int(codebook.shape[0]),
    teacher_dim=int(parts["decode_task_layer"]["2.weight"].shape[0]),
  )


def unilm_to_flax(
  checkpoint: Mapping[str, Any],
  encoder_heads: int | None = None,
  decoder_heads: int | None = None,
) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
  """``(params, codebook (K, code_dim) float32, VQKD kwargs)`` from a unilm VQ-KD
  checkpoint; the params are checked against the inferred model's (a missing, extra or
  mis-shaped key raises ValueError naming it)."""
  parts = split_state_dict(checkpoint)
  kwargs = infer_model_kwargs(parts, encoder_heads, decoder_heads)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for tower in TOWERS:
    for key, value in parts[tower].items():
      value = value.astype(np.float32)
      if key.startswith("fc_norm."):
        leaf = "scale" if key.endswith(".weight") else "bias"
        flat[(f"{tower}_norm", leaf)] = value
        continue
      path, leaf = beit_convert.to_flax_leaf(key, value)
      flat[(tower,) + path] = leaf
  for layer in TASK_LAYERS:
    for key, value in parts[layer].items():
      index, _, kind = key.partition(".")
      value = value.astype(np.float32)
      name = f"{layer}_{index}"
      flat[(name, "kernel" if kind == "weight" else "bias")] = (
        value.T if kind == "weight" else value
      )
  beit_convert.check_params(flat, vqkd_lib.abstract_params(vqkd_lib.VQKD(**kwargs)), kwargs)
  codebook = parts["codebook"]["weight"].astype(np.float32)
  return flax.traverse_util.unflatten_dict(flat), codebook, kwargs
