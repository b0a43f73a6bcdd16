"""Tests for beit_jax.models.transfer (CPU; tiny models).

Rel-pos resizing is checked against golden values from `scipy.interpolate.interp2d`
(SciPy 1.13.1, the last release that has it) run through unilm's loop, against a literal
port of that loop with `RectBivariateSpline`, and against timm's fallback (which is
bilinear, see `test_timm_fallback_is_bilinear_on_unilm_coordinates`). The abs-pos resize
is checked against torch's bicubic `F.interpolate`. Param transfer is checked on tiny
random models, through the forward pass where that proves the mapping.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import interpolate

from beit_jax.models import transfer, vit

VOCAB = 64
NUM_CLASSES = 10
PATCH = 8

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _flat(tree) -> dict[str, np.ndarray]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _random_params(model: vit.BEiT, seed: int = 0, scale: float = 0.3):
  """Every leaf random (LayerNorm scales around 1), float32 numpy; no `model.init`."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, leaf in _flat(vit.abstract_params(model)).items():
    value = scale * rng.standard_normal(leaf.shape)
    flat[name] = (1.0 + value if name.endswith("scale") else value).astype(np.float32)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def _apply(model, params, images, method):
  """`model.apply` compiled without LLVM optimisation (fast on this CPU)."""

  def fn(p, x):
    return model.apply({"params": p}, x, method=method)

  return jax.jit(fn).lower(params, images).compile(compiler_options=_FAST_COMPILE)(params, images)


def _images(size: int, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)


def _mim(image_size: int = 32, **kw) -> vit.BEiT:
  return vit.mim_model("test", image_size=image_size, patch_size=PATCH, vocab_size=VOCAB, **kw)


def _classifier(image_size: int = 32, num_classes: int = NUM_CLASSES, **kw) -> vit.BEiT:
  return vit.classifier_model("test", num_classes, image_size=image_size, patch_size=PATCH, **kw)


# ---------------------------------------------------------------------------------
# Relative-position table resizing.
# ---------------------------------------------------------------------------------
def _det_table(side: int, heads: int) -> np.ndarray:
  """A deterministic rough ((side^2 + 3), heads) table (the golden values' input)."""
  k = np.arange(side * side + 3)[:, None]
  h = np.arange(heads)[None]
  return (np.sin(1.3 * k + 0.7 * h) + 0.1 * ((7 * k + 3 * h) % 5)).astype(np.float32)


