"""Segmentation checkpoints -> `beit_jax.models.segmentation.Segmenter` variables (pure numpy).

Two sources, both flat {name: array} state dicts (containers `state_dict` / `model` / `module`
and `module.` prefixes are unwrapped; torch tensors are turned into numpy):

* unilm / mmseg (`beit/semantic_segmentation`, mmseg 0.11 `EncoderDecoder`): `backbone.*`
  (unilm's BEiT keys, `backbone/beit.py`) with the neck `backbone.fpn1.{0,1,3}.*` and
  `backbone.fpn2.0.*`; `decode_head.psp_modules.i.1.*`, `decode_head.bottleneck.*`,
  `decode_head.lateral_convs.i.*`, `decode_head.fpn_convs.i.*`, `decode_head.fpn_bottleneck.*`,
  `decode_head.conv_seg.*` (`UPerHead`), `auxiliary_head.convs.i.*`, `auxiliary_head.conv_seg.*`
  (`FCNHead`); each ConvModule is `.conv.weight` + `.bn.{weight,bias,running_mean,running_var}`.
* Hugging Face `BeitForSemanticSegmentation.state_dict()` (`beit.*`, `fpn.fpn1.*`,
  `decode_head.*`, `auxiliary_head.*`), in transformers 5's names (`beit.layers.N.attention.
  q_proj`, `.convolution`/`.normalization`, `psp_modules.blocks.i.conv`, `psp_bottleneck`,
  `classifier`) or the older hub names (`beit.encoder.layer.N.attention.attention.query`,
  `fpn1.0`, `decode_head.psp_modules.i.1.conv`, `.bn`), the ones transformers'
  `conversion_mapping.py` renames. HF keys are renamed to unilm/mmseg's first: separate q/k/v
  Linears -> unilm's fused `attn.qkv.weight` (rows q, k, v) with `q_bias`, `v_bias` (HF's k has
  no bias), `lambda_{1,2}` -> `gamma_{1,2}`, `layernorm_{before,after}` -> `norm{1,2}`.
  `beit.layernorm` / `beit.pooler` (unused by HF's segmentation output) are dropped.

Then the backbone goes through `beit_jax.convert.beit`'s key map, the neck and heads through
`_head_leaf`: conv `weight` OIHW -> `kernel` HWIO, transposed-conv `weight` (in, out, 2, 2) ->
`kernel` (2, 2, in, out), BatchNorm `weight`/`bias` -> params `scale`/`bias` and
`running_mean`/`running_var` -> batch_stats `mean`/`var`; `num_batches_tracked` is dropped.

The architecture is read from the keys (backbone as `convert.beit.infer_model_kwargs`; number
of classes, `channels`, auxiliary width and depth from the head weights). What the weights do
not say is an argument: `out_indices` (our 0-based block indices; unilm's by default) and
`pool_scales` (their number must match the checkpoint's). HF's `config.out_indices` are not our
indices: `blocks_from_hf_out_indices` translates them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import numpy as np

from beit_jax.convert import beit as beit_convert
from beit_jax.models import segmentation

HEAD_PREFIXES = ("decode_head.", "auxiliary_head.")
NECK_PREFIX = "backbone.fpn"
DROPPED_HF_PREFIXES = ("beit.layernorm.", "beit.pooler.")

# HF (transformers 5 and older hub names) -> unilm / mmseg, applied in order to each key.
# `attn.q|k|v.*` are fused into `attn.qkv.weight`, `q_bias`, `v_bias` afterwards.
_HF_RULES: tuple[tuple[str, str], ...] = (
  (r"^beit\.embeddings\.cls_token$", "backbone.cls_token"),
  (r"^beit\.embeddings\.mask_token$", "backbone.mask_token"),
  (r"^beit\.embeddings\.position_embeddings$", "backbone.pos_embed"),
  (r"^beit\.embeddings\.patch_embeddings\.projection\.", "backbone.patch_embed.proj."),
  (
    r"^beit\.(shared_position_bias|encoder\.relative_position_bias)\.",
    "backbone.rel_pos_bias.",
  ),
  (r"^beit\.(layers|encoder\.layer)\.(\d+)\.", r"backbone.blocks.\2."),
  (r"\.lambda_([12])$", r".gamma_\1"),
  (r"\.layernorm_before\.", ".norm1."),
  (r"\.layernorm_after\.", ".norm2."),
  (r"\.(attention\.attention\.)?relative_position_bias\.(?=relative_position_)", ".attn."),
  (r"\.attention\.(q_proj|attention\.query)\.", ".attn.q."),
  (r"\.attention\.(k_proj|attention\.key)\.", ".attn.k."),
  (r"\.attention\.(v_proj|attention\.value)\.", ".attn.v."),
  (r"\.attention\.(o_proj|output\.dense)\.", ".attn.proj."),
  (r"\.intermediate\.dense\.", ".mlp.fc1."),
  (r"\.output\.dense\.", ".mlp.fc2."),
  (r"^(fpn\.fpn1\.conv_transpose1|fpn1\.0)\.", "backbone.fpn1.0."),
  (r"^(fpn\.fpn1\.normalization|fpn1\.1)\.", "backbone.fpn1.1."),
  (r"^(fpn\.fpn1\.conv_transpose2|fpn1\.3)\.", "backbone.fpn1.3."),
  (r"^(fpn\.fpn2|fpn2\.0)\.", "backbone.fpn2.0."),
  (r"^decode_head\.psp_modules\.blocks\.(\d+)\.conv\.", r"decode_head.psp_modules.\1.1."),
  (r"^decode_head\.psp_bottleneck\.", "decode_head.bottleneck."),
  (r"^(decode_head|auxiliary_head)\.classifier\.", r"\1.conv_seg."),
  (r"\.convolution\.", ".conv."),
  (r"\.normalization\.", ".bn."),
)


def _numpy(value: Any) -> np.ndarray:
  return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)


def flat_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{name: numpy array} with the `state_dict` / `model` / `module` containers and
  `module.` prefixes unwrapped."""
  sd = checkpoint
  for _ in range(3):
    inner = next((k for k in beit_convert.CONTAINER_KEYS if isinstance(sd.get(k), Mapping)), None)
    if inner is None:
      break
    sd = sd[inner]
  return {k.removeprefix("module."): _numpy(v) for k, v in sd.items()}


