"""Fine-tuning initialisation from BEiT params, as unilm's `run_class_finetuning.py` does it.

:func:`transfer_params` maps any BEiT param tree (a MIM pretraining export, a converted
official checkpoint, a classifier at another resolution) onto a destination
:class:`vit.BEiT`'s tree with unilm's checkpoint-load rules (`run_class_finetuning.py`,
`utils.load_state_dict` and the rel-pos resizing inside `main`):

1. a `head` whose shape differs from the destination's is dropped (keeps the init);
2. a shared `rel_pos_bias/relative_position_bias_table` is copied into every block when
   the destination has per-block tables (the reverse is an error);
3. `relative_position_index` buffers are dropped (the model recomputes them);
4. relative-position tables are resized to the destination grid with unilm's
   geometric-progression bicubic-spline resampling (:func:`resize_rel_pos_table`);
5. the absolute `pos_embed` is resized bicubically like torch's `F.interpolate`
   (:func:`resize_abs_pos_embed`), cls token kept;

then a non-strict load: destination params the source lacks keep their init
(`fc_norm`, `head`, ...), source params the destination lacks are dropped (`lm_head`,
`norm`, `mask_token`, ...). Any other shape mismatch raises ValueError.

`interp2d(kind='cubic')`, which unilm uses, was removed in SciPy 1.14. On a rectilinear
grid it fitted an interpolating bicubic spline with FITPACK `regrid_smth(x, y, z.T, s=0)`
and evaluated it with `bispev` (arguments outside the data clamped to the boundary);
`RectBivariateSpline(x, y, z.T, s=0)(dx, dy).T` makes the same two calls, and its output
is bit-identical to `interp2d` of SciPy 1.13.1 (checked on 5->7, 7->5, 7->11, 11->7,
27->39, 27->47 and 47->27 tables). timm's `resize_rel_pos_bias_table` uses the same
source coordinates but, without `TIMM_USE_SCIPY_INTERP=1` (which calls the removed
`interp2d`), interpolates them *bilinearly*, so it is not unilm's result.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import flax
import numpy as np
from scipy import interpolate

from beit_jax.models import vit

SHARED_TABLE = "rel_pos_bias/relative_position_bias_table"
BLOCK_TABLE = "blocks_{}/attn/relative_position_bias_table"
TABLE_SUFFIX = "relative_position_bias_table"
# Source params only a MIM model has: dropped (and reported) when the destination lacks them.
MIM_ONLY_PREFIXES = ("mask_token", "lm_head/", "norm/")
# Destination params that keep their init when the source's shape differs.
HEAD_PREFIXES = ("head/", "fc_norm/")
_BLOCK_RE = re.compile(r"^blocks_(\d+)/")
# The keys of a transfer report (see `transfer_params`).
REPORT_KEYS = ("loaded", "resized", "kept_from_init", "dropped", "notes")


# ---------------------------------------------------------------------------------
# Position-term resizing.
# ---------------------------------------------------------------------------------
def _geometric_coords(src_side: int, dst_side: int) -> np.ndarray:
  """unilm's source coordinates: ±cumulative sums of q^i, q bisected in [1.01, 1.5].

  q is chosen (tolerance 1e-6) so that 1 + q + ... + q^(src_side//2 - 1) is about
  dst_side // 2, i.e. the outermost source offset lands near the outermost target.
  When the ratio is out of reach q saturates at 1.01 (shrinking: the source extends
  past the targets) or 1.5 (strong growth: targets beyond the last coordinate get the
  boundary value, as FITPACK clamps).
  """

  def geometric_progression(a, r, n):
    return a * (1.0 - r**n) / (1.0 - r)

  left, right = 1.01, 1.5
  while right - left > 1e-6:
    q = (left + right) / 2.0
    if geometric_progression(1, q, src_side // 2) > dst_side // 2:
      right = q
    else:
      left = q
  dis = []
  cur = 1
  for i in range(src_side // 2):
    dis.append(cur)
    cur += q ** (i + 1)
  return np.asarray([-d for d in reversed(dis)] + [0] + dis, np.float64)


def _table_side(rows: int, num_extra: int) -> int:
  side = math.isqrt(rows - num_extra)
  if side * side != rows - num_extra or side % 2 == 0:
    raise ValueError(f"A relative-position table with {rows} rows is not (2W-1)^2 + {num_extra}.")
  return side


def resize_rel_pos_table(table: Any, dst_grid: int, num_extra: int = 3) -> np.ndarray:
  """Resizes a ((2W-1)^2 + num_extra, heads) table to a `dst_grid` x `dst_grid` patch grid.

  unilm's resampling: offsets of the source table sit at geometric-progression
  coordinates (:func:`_geometric_coords`), each head is fitted with an interpolating
  bicubic spline (what `interp2d(kind='cubic')` did) and sampled at the integer
  offsets -(W'-1)..W'-1; the `num_extra` cls rows at the end are kept. Returns a numpy
  array of the input's dtype (computed in float64); a copy when the grid is unchanged.
  """
  table = np.asarray(table)
  if table.ndim != 2:
    raise ValueError(f"Expected a (positions, heads) table, got shape {table.shape}.")
  src_side = _table_side(table.shape[0], num_extra)
  dst_side = 2 * dst_grid - 1
  if src_side == dst_side:
    return table.copy()
  if src_side <= 3:
    raise ValueError(
      f"A {src_side}x{src_side} relative-position table (grid "
      f"{(src_side + 1) // 2}) is too small for a bicubic spline fit."
    )
  body, extra = table[: table.shape[0] - num_extra], table[table.shape[0] - num_extra :]
  coords = _geometric_coords(src_side, dst_side)
  t = dst_side // 2.0
  targets = np.arange(-t, t + 0.1, 1.0)
  heads = []
  for h in range(table.shape[1]):
    z = body[:, h].astype(np.float64).reshape(src_side, src_side)  # rows dy, columns dx.
    # interp2d(x, y, z): regrid_smth(x, y, z.T), then bispev(dx, dy).T (same x == y).
    spline = interpolate.RectBivariateSpline(coords, coords, z.T, kx=3, ky=3, s=0)
    heads.append(spline(targets, targets).T.reshape(-1))
  out = np.concatenate([np.stack(heads, -1), extra.astype(np.float64)], axis=0)
  return out.astype(table.dtype)


def _bicubic_matrix(src: int, dst: int) -> np.ndarray:
  """(dst, src) weights of torch's 1-D bicubic resize (align_corners=False, A=-0.75).

  Source coordinate (i + 0.5) * src / dst - 0.5 (not clamped for cubic), taps
  floor(x) - 1 .. floor(x) + 2 with their indices clamped to the border.
  """
  a = -0.75

  def near(t):  # |t| <= 1.
    return ((a + 2) * t - (a + 3)) * t * t + 1

  def far(t):  # 1 < |t| < 2.
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

  x = (np.arange(dst) + 0.5) * (src / dst) - 0.5
  x0 = np.floor(x)
  t = x - x0
  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)
  idx = np.clip(x0[:, None].astype(np.int64) + np.arange(-1, 3), 0, src - 1)
  mat = np.zeros((dst, src))
  np.add.at(mat, (np.repeat(np.arange(dst), 4), idx.reshape(-1)), weights.reshape(-1))
  return mat


def resize_abs_pos_embed(pos_embed: Any, dst_grid: int, num_extra: int = 1) -> np.ndarray:
  """Resizes a (..., num_extra + g*g, D) position embedding to a `dst_grid`^2 patch grid.

  Exactly `torch.nn.functional.interpolate(mode='bicubic', align_corners=False)` on the
  (D, g, g) grid (cubic coefficient -0.75, border clamping), as unilm does it; the first
  `num_extra` (cls) tokens are kept. Not `jax.image.resize`, whose cubic is Keys -0.5.
  Returns numpy of the input's dtype (computed in float64).
  """
  pos_embed = np.asarray(pos_embed)
  tokens = pos_embed.shape[-2] - num_extra
  src_grid = math.isqrt(tokens)
  if src_grid * src_grid != tokens:
    raise ValueError(
      f"pos_embed {pos_embed.shape} has {tokens} patch tokens after "
      f"{num_extra} extra ones, not a square grid."
    )
  if src_grid == dst_grid:
    return pos_embed.copy()
  extra = pos_embed[..., :num_extra, :].astype(np.float64)
  grid = pos_embed[..., num_extra:, :].astype(np.float64)
  grid = grid.reshape(pos_embed.shape[:-2] + (src_grid, src_grid, pos_embed.shape[-1]))
  m = _bicubic_matrix(src_grid, dst_grid)
  out = np.einsum("yi,xj,...ijd->...yxd", m, m, grid)
  out = out.reshape(pos_embed.shape[:-2] + (dst_grid * dst_grid, pos_embed.shape[-1]))
  return np.concatenate([extra, out], axis=-2).astype(pos_embed.dtype)


# ---------------------------------------------------------------------------------
# Param-tree transfer.
# ---------------------------------------------------------------------------------
def _flatten(params: Any) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")


def shared_to_per_block(params: Any, depth: int) -> dict[str, Any]:
  """Copies the shared rel-pos table into `blocks_i/attn/` for i < depth and removes it."""
  flat = _flatten(params)
  if SHARED_TABLE not in flat:
    raise ValueError(f"No shared relative-position table ({SHARED_TABLE}) in the params.")
  missing = [i for i in range(depth) if not any(k.startswith(f"blocks_{i}/") for k in flat)]
  if missing:
    raise ValueError(f"depth={depth} but the params have no blocks {missing}.")
  shared = np.asarray(flat.pop(SHARED_TABLE))
  for i in range(depth):
    flat[BLOCK_TABLE.format(i)] = shared.copy()
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def format_report(report: Mapping[str, list[str]]) -> str:
  """Multi-line text of a :func:`transfer_params` report, for logs."""
  lines = [f"loaded {len(report['loaded'])} params"]
  for name in ("resized", "kept_from_init", "dropped"):
    if report[name]:
      lines.append(f"{name} ({len(report[name])}): {', '.join(report[name])}")
  return "\n".join(lines + list(report["notes"]))


def _resize(key: str, value: np.ndarray, init: np.ndarray, grid: int) -> np.ndarray | None:
  """`value` resized to the destination grid if `key` is a position term, else None."""
  try:
    if key.endswith(TABLE_SUFFIX) and value.ndim == 2 and value.shape[1] == init.shape[1]:
      return resize_rel_pos_table(value, grid)
    if key == "pos_embed" and value.shape[:-2] + value.shape[-1:] == (
      init.shape[:-2] + init.shape[-1:]
    ):
      return resize_abs_pos_embed(value, grid)
  except ValueError as e:
    raise ValueError(f"{key}: cannot resize source shape {value.shape} to {init.shape}: {e}") from e
  return None


def transfer_params(
  src_params: Any, dst_model: vit.BEiT, dst_init_params: Any
) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """(params for `dst_model`, report) from any BEiT params, with unilm's fine-tuning rules.

  `dst_init_params` is the destination's freshly initialised tree: params the source
  lacks (or a head of another shape) keep these values. Leaves come back as numpy
  arrays of the source (or init) dtype. The report maps `REPORT_KEYS` to '/'-joined
  param names: `loaded` (copied as is), `resized` (copied, resized to the new grid) and
  `kept_from_init` partition the destination tree; `dropped` are source params not
  used (a head of another shape is both dropped and kept from init); `notes` are
  sentences (the shared table's copy, unexpected non-MIM params, head mismatches). Raises
  ValueError for a shared table wanted from per-block ones, or for a shape mismatch that
  no rule covers (naming the key).
  """
  src = {
    k: np.asarray(v)
    for k, v in _flatten(src_params).items()
    if not k.endswith("relative_position_index")
  }
  dst = _flatten(dst_init_params)
  report = {k: [] for k in REPORT_KEYS}
  grid = dst_model.grid[0]
  dst_per_block = BLOCK_TABLE.format(0) in dst
  src_per_block = BLOCK_TABLE.format(0) in src
  dst_has_rel = dst_per_block or SHARED_TABLE in dst

  if SHARED_TABLE in dst and SHARED_TABLE not in src and src_per_block:
    raise ValueError(
      "The destination model uses one shared relative-position table "
      f"({SHARED_TABLE}) but the source has per-block tables "
      f"({BLOCK_TABLE.format(0)}, ...); they cannot be merged into one. Build the "
      "destination with use_shared_rel_pos_bias=False, use_rel_pos_bias=True."
    )
  if dst_per_block and SHARED_TABLE in src:  # unilm: overrides any per-block tables.
    depth = sum(1 for k in dst if k.endswith(TABLE_SUFFIX) and _BLOCK_RE.match(k))
    shared = src[SHARED_TABLE]
    for i in range(depth):
      src[BLOCK_TABLE.format(i)] = shared.copy()
    if SHARED_TABLE not in dst:
      del src[SHARED_TABLE]
    report["notes"].append(f"copied {SHARED_TABLE} into blocks_0..{depth - 1}/attn/.")

  out = {}
  for key, init in dst.items():
    init = np.asarray(init)
    if key not in src:
      out[key] = init
      report["kept_from_init"].append(key)
      continue
    value = src.pop(key)
    if value.shape == init.shape:
      out[key] = value
      report["loaded"].append(key)
    elif (resized := _resize(key, value, init, grid)) is not None:
      out[key] = resized
      report["resized"].append(key)
    elif key.startswith(HEAD_PREFIXES):
      out[key] = init
      report["kept_from_init"].append(key)
      report["dropped"].append(key)
      report["notes"].append(f"{key}: source shape {value.shape} != {init.shape}, kept init.")
    else:
      raise ValueError(
        f"{key}: source shape {value.shape} but the destination model expects {init.shape}."
      )
    if out[key].shape != init.shape:  # A resize that cannot reach the destination.
      raise ValueError(
        f"{key}: source shape {value.shape} resized to {out[key].shape}, "
        f"but the destination model expects {init.shape}."
      )

  for key in sorted(src):
    report["dropped"].append(key)
    if not (
      key.startswith(MIM_ONLY_PREFIXES)
      or key == "pos_embed"
      or (key.endswith(TABLE_SUFFIX) and not dst_has_rel)
    ):
      report["notes"].append(f"{key}: not in the destination model, dropped.")
  return flax.traverse_util.unflatten_dict(out, sep="/"), report