def _unilm_coords(src_size: int, dst_size: int) -> list[float]:
  """unilm run_class_finetuning.py's source coordinates, verbatim."""

  def geometric_progression(a, r, n):
    return a * (1.0 - r**n) / (1.0 - r)

  left, right = 1.01, 1.5
  while right - left > 1e-6:
    q = (left + right) / 2.0
    gp = geometric_progression(1, q, src_size // 2)
    if gp > dst_size // 2:
      right = q
    else:
      left = q
  dis = []
  cur = 1
  for i in range(src_size // 2):
    dis.append(cur)
    cur += q ** (i + 1)
  r_ids = [-_ for _ in reversed(dis)]
  return r_ids + [0] + dis


def _unilm_resize(rel_pos_bias: np.ndarray, dst_num_pos: int) -> np.ndarray:
  """unilm's loop with `interp2d(x, y, z, kind='cubic')(dx, dy)` written as
  `RectBivariateSpline(y, x, z)(dy, dx)` (same interpolating spline)."""
  num_extra_tokens = 3
  src_num_pos, num_attn_heads = rel_pos_bias.shape
  src_size = int((src_num_pos - num_extra_tokens) ** 0.5)
  dst_size = int((dst_num_pos - num_extra_tokens) ** 0.5)
  extra_tokens = rel_pos_bias[-num_extra_tokens:, :]
  rel_pos_bias = rel_pos_bias[:-num_extra_tokens, :]
  x = _unilm_coords(src_size, dst_size)
  y = x
  t = dst_size // 2.0
  dx = np.arange(-t, t + 0.1, 1.0)
  dy = np.arange(-t, t + 0.1, 1.0)
  all_rel_pos_bias = []
  for i in range(num_attn_heads):
    z = rel_pos_bias[:, i].reshape(src_size, src_size).astype(np.float32)
    f = interpolate.RectBivariateSpline(y, x, z, kx=3, ky=3, s=0)
    all_rel_pos_bias.append(f(dy, dx).astype(np.float32).reshape(-1, 1))
  return np.concatenate([np.concatenate(all_rel_pos_bias, axis=-1), extra_tokens], axis=0)


# interp2d(kind='cubic') outputs (head 1 of _det_table(5 or 7, 2); 8 entries of head 0
# of _det_table(27, 1) -> 47x47) computed with SciPy 1.13.1 through unilm's loop.
_INTERP2D_5_TO_7 = np.array(
  [
    [
      0.944217681885,
      1.243856104301,
      0.909297406673,
      0.042254306376,
      -0.593690991402,
      -0.601261971302,
      -0.273876667023,
    ],
    [
      0.982512690134,
      1.274471697705,
      0.890304517004,
      -0.006201888766,
      -0.600622029282,
      -0.557357668581,
      -0.229128560565,
    ],
    [
      1.093667864799,
      1.343793816433,
      0.798487126827,
      -0.166479125619,
      -0.594552576542,
      -0.380192399184,
      -0.065604172647,
    ],
    [
      1.205954790115,
      1.384287145042,
      0.650287866592,
      -0.358052283525,
      -0.548844516277,
      -0.12606896077,
      0.150422692299,
    ],
    [
      1.275820493698,
      1.363439918465,
      0.47163900733,
      -0.523494780064,
      -0.458707004786,
      0.149209146701,
      0.364088535309,
    ],
    [
      1.301284025027,
      1.308852839057,
      0.318312783249,
      -0.630987488868,
      -0.36288913541,
      0.369107243053,
      0.522843599316,
    ],
    [
      1.299993753433,
      1.282228404916,
      0.270905792713,
      -0.655059754848,
      -0.328360766172,
      0.432751995483,
      0.56538850069,
    ],
  ]
)
_INTERP2D_7_TO_5 = np.array(
  [
    [-0.572860810139, -0.056041558323, 1.189514651587, 0.633728150221, -0.346944028771],
    [1.274366089786, 0.47163900733, -0.523494780064, -0.458707004786, 0.354367172263],
    [-0.656601958112, -0.328360766172, 0.56538850069, 1.277342557907, 0.073385516137],
    [0.755917592038, 1.208927512169, -0.158622667193, -0.793790221214, 0.015640121426],
    [-0.362578722486, -0.773876594891, 0.226064543381, 0.984538743346, 0.951492175174],
  ]
)
_INTERP2D_27_TO_47_INDEX = [0, 46, 1104, 2208, 275, 1412, 1000, 1500]
_INTERP2D_27_TO_47 = np.array(
  [
    9.398079675215e-17,
    8.871211409569e-01,
    1.224792838097e00,
    -6.037138700485e-01,
    8.590609455696e-01,
    8.615537645834e-01,
    -2.719057357630e-01,
    8.925238692649e-01,
  ]
)


@pytest.mark.parametrize("grid,heads", [(4, 2), (14, 12)])
def test_rel_pos_resize_same_grid_is_identity(grid, heads):
  table = np.random.default_rng(0).standard_normal(((2 * grid - 1) ** 2 + 3, heads))
  out = transfer.resize_rel_pos_table(table.astype(np.float32), grid)
  np.testing.assert_array_equal(out, table.astype(np.float32))
  assert out.dtype == np.float32


def test_rel_pos_resize_matches_interp2d_golden_values():
  got = transfer.resize_rel_pos_table(_det_table(5, 2), 4)  # 5x5 -> 7x7 table.
  np.testing.assert_allclose(got[:-3, 1].reshape(7, 7), _INTERP2D_5_TO_7, atol=1e-6)
  got = transfer.resize_rel_pos_table(_det_table(7, 2), 3)  # 7x7 -> 5x5.
  np.testing.assert_allclose(got[:-3, 1].reshape(5, 5), _INTERP2D_7_TO_5, atol=1e-6)
  got = transfer.resize_rel_pos_table(_det_table(27, 1), 24)  # 14 -> 24 patch grid.
  assert got.shape == (47 * 47 + 3, 1)
  np.testing.assert_allclose(got[_INTERP2D_27_TO_47_INDEX, 0], _INTERP2D_27_TO_47, atol=1e-6)


@pytest.mark.parametrize(
  "src_grid,dst_grid,heads", [(3, 4, 2), (4, 3, 2), (14, 24, 1), (24, 14, 1), (4, 6, 2)]
)
def test_rel_pos_resize_matches_unilm_loop(src_grid, dst_grid, heads):
  rng = np.random.default_rng(src_grid * 100 + dst_grid)
  table = rng.standard_normal(((2 * src_grid - 1) ** 2 + 3, heads)).astype(np.float32)
  got = transfer.resize_rel_pos_table(table, dst_grid)
  want = _unilm_resize(table, (2 * dst_grid - 1) ** 2 + 3)
  assert got.shape == want.shape == ((2 * dst_grid - 1) ** 2 + 3, heads)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_array_equal(got[-3:], table[-3:])  # cls rows kept, in order.


def test_rel_pos_resize_reproduces_smooth_function():
  """unilm places source offset i at coordinate ±(1 + q + ... + q^(|i|-1)): a table that is
  a smooth f of those coordinates comes back as f at the new integer offsets."""
  coords = np.asarray(_unilm_coords(27, 47))
  assert abs(coords[-1] - 23) < 1e-4  # 14 -> 24: the outermost offsets line up.

  def f(dy, dx):
    return np.sin(0.15 * dy) * np.cos(0.1 * dx) + 0.02 * dx + 0.3

  yy, xx = np.meshgrid(coords, coords, indexing="ij")
  table = np.concatenate(
    [np.stack([f(yy, xx), -f(xx, yy)], -1).reshape(-1, 2), [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]
  ).astype(np.float32)
  got = transfer.resize_rel_pos_table(table, 24)
  d = np.arange(-23.0, 24.0)
  dy, dx = np.meshgrid(d, d, indexing="ij")
  want = np.stack([f(dy, dx), -f(dx, dy)], -1).reshape(-1, 2)
  np.testing.assert_allclose(got[:-3], want, atol=3e-4)
  np.testing.assert_array_equal(got[-3:], table[-3:])
  # Offsets 0 and ±1 are knots of the interpolating spline: reproduced exactly.
  src = table[:-3].reshape(27, 27, 2)[12:15, 12:15]
  np.testing.assert_allclose(got[:-3].reshape(47, 47, 2)[22:25, 22:25], src, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's torch indexing.
def test_timm_fallback_is_bilinear_on_unilm_coordinates():
  """timm's `resize_rel_pos_bias_table` (without TIMM_USE_SCIPY_INTERP, which needs the
  removed interp2d) interpolates unilm's coordinates bilinearly, not with the spline."""
  torch = pytest.importorskip("torch")
  pos_embed_rel = pytest.importorskip("timm.layers.pos_embed_rel")
  table = np.random.default_rng(3).standard_normal((7 * 7 + 3, 2)).astype(np.float32)
  got = pos_embed_rel.resize_rel_pos_bias_table(
    torch.from_numpy(table), (6, 6), (11 * 11 + 3, 2)
  ).numpy()
  coords = np.asarray(_unilm_coords(7, 11))
  d = np.clip(np.arange(-5.0, 6.0), coords[0], coords[-1])  # Both clamp at the border.
  dy, dx = np.meshgrid(d, d, indexing="ij")
  bilinear = np.stack(
    [
      interpolate.RegularGridInterpolator(
        (coords, coords), table[:-3, h].reshape(7, 7).astype(np.float64)
      )((dy, dx)).reshape(-1)
      for h in range(2)
    ],
    -1,
  )
  np.testing.assert_allclose(got[:-3], bilinear, atol=1e-5)
  np.testing.assert_array_equal(got[-3:], table[-3:])
  assert np.abs(got - transfer.resize_rel_pos_table(table, 6)).max() > 0.1


def test_rel_pos_resize_errors():
  with pytest.raises(ValueError, match="not"):
    transfer.resize_rel_pos_table(np.zeros((30, 2)), 4)
  with pytest.raises(ValueError, match="too small"):
    transfer.resize_rel_pos_table(np.zeros((12, 2)), 4)  # 3x3 table: grid 2.


# ---------------------------------------------------------------------------------
# Absolute position embedding resizing.
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("src,dst", [(4, 6), (6, 4), (14, 24), (24, 14), (3, 3), (5, 16)])
def test_abs_pos_resize_matches_torch_bicubic(src, dst):
  torch = pytest.importorskip("torch")
  d = 8
  pos = np.random.default_rng(src + dst).standard_normal((1, 1 + src * src, d))
  pos = pos.astype(np.float32)
  got = transfer.resize_abs_pos_embed(pos, dst)
  grid = torch.from_numpy(pos[:, 1:]).reshape(1, src, src, d).permute(0, 3, 1, 2)
  grid = torch.nn.functional.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
  want = np.concatenate([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, d).numpy()], 1)
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5)
  if src == dst:
    np.testing.assert_array_equal(got, pos)


# ---------------------------------------------------------------------------------
# Param-tree transfer.
# ---------------------------------------------------------------------------------
def test_shared_to_per_block_copies_the_table():
  params = _random_params(_mim())
  out = _flat(transfer.shared_to_per_block(params, depth=2))
  shared = _flat(params)[transfer.SHARED_TABLE]
  assert transfer.SHARED_TABLE not in out
  for i in range(2):
    np.testing.assert_array_equal(out[f"blocks_{i}/attn/relative_position_bias_table"], shared)
  with pytest.raises(ValueError, match="no blocks"):
    transfer.shared_to_per_block(params, depth=3)
  with pytest.raises(ValueError, match="No shared"):
    transfer.shared_to_per_block(transfer.shared_to_per_block(params, 2), 2)


def test_per_block_classifier_encodes_like_the_shared_mim_model():
  mim, cls = _mim(), _classifier()
  src = _random_params(mim, seed=0)
  params, report = transfer.transfer_params(src, cls, _random_params(cls, seed=1))
  assert any("copied" in n for n in report["notes"])
  assert not report["resized"]
  assert sorted(report["kept_from_init"]) == [
    "fc_norm/bias",
    "fc_norm/scale",
    "head/bias",
    "head/kernel",
  ]
  assert sorted(report["dropped"]) == [
    "lm_head/bias",
    "lm_head/kernel",
    "mask_token",
    "norm/bias",
    "norm/scale",
  ]
  images = _images(32)
  want = _apply(mim, src, images, mim.encode)
  got = _apply(cls, params, images, cls.encode)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(want)).max() > 0.1


def test_mim_32px_to_classifier_48px():
  mim = _mim(32, use_abs_pos_emb=True)
  cls = _classifier(48, use_abs_pos_emb=True)  # Grid 4 -> 6.
  src = jax.tree.map(jnp.asarray, _random_params(mim))  # jax leaves work too.
  init = _random_params(cls, seed=1)
  params, report = transfer.transfer_params(src, cls, init)
  tables = [f"blocks_{i}/attn/relative_position_bias_table" for i in range(2)]
  assert sorted(report["resized"]) == sorted(["pos_embed"] + tables)
  assert "resized (3): " in transfer.format_report(report)
  flat, flat_src, flat_init = _flat(params), _flat(src), _flat(init)
  parts = report["loaded"] + report["resized"] + report["kept_from_init"]
  assert sorted(parts) == sorted(flat_init)  # A partition of the destination tree.
  assert {k: v.shape for k, v in flat.items()} == {k: v.shape for k, v in flat_init.items()}
  for name in tables:
    np.testing.assert_array_equal(
      flat[name], transfer.resize_rel_pos_table(flat_src[transfer.SHARED_TABLE], 6)
    )
  np.testing.assert_array_equal(
    flat["pos_embed"], transfer.resize_abs_pos_embed(flat_src["pos_embed"], 6)
  )
  np.testing.assert_array_equal(flat["head/kernel"], flat_init["head/kernel"])
  np.testing.assert_array_equal(
    flat["blocks_1/mlp/fc2/kernel"], flat_src["blocks_1/mlp/fc2/kernel"]
  )
  assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in flat.values())
  logits = _apply(cls, params, _images(48), cls.classify)
  assert logits.shape == (2, NUM_CLASSES) and np.isfinite(np.asarray(logits)).all()


