"""unilm / timm BEiT state dicts <-> `beit_jax.models.vit.BEiT` params (pure numpy).

The key map (unilm's `modeling_finetune.py` / timm's `beit.py` names): Linear `weight`
(out, in) <-> Flax `kernel` (in, out); patch-embedding conv `weight` OIHW <->
`patch_embed/kernel` HWIO; LayerNorm `weight`/`bias` <-> `scale`/`bias`; `blocks.i.` <->
`blocks_i/`; `q_bias`, `v_bias`, `gamma_{1,2}`, tokens and relative-position tables keep
their names and shapes. `relative_position_index` buffers (recomputed by the model) and
timm's non-persistent `k_bias` are dropped. Checkpoint containers (`model` / `state_dict`
/ `module`) and `backbone.` / `module.` prefixes (segmentation and DDP checkpoints) are
unwrapped. A BEiT v2 pretraining checkpoint (unilm `beitv2_*_pt1k*.pth`, `VisionTransformer
ForMaskedImageModelingCLS`) converts to its backbone: the patch-aggregation weights
(`cls_pt_layers.*`, and `cls_pt_norm.*` / `cls_pt_lm_head.*` without a shared head) exist for
pretraining only and are dropped, as unilm's fine-tuning drops them (`pretraining_only_keys`).

The architecture is read from the keys and shapes (`infer_model_kwargs`): width from
`cls_token`, depth from `blocks.*`, patch size from the conv kernel, grid from
`pos_embed` or the relative-position table, heads from the table (or, for the vanilla
`pt1k_800ep` layout without any table, from the standard variant of that width), and
which heads and position terms exist.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from typing import IO, Any

import flax
import numpy as np

from beit_jax import paths
from beit_jax.models import vit

CONTAINER_KEYS = ("model", "state_dict", "module")
PREFIXES = ("module.", "backbone.", "encoder.")
DROPPED_SUFFIXES = ("relative_position_index", "attn.k_bias")
# BEiT v2's patch-aggregation head (unilm beit2 `modeling_pretrain.py`): pretraining only.
V2_PRETRAINING_PREFIXES = ("cls_pt_layers.", "cls_pt_norm.", "cls_pt_lm_head.")
_HEADS_BY_WIDTH = {d: h for d, _, h in vit.VARIANTS.values()}


def torch_file(path: str) -> str | IO[bytes]:
  """What `torch.load` reads for `path`: a local path as it is, a bucket file's bytes."""
  return io.BytesIO(paths.read_bytes(path)) if paths.is_remote(path) else path