def is_hf_state_dict(sd: Mapping[str, Any]) -> bool:
  """HF's keys start with `beit.` (unilm / mmseg's with `backbone.`)."""
  return any(k.startswith("beit.") for k in sd)


def _hf_name_to_mmseg(key: str) -> str:
  for pattern, repl in _HF_RULES:
    key = re.sub(pattern, repl, key)
  return key


def hf_to_mmseg(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """An HF `BeitForSemanticSegmentation` state dict in unilm / mmseg names (numpy).

  Keys no rule knows keep their name (so they surface as unknown keys later)."""
  out: dict[str, np.ndarray] = {}
  for key, value in sd.items():
    if key.startswith(DROPPED_HF_PREFIXES) or key.endswith("num_batches_tracked"):
      continue
    new = _hf_name_to_mmseg(key)
    if new in out:
      raise ValueError(f"Two keys of the HF state dict map to {new!r} (one is {key!r}).")
    out[new] = _numpy(value)
  blocks = sorted(
    {m.group(1) for k in out if (m := re.match(r"backbone\.blocks\.(\d+)\.attn\.[qkv]\.", k))}
  )
  for i in blocks:
    p = f"backbone.blocks.{i}.attn."
    names = [p + "q.weight", p + "k.weight", p + "v.weight"]
    for name in names + [p + "q.bias", p + "v.bias"]:
      if name not in out:
        raise ValueError(f"The HF state dict has no {name!r} (in HF's names: block {i}).")
    out[p + "qkv.weight"] = np.concatenate([out.pop(n) for n in names], axis=0)
    out[p + "q_bias"] = out.pop(p + "q.bias")
    out[p + "v_bias"] = out.pop(p + "v.bias")
  return out


def blocks_from_hf_out_indices(hf_out_indices: Sequence[int], depth: int) -> tuple[int, ...]:
  """Our 0-based block indices for HF's `config.out_indices`.

  HF's `BeitForSemanticSegmentation.forward` reads `hidden_states[i - 1]` for each i, where
  `hidden_states[0]` is the embedding output and `hidden_states[k]` block k - 1's output: HF
  index i is block i - 2 (so HF's documented [3, 5, 7, 11] reads blocks 1, 3, 5, 9, not unilm's
  3, 5, 7, 11), and i = 0 wraps around to the last block. i = 1 (the embeddings) has no
  equivalent here."""
  out = []
  for i in hf_out_indices:
    if i == 1 or not 0 <= i <= depth:
      raise ValueError(
        f"HF out_index {i} (of {list(hf_out_indices)}) reads "
        f"{'the patch embeddings' if i == 1 else 'no block'}, which Segmenter cannot use."
      )
    out.append(depth - 1 if i == 0 else i - 2)
  return tuple(out)


def _head_leaf(key: str, value: np.ndarray) -> tuple[str, tuple[str, ...], np.ndarray]:
  """(collection, flax path, value) of an mmseg neck / head key."""
  key = re.sub(r"psp_modules\.(\d+)\.1\.", r"psp_modules.\1.", key)
  key = key.removeprefix("backbone.")
  parts = re.sub(r"\.(\d+)(?=\.)", r"_\1", key).split(".")
  *path, leaf = parts
  path = tuple(path)
  if leaf == "running_mean":
    return "batch_stats", path + ("mean",), value
  if leaf == "running_var":
    return "batch_stats", path + ("var",), value
  if leaf == "weight" and value.ndim == 4:
    if key.startswith("fpn"):  # ConvTranspose2d (in, out, kh, kw).
      return "params", path + ("kernel",), value.transpose(2, 3, 0, 1)
    return "params", path + ("kernel",), value.transpose(2, 3, 1, 0)
  if leaf == "weight":
    return "params", path + ("scale",), value
  return "params", path + (leaf,), value


def _mmseg_key(collection: str, path: tuple[str, ...]) -> str:
  """The unilm / mmseg key of a flax path (for error messages)."""
  if path[0] == "backbone":
    key = ".".join(path[1:])
    key = re.sub(r"^blocks_(\d+)", r"blocks.\1", key).replace("patch_embed.", "patch_embed.proj.")
    return "backbone." + re.sub(r"\.(kernel|scale)$", ".weight", key)
  *mods, leaf = path
  key = ".".join(re.sub(r"_(\d+)$", r".\1", m) for m in mods)
  key = re.sub(r"psp_modules\.(\d+)", r"psp_modules.\1.1", key)
  if key.startswith("fpn"):
    key = "backbone." + key
  names = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
  return f"{key}.{names.get(leaf, leaf)}"


def _count(sd: Mapping[str, Any], pattern: str) -> int:
  return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def infer_model_kwargs(
  sd: Mapping[str, np.ndarray],
  backbone_kwargs: Mapping[str, Any],
  out_indices: Sequence[int] | None,
  pool_scales: Sequence[int],
) -> dict[str, Any]:
  """`Segmenter` keyword arguments for an mmseg-named state dict."""
  for key in ("decode_head.conv_seg.weight", "decode_head.bottleneck.conv.weight"):
    if key not in sd:
      raise ValueError(f"Not a UperNet segmentation state dict: no {key!r}.")
  num_psp = _count(sd, r"decode_head\.psp_modules\.(\d+)\.")
  if num_psp != len(pool_scales):
    raise ValueError(
      f"The checkpoint has {num_psp} pyramid pooling branches but pool_scales={tuple(pool_scales)}."
    )
  names = ("image_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
  names += ("init_values", "use_abs_pos_emb", "use_rel_pos_bias", "use_shared_rel_pos_bias")
  kwargs = {k: backbone_kwargs[k] for k in names}
  depth = kwargs["depth"]
  aux_convs = _count(sd, r"auxiliary_head\.convs\.(\d+)\.")
  kwargs.update(
    out_indices=tuple(
      segmentation.default_out_indices(depth) if out_indices is None else out_indices
    ),
    num_classes=sd["decode_head.conv_seg.weight"].shape[0],
    channels=sd["decode_head.bottleneck.conv.weight"].shape[0],
    pool_scales=tuple(pool_scales),
    use_auxiliary_head=any(k.startswith("auxiliary_head.") for k in sd),
  )
  if kwargs["use_auxiliary_head"]:
    if "auxiliary_head.convs.0.conv.weight" not in sd:
      raise ValueError("The auxiliary head has no 'auxiliary_head.convs.0.conv.weight'.")
    kwargs.update(
      aux_channels=sd["auxiliary_head.convs.0.conv.weight"].shape[0], aux_num_convs=aux_convs
    )
  return kwargs


def to_flax(
  checkpoint: Mapping[str, Any],
  *,
  out_indices: Sequence[int] | None = None,
  pool_scales: Sequence[int] = (1, 2, 3, 6),
  num_heads: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """(params, batch_stats, `Segmenter` kwargs) from an mmseg / unilm or HF checkpoint.

  Both trees are checked against the inferred model's (`jax.eval_shape`): a key with no place
  in the model, a missing weight or a shape mismatch raises ValueError naming the key.
  """
  sd = flat_state_dict(checkpoint)
  source = {k: k for k in sd}  # mmseg name -> the name in the checkpoint, for messages.
  if is_hf_state_dict(sd):
    source = {_hf_name_to_mmseg(k): k for k in sd}
    sd = hf_to_mmseg(sd)
  sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  unknown = [k for k in sd if not k.startswith(("backbone.",) + HEAD_PREFIXES)]
  if unknown:
    raise ValueError(
      f"Checkpoint keys with no place in the model: {[source.get(k, k) for k in unknown[:5]]}."
    )
  backbone = {
    k: v for k, v in sd.items() if k.startswith("backbone.") and not k.startswith(NECK_PREFIX)
  }
  backbone = beit_convert.unwrap_state_dict(backbone)  # Drops index buffers; checks cls_token.
  try:
    backbone_kwargs = beit_convert.infer_model_kwargs(backbone, num_heads)
  except KeyError as e:  # A weight the architecture is read from.
    raise ValueError(f"The checkpoint has no 'backbone.{e.args[0]}' (unilm name).") from e
  kwargs = infer_model_kwargs(sd, backbone_kwargs, out_indices, pool_scales)

  flat: dict[str, dict[tuple[str, ...], np.ndarray]] = {"params": {}, "batch_stats": {}}
  origin: dict[tuple[str, tuple[str, ...]], str] = {}
  for key, value in backbone.items():
    path, leaf = beit_convert.to_flax_leaf(key, value.astype(np.float32))
    flat["params"][("backbone",) + path] = leaf
    origin["params", ("backbone",) + path] = "backbone." + key
  for key, value in sd.items():
    if key.startswith((NECK_PREFIX,) + HEAD_PREFIXES):
      collection, path, leaf = _head_leaf(key, value.astype(np.float32))
      flat[collection][path] = leaf
      origin[collection, path] = key

  expected = segmentation.abstract_variables(segmentation.Segmenter(**kwargs))
  for collection in ("params", "batch_stats"):
    want = flax.traverse_util.flatten_dict(expected[collection])
    have = flat[collection]
    for path, leaf in want.items():
      if path not in have:
        raise ValueError(
          f"The checkpoint has no weights for {collection} {'/'.join(path)} (unilm / mmseg "
          f"key {_mmseg_key(collection, path)!r}; architecture inferred: {kwargs})."
        )
      if tuple(have[path].shape) != tuple(leaf.shape):
        name = source.get(origin[collection, path], origin[collection, path])
        raise ValueError(
          f"{name!r} -> {collection} {'/'.join(path)}: checkpoint shape {have[path].shape} "
          f"but the inferred model expects {tuple(leaf.shape)}."
        )
    extra = [origin[collection, p] for p in have if p not in want]
    if extra:
      raise ValueError(
        f"Checkpoint keys with no place in the model: {[source.get(k, k) for k in extra[:5]]}."
      )
  params, stats = (flax.traverse_util.unflatten_dict(flat[c]) for c in ("params", "batch_stats"))
  return params, stats, kwargs