def test_abs_pos_presence_differs():
  no_abs, with_abs = _classifier(), _classifier(use_abs_pos_emb=True)
  _, report = transfer.transfer_params(
    _random_params(_mim(use_abs_pos_emb=True)), no_abs, _random_params(no_abs)
  )
  assert "pos_embed" in report["dropped"]
  init = _random_params(with_abs, seed=1)
  params, report = transfer.transfer_params(_random_params(_mim()), with_abs, init)
  assert "pos_embed" in report["kept_from_init"]
  np.testing.assert_array_equal(params["pos_embed"], init["pos_embed"])


def test_head_of_another_size_keeps_init_and_fc_norm_loads():
  src_model, dst_model = _classifier(num_classes=10), _classifier(num_classes=5)
  src, init = _random_params(src_model), _random_params(dst_model, seed=1)
  params, report = transfer.transfer_params(src, dst_model, init)
  assert {"head/kernel", "head/bias"} <= set(report["kept_from_init"])
  np.testing.assert_array_equal(params["head"]["kernel"], init["head"]["kernel"])
  np.testing.assert_array_equal(params["fc_norm"]["scale"], src["fc_norm"]["scale"])
  assert "fc_norm/scale" in report["loaded"]


def test_per_block_to_shared_is_an_error():
  cls, mim = _classifier(), _mim()
  with pytest.raises(ValueError, match="per-block"):
    transfer.transfer_params(_random_params(cls), mim, _random_params(mim))


def test_other_shape_mismatch_raises_naming_the_key():
  src_model, dst_model = _mim(mlp_ratio=2.0), _classifier()
  with pytest.raises(
    ValueError,
    match=r"blocks_0/mlp/fc1/(bias|kernel): source shape "
    r"\((32, )?64,?\) .* \((32, )?128,?\)",
  ):
    transfer.transfer_params(_random_params(src_model), dst_model, _random_params(dst_model))
  heads_model = _mim(num_heads=4)
  with pytest.raises(ValueError, match="relative_position_bias_table"):
    transfer.transfer_params(_random_params(heads_model), dst_model, _random_params(dst_model))