def load_torch_checkpoint(path: str) -> Mapping[str, Any]:
  """A `.pth` / `.bin` file read with `torch.load(weights_only=True)`: tensors and plain
  containers only, no code runs (needs the `convert` extra: `pip install -e ".[convert]"`)."""
  try:
    import torch  # Optional: the `convert` extra.
  except ImportError as e:
    raise ImportError(
      'Reading PyTorch checkpoints needs torch: pip install -e ".[convert]".'
    ) from e
  try:
    return torch.load(torch_file(path), map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as e:  # UnpicklingError for anything but tensors and containers.
    raise ValueError(
      f"{path} could not be read as a weights-only PyTorch checkpoint ({type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''}). It may hold pickled code, which is not "
      "loaded; re-save its state_dict with torch.save(model.state_dict(), path)."
    ) from e


def unwrap_containers(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
  """The state dict inside up to three levels of `model` / `state_dict` / `module`."""
  sd = checkpoint
  for _ in range(3):
    inner = next((k for k in CONTAINER_KEYS if isinstance(sd.get(k), Mapping)), None)
    if inner is None:
      break
    sd = sd[inner]
  return sd


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor or array-like as a numpy array."""
  return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The flat {key: numpy array} of a checkpoint: containers unwrapped, prefixes and
  recomputed buffers dropped."""
  sd = unwrap_containers(checkpoint)
  out = {}
  for key, value in sd.items():
    key = _strip_prefixes(key)
    if key.endswith(DROPPED_SUFFIXES) or key.startswith(V2_PRETRAINING_PREFIXES):
      continue
    out[key] = to_numpy(value)
  if "cls_token" not in out:
    raise ValueError(f"Not a BEiT state dict: no 'cls_token' (keys start with {sorted(out)[:5]}).")
  return out


def pretraining_only_keys(checkpoint: Mapping[str, Any]) -> list[str]:
  """The keys of BEiT v2's patch-aggregation head in a checkpoint (`unwrap_state_dict`
  drops them)."""
  keys = (_strip_prefixes(k) for k in unwrap_containers(checkpoint))
  return sorted(k for k in keys if k.startswith(V2_PRETRAINING_PREFIXES))


def _strip_prefixes(key: str) -> str:
  for prefix in PREFIXES:
    if key.startswith(prefix):
      key = key[len(prefix) :]
  return key


def _grid_from_table(rows: int) -> int:
  side = math.isqrt(rows - 3)
  if side * side != rows - 3 or side % 2 == 0:
    raise ValueError(f"A relative-position table with {rows} rows is not (2W-1)^2 + 3.")
  return (side + 1) // 2


def infer_model_kwargs(
  sd: Mapping[str, np.ndarray], num_heads: int | None = None
) -> dict[str, Any]:
  """`vit.BEiT` keyword arguments that reproduce the state dict's architecture."""
  d = sd["cls_token"].shape[-1]
  patch = sd["patch_embed.proj.weight"].shape[-1]
  depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
  shared = "rel_pos_bias.relative_position_bias_table" in sd
  per_block = "blocks.0.attn.relative_position_bias_table" in sd
  table = sd.get(
    "rel_pos_bias.relative_position_bias_table",
    sd.get("blocks.0.attn.relative_position_bias_table"),
  )
  if "pos_embed" in sd:
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
  elif table is not None:
    grid = _grid_from_table(table.shape[0])
  else:
    raise ValueError(
      "Cannot tell the image size: neither 'pos_embed' nor a relative-position "
      "table is in the state dict."
    )
  if table is not None:
    if num_heads is not None and num_heads != table.shape[1]:
      raise ValueError(
        f"num_heads={num_heads} disagrees with the relative-position table "
        f"({table.shape[1]} heads)."
      )
    num_heads = table.shape[1]
  elif num_heads is None:
    if d not in _HEADS_BY_WIDTH:
      raise ValueError(
        f"Cannot infer the number of heads of a {d}-wide model without a "
        "relative-position table; pass num_heads."
      )
    num_heads = _HEADS_BY_WIDTH[d]
  mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / d
  return dict(
    image_size=grid * patch,
    patch_size=patch,
    embed_dim=d,
    depth=depth,
    num_heads=num_heads,
    mlp_ratio=mlp_ratio,
    init_values=0.1 if "blocks.0.gamma_1" in sd else 0.0,  # > 0 creates the gammas.
    use_abs_pos_emb="pos_embed" in sd,
    use_shared_rel_pos_bias=shared,
    use_rel_pos_bias=per_block,
    use_mask_token="mask_token" in sd,
    vocab_size=sd["lm_head.weight"].shape[0] if "lm_head.weight" in sd else 0,
    num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
    use_mean_pooling="fc_norm.weight" in sd,
  )


def to_flax_leaf(key: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  if key.startswith("patch_embed.proj."):
    key = "patch_embed." + key[len("patch_embed.proj.") :]
  if key.startswith("blocks."):
    _, i, rest = key.split(".", 2)
    key = f"blocks_{i}.{rest}"
  path = key.split(".")
  if path[-1] == "weight":
    if value.ndim == 4:
      return tuple(path[:-1]) + ("kernel",), value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
      return tuple(path[:-1]) + ("kernel",), value.T
    return tuple(path[:-1]) + ("scale",), value
  return tuple(path), value


def unilm_to_flax(
  checkpoint: Mapping[str, Any], num_heads: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params, model kwargs) from a unilm / timm BEiT checkpoint or state dict.

  The params tree is checked against the inferred model's (`jax.eval_shape`): a missing,
  extra or mis-shaped key raises ValueError naming the first one.
  """
  sd = unwrap_state_dict(checkpoint)
  kwargs = infer_model_kwargs(sd, num_heads)
  flat = dict(to_flax_leaf(k, v.astype(np.float32)) for k, v in sd.items())
  check_params(flat, vit.abstract_params(vit.BEiT(**kwargs)), kwargs)
  return flax.traverse_util.unflatten_dict(flat), kwargs


def check_params(flat: Mapping[tuple[str, ...], Any], abstract: Any, kwargs: Any) -> None:
  """Raises ValueError naming the first param of ``abstract`` (the model's param tree of
  ShapeDtypeStructs) that ``flat`` ({path: array}) lacks or has in another shape, or the
  first key of ``flat`` the model has no place for."""
  expected = flax.traverse_util.flatten_dict(abstract)
  for path, leaf in expected.items():
    if path not in flat:
      raise ValueError(
        f"The checkpoint has no weights for {'/'.join(path)} (architecture inferred: {kwargs})."
      )
    if tuple(flat[path].shape) != tuple(leaf.shape):
      raise ValueError(
        f"{'/'.join(path)}: checkpoint shape {flat[path].shape} but the "
        f"inferred model expects {leaf.shape}."
      )
  extra = sorted("/".join(p) for p in flat if p not in expected)
  if extra:
    raise ValueError(f"Checkpoint keys with no place in the model: {extra[:5]}.")


def flax_to_unilm(
  params: Mapping[str, Any], *, with_index: bool = True, grid: int | None = None
) -> dict[str, np.ndarray]:
  """A unilm-layout state dict (numpy) from `BEiT` params; `with_index` adds the
  `relative_position_index` buffers unilm's modules expect (needs the grid)."""
  sd = {}
  for path, value in flax.traverse_util.flatten_dict(dict(params)).items():
    value = np.asarray(value, np.float32)
    parts = list(path)
    if parts[0].startswith("blocks_"):
      parts = ["blocks", parts[0][len("blocks_") :]] + parts[1:]
    if parts[0] == "patch_embed":
      parts = ["patch_embed", "proj"] + parts[1:]
    if parts[-1] == "kernel":
      parts[-1] = "weight"
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    elif parts[-1] == "scale":
      parts[-1] = "weight"
    key = ".".join(parts)
    sd[key] = np.ascontiguousarray(value)
    if with_index and key.endswith("relative_position_bias_table"):
      if grid is None:
        grid = _grid_from_table(value.shape[0])
      sd[key.replace("relative_position_bias_table", "relative_position_index")] = (
        vit.relative_position_index((grid, grid)).astype(np.int64)
      )
  return sd
