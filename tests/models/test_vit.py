"""Tests for beit_jax.models.vit (CPU; tiny models, `jax.eval_shape` for full sizes).

The forward pass is checked against an independent plain-numpy (float64) port of
unilm's `VisionTransformerForMaskedImageModeling.forward` / `VisionTransformer.forward`
(`modeling_pretrain.py` / `modeling_finetune.py`), run on parameter trees whose every
leaf is random (zeros at init would hide missing q/v biases, rel-pos tables, gammas, LN
affine terms, ...). Random parameters are filled from `jax.eval_shape` with numpy
normals, so only the init tests pay for `model.init`. Every program is compiled once per
test through `_compile`, without XLA's LLVM optimisation: on this CPU jaxlib that
optimisation costs about 1.5 s per tiny forward pass and 5 s per backward pass, more than
the whole run.
"""

import contextlib
import io
import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import ad_checkpoint

from beit_jax.models import vit

# Image 32, patch 8 -> 4x4 grid, N = 16 patches.
IMAGE = 32
PATCH = 8
GRID = IMAGE // PATCH
NUM_PATCHES = GRID * GRID
TINY = dict(image_size=IMAGE, patch_size=PATCH)
VOCAB = 64
NUM_CLASSES = 10

# Std of a unit normal truncated to [-1, 1]: sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)).
_PHI1 = math.exp(-0.5) / math.sqrt(2 * math.pi)
TRUNC1_STD = math.sqrt(1 - 2 * _PHI1 / math.erf(1 / math.sqrt(2)))

# Masked patches per sample (distinct counts would need padding; K = 5 for both).
MASKED = np.array([[1, 4, 5, 10, 15], [0, 2, 3, 7, 8]])


def _flat(tree) -> dict[str, np.ndarray]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _unflat(flat: dict[str, np.ndarray]):
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def _fast_key(seed: int) -> jax.Array:
  """A PRNG key whose draws compile fast on this CPU jaxlib."""
  return jax.random.key(seed, impl="unsafe_rbg")


def _random_params(model: vit.BEiT, seed: int = 0, scale: float = 0.3):
  """Every leaf of the model's param tree random (LN scales around 1), float32."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, leaf in _flat(vit.abstract_params(model)).items():
    value = scale * rng.standard_normal(leaf.shape)
    if name.endswith("scale"):  # LayerNorm scale.
      value = 1.0 + value
    flat[name] = jnp.asarray(value, jnp.float32)
  return _unflat(flat)


_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compile(fn, *example_args):
  """`jax.jit(fn)` compiled for `example_args`' shapes with LLVM optimisation off."""
  return jax.jit(fn).lower(*example_args).compile(compiler_options=_FAST_COMPILE)


def _run(fn, *args):
  return _compile(fn, *args)(*args)


def _apply(model, params, *args, method=None, **kwargs):
  """`model.apply` compiled (op-by-op dispatch is slow on this CPU)."""
  return _run(lambda p, *a: model.apply({"params": p}, *a, method=method, **kwargs), params, *args)


def _images(seed: int = 1, batch: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((batch, IMAGE, IMAGE, 3)).astype(np.float32)


def _mask_and_positions() -> tuple[np.ndarray, np.ndarray]:
  mask = np.zeros((len(MASKED), NUM_PATCHES), bool)
  for b, idx in enumerate(MASKED):
    mask[b, idx] = True
  return mask, MASKED.astype(np.int32)


# ---------------------------------------------------------------------------------
# Independent numpy reference (unilm modeling_pretrain / modeling_finetune forward).
# ---------------------------------------------------------------------------------
def _loop_relative_position_index(wh: int, ww: int) -> np.ndarray:
  """unilm's relative_position_index written as explicit loops."""
  n = (2 * wh - 1) * (2 * ww - 1) + 3
  num = wh * ww
  index = np.zeros((num + 1, num + 1), np.int64)
  for i in range(num):
    yi, xi = divmod(i, ww)
    for j in range(num):
      yj, xj = divmod(j, ww)
      index[1 + i, 1 + j] = (yi - yj + wh - 1) * (2 * ww - 1) + (xi - xj + ww - 1)
  index[0, 1:] = n - 3
  index[1:, 0] = n - 2
  index[0, 0] = n - 1
  return index


_erf = np.vectorize(math.erf)


def _np_gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _np_layer_norm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _np_softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _np_patch_embed(images, kernel, bias, p):
  """Conv2d(kernel=stride=p) as an explicit loop; kernel HWIO (p, p, 3, D)."""
  b, h, w, _ = images.shape
  gh, gw = h // p, w // p
  out = np.zeros((b, gh * gw, kernel.shape[-1]))
  for bi in range(b):
    for gy in range(gh):
      for gx in range(gw):
        acc = bias.copy()
        for ky in range(p):
          for kx in range(p):
            acc = acc + images[bi, gy * p + ky, gx * p + kx, :] @ kernel[ky, kx]
        out[bi, gy * gw + gx] = acc  # torch flatten(2): row-major over the grid.
  return out


def _np_rel_bias(table, grid):
  index = _loop_relative_position_index(*grid)
  n = index.shape[0]
  return table[index.reshape(-1)].reshape(n, n, -1).transpose(2, 0, 1)


def _np_attention(x, p, heads, bias):
  """unilm Attention.forward for one sample x (N+1, D); bias (heads, N+1, N+1)."""
  n, d = x.shape
  hd = d // heads
  qkv = x @ p["qkv"]["kernel"] + np.concatenate([p["q_bias"], np.zeros(d), p["v_bias"]])
  # torch: reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).
  qkv = qkv.reshape(n, 3, heads, hd).transpose(1, 2, 0, 3)
  q, k, v = qkv[0] * hd**-0.5, qkv[1], qkv[2]
  attn = _np_softmax(q @ k.transpose(0, 2, 1) + bias)
  out = (attn @ v).transpose(1, 0, 2).reshape(n, d)
  return out @ p["proj"]["kernel"] + p["proj"]["bias"]


def _np_block(x, bp, heads, bias):
  """unilm Block.forward on x (B, N+1, D); bias (heads, N+1, N+1) (shared + per-block)."""
  b = x.shape[0]
  if "relative_position_bias_table" in bp["attn"]:
    grid = int(round(((bp["attn"]["relative_position_bias_table"].shape[0] - 3) ** 0.5 + 1) / 2))
    bias = bias + _np_rel_bias(bp["attn"]["relative_position_bias_table"], (grid, grid))
  h = _np_layer_norm(x, bp["norm1"])
  y = np.stack([_np_attention(h[s], bp["attn"], heads, bias) for s in range(b)])
  if "gamma_1" in bp:
    y = y * bp["gamma_1"]
  x = x + y
  h = _np_layer_norm(x, bp["norm2"])
  y = _np_gelu(h @ bp["mlp"]["fc1"]["kernel"] + bp["mlp"]["fc1"]["bias"])
  y = y @ bp["mlp"]["fc2"]["kernel"] + bp["mlp"]["fc2"]["bias"]
  if "gamma_2" in bp:
    y = y * bp["gamma_2"]
  return x + y


def _np_encode(params, images, mask, heads, return_layers=False):
  """Blocks output (B, N+1, D) before the final norm (and each block's, with
  `return_layers`), the params as float64, and the shared rel-pos bias (or zeros)."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  images = np.asarray(images, np.float64)
  pe = params["patch_embed"]
  x = _np_patch_embed(images, pe["kernel"], pe["bias"], pe["kernel"].shape[0])
  b, num, d = x.shape
  grid = (images.shape[1] // pe["kernel"].shape[0], images.shape[2] // pe["kernel"].shape[1])
  if mask is not None:
    w = np.asarray(mask, np.float64)[:, :, None]
    x = x * (1 - w) + params["mask_token"] * w
  cls = np.broadcast_to(params["cls_token"], (b, 1, d))
  x = np.concatenate([cls, x], axis=1)
  if "pos_embed" in params:
    x = x + params["pos_embed"]
  shared = np.zeros((heads, num + 1, num + 1))
  if "rel_pos_bias" in params:
    shared = _np_rel_bias(params["rel_pos_bias"]["relative_position_bias_table"], grid)
  depth = sum(1 for k in params if k.startswith("blocks_"))
  layers = []
  for i in range(depth):
    x = _np_block(x, params[f"blocks_{i}"], heads, shared)
    layers.append(x)
  if return_layers:
    return x, params, layers, shared
  return x, params


def _np_mim_logits(params, images, mask, positions, heads):
  x, params = _np_encode(params, images, mask, heads)
  x = _np_layer_norm(x, params["norm"])[:, 1:]
  x = np.stack([x[s, positions[s]] for s in range(x.shape[0])])
  return x @ params["lm_head"]["kernel"] + params["lm_head"]["bias"]


def _np_class_logits(params, images, heads, mean_pooling):
  x, params = _np_encode(params, images, None, heads)
  if mean_pooling:
    feat = _np_layer_norm(x[:, 1:].mean(1), params["fc_norm"])
  else:
    feat = _np_layer_norm(x, params["norm"])[:, 0]
  return feat @ params["head"]["kernel"] + params["head"]["bias"]


# ---------------------------------------------------------------------------------
# 1. Parameter counts and names (unilm state-dict keys).
# ---------------------------------------------------------------------------------
def _unilm_state_dict_shapes(d, depth, heads, *, mim, num_classes=0):
  """unilm parameter shapes (torch layout) at 224 / patch 16, index buffers excluded."""
  table = ((2 * 14 - 1) ** 2 + 3, heads)  # 14x14 grid: 732 rows.
  sd = {
    "cls_token": (1, 1, d),
    "patch_embed.proj.weight": (d, 3, 16, 16),
    "patch_embed.proj.bias": (d,),
  }
  if mim:
    sd["mask_token"] = (1, 1, d)
    sd["rel_pos_bias.relative_position_bias_table"] = table
  for i in range(depth):
    pre = f"blocks.{i}."
    sd.update(
      {
        pre + "gamma_1": (d,),
        pre + "gamma_2": (d,),
        pre + "norm1.weight": (d,),
        pre + "norm1.bias": (d,),
        pre + "attn.q_bias": (d,),
        pre + "attn.v_bias": (d,),
        pre + "attn.qkv.weight": (3 * d, d),
        pre + "attn.proj.weight": (d, d),
        pre + "attn.proj.bias": (d,),
        pre + "norm2.weight": (d,),
        pre + "norm2.bias": (d,),
        pre + "mlp.fc1.weight": (4 * d, d),
        pre + "mlp.fc1.bias": (4 * d,),
        pre + "mlp.fc2.weight": (d, 4 * d),
        pre + "mlp.fc2.bias": (d,),
      }
    )
    if not mim:
      sd[pre + "attn.relative_position_bias_table"] = table
  if mim:
    sd.update(
      {"norm.weight": (d,), "norm.bias": (d,), "lm_head.weight": (8192, d), "lm_head.bias": (8192,)}
    )
  else:
    sd.update(
      {
        "fc_norm.weight": (d,),
        "fc_norm.bias": (d,),
        "head.weight": (num_classes, d),
        "head.bias": (num_classes,),
      }
    )
  return sd


def _to_flax(sd):
  """torch key/shape -> Flax path/shape (Linear transposed, conv OIHW -> HWIO, LN scale)."""
  out = {}
  for key, shape in sd.items():
    if key.startswith("patch_embed.proj."):
      key = key.replace("patch_embed.proj.", "patch_embed.")
    if key.startswith("blocks."):
      _, i, rest = key.split(".", 2)
      key = f"blocks_{i}.{rest}"
    path = key.replace(".", "/")
    if path.endswith("/weight"):
      if len(shape) == 4:
        path, shape = path[: -len("weight")] + "kernel", tuple(shape[i] for i in (2, 3, 1, 0))
      elif len(shape) == 2:
        path, shape = path[: -len("weight")] + "kernel", shape[::-1]
      else:
        path = path[: -len("weight")] + "scale"
    out[path] = tuple(shape)
  return out


@pytest.mark.parametrize(
  "make,expected,unilm",
  [
    pytest.param(
      lambda: vit.mim_model("base"),
      91_965_776,
      dict(d=768, depth=12, heads=12, mim=True),
      id="base_mim",
    ),
    pytest.param(
      lambda: vit.mim_model("large", init_values=1e-5),
      311_534_016,
      dict(d=1024, depth=24, heads=16, mim=True),
      id="large_mim",
    ),
    pytest.param(
      lambda: vit.classifier_model("base", 1000),
      86_530_984,
      dict(d=768, depth=12, heads=12, mim=False, num_classes=1000),
      id="base_cls1k",
    ),
  ],
)
def test_param_count_and_names_match_unilm(make, expected, unilm):
  model = make()
  assert vit.param_count(model) == expected
  sd = _unilm_state_dict_shapes(**unilm)
  assert sum(int(np.prod(s)) for s in sd.values()) == expected  # The spec itself.
  flat = _flat(vit.abstract_params(model))
  assert {k: tuple(v.shape) for k, v in flat.items()} == _to_flax(sd)
  assert all(v.dtype == jnp.float32 for v in flat.values())


def test_base_mim_param_tree_spot_checks():
  flat = {k: v.shape for k, v in _flat(vit.abstract_params(vit.mim_model("base"))).items()}
  assert flat["rel_pos_bias/relative_position_bias_table"] == (732, 12)
  assert flat["blocks_0/attn/qkv/kernel"] == (768, 2304)
  assert flat["blocks_0/attn/q_bias"] == (768,)
  assert flat["blocks_0/attn/v_bias"] == (768,)
  # No k bias. (One would not show in any output: q.b_k is constant along the softmax
  # axis, so only the parameter tree can tell.)
  assert "blocks_0/attn/qkv/bias" not in flat
  assert not any("k_bias" in k for k in flat)
  assert flat["lm_head/kernel"] == (768, 8192)
  assert flat["patch_embed/kernel"] == (16, 16, 3, 768)
  assert flat["mask_token"] == (1, 1, 768)
  assert flat["blocks_11/gamma_2"] == (768,)
  assert "blocks_12/gamma_1" not in flat
  assert not any(k.endswith("attn/relative_position_bias_table") for k in flat)
  assert "pos_embed" not in flat


def test_classifier_param_tree():
  flat = {
    k: v.shape for k, v in _flat(vit.abstract_params(vit.classifier_model("base", 1000))).items()
  }
  for i in range(12):
    assert flat[f"blocks_{i}/attn/relative_position_bias_table"] == (732, 12)
  assert flat["fc_norm/scale"] == (768,)
  assert flat["head/kernel"] == (768, 1000)
  assert flat["head/bias"] == (1000,)
  for absent in (
    "mask_token",
    "norm/scale",
    "norm/bias",
    "lm_head/kernel",
    "rel_pos_bias/relative_position_bias_table",
    "pos_embed",
  ):
    assert absent not in flat
  # use_mean_pooling=False: final `norm`, no `fc_norm`.
  flat = _flat(vit.abstract_params(vit.classifier_model("base", 1000, use_mean_pooling=False)))
  assert "norm/scale" in flat and "fc_norm/scale" not in flat


def test_no_layer_scale_params_when_init_values_zero():
  flat = _flat(vit.abstract_params(vit.mim_model("test", init_values=0.0, **TINY)))
  assert not any("gamma" in k for k in flat)


# ---------------------------------------------------------------------------------
# 2. Relative position index.
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(3, 5), (5, 3), (4, 4), (14, 14)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_relative_position_index_matches_unilm_loops(grid):
  wh, ww = grid
  got = vit.relative_position_index(grid)
  np.testing.assert_array_equal(got, _loop_relative_position_index(wh, ww))
  n = (2 * wh - 1) * (2 * ww - 1) + 3
  assert vit.num_relative_distance(grid) == n
  assert got.shape == (wh * ww + 1,) * 2
  assert got[0, 0] == n - 1
  assert (got[0, 1:] == n - 3).all() and (got[1:, 0] == n - 2).all()
  patch = got[1:, 1:]
  assert patch.min() == 0 and patch.max() == n - 4
  # A function of (dy, dx) only, injective in (dy, dx).
  seen = {}
  for i in range(wh * ww):
    for j in range(wh * ww):
      delta = (i // ww - j // ww, i % ww - j % ww)
      assert seen.setdefault(delta, patch[i, j]) == patch[i, j]
  assert len(set(seen.values())) == len(seen) == (2 * wh - 1) * (2 * ww - 1)


def test_gather_relative_bias_layout():
  grid = (3, 5)
  table = np.random.default_rng(0).standard_normal((vit.num_relative_distance(grid), 4))
  got = np.asarray(vit.gather_relative_bias(jnp.asarray(table, jnp.float32), grid))
  np.testing.assert_allclose(got, _np_rel_bias(table, grid), rtol=1e-6)


# ---------------------------------------------------------------------------------
# 3. Forward pass vs the numpy reference.
# ---------------------------------------------------------------------------------
MIM_CASES = {
  # unilm pretraining default: shared rel-pos, no abs pos, LayerScale.
  "shared_rel_pos": dict(),
  "per_block_rel_pos_abs_pos": dict(
    use_shared_rel_pos_bias=False, use_rel_pos_bias=True, use_abs_pos_emb=True
  ),
  "no_layer_scale": dict(init_values=0.0),
}


@pytest.mark.parametrize("case", sorted(MIM_CASES))
def test_mim_forward_matches_numpy_reference(case):
  overrides = MIM_CASES[case]
  model = vit.mim_model("test", vocab_size=VOCAB, **TINY, **overrides)
  params = _random_params(model)
  flat = _flat(params)
  # The reference picks components by key, so pin which keys exist.
  per_block = case == "per_block_rel_pos_abs_pos"
  assert ("rel_pos_bias/relative_position_bias_table" in flat) == (not per_block)
  assert ("blocks_1/attn/relative_position_bias_table" in flat) == per_block
  assert ("pos_embed" in flat) == per_block
  assert ("blocks_1/gamma_2" in flat) == (case != "no_layer_scale")
  images = _images()
  mask, positions = _mask_and_positions()

  def forward(p):
    return (
      model.apply({"params": p}, images, mask, positions, method=model.mim_logits),
      model.apply({"params": p}, images, mask, positions),
    )

  got, call = _run(forward, params)
  assert got.shape == (2, positions.shape[1], VOCAB) and got.dtype == jnp.float32
  want = _np_mim_logits(params, images, mask, positions, heads=2)
  assert np.abs(want).max() > 0.5  # Non-trivial logits.
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(call), np.asarray(got), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_classifier_forward_matches_numpy_reference(mean_pooling):
  model = vit.classifier_model("test", NUM_CLASSES, use_mean_pooling=mean_pooling, **TINY)
  params = _random_params(model, seed=3)
  flat = _flat(params)
  assert "blocks_0/attn/relative_position_bias_table" in flat
  assert ("fc_norm/scale" in flat) == mean_pooling
  assert ("norm/scale" in flat) == (not mean_pooling)
  images = _images(seed=4)

  def forward(p):
    return (
      model.apply({"params": p}, images),
      model.apply({"params": p}, images, method=model.classify),
    )

  got, via_method = _run(forward, params)
  assert got.shape == (2, NUM_CLASSES) and got.dtype == jnp.float32
  want = _np_class_logits(params, images, heads=2, mean_pooling=mean_pooling)
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(via_method), np.asarray(got), rtol=1e-5, atol=1e-5)


def test_encode_return_layers_are_raw_block_outputs():
  model = vit.mim_model("test", vocab_size=VOCAB, **TINY)
  params = _random_params(model, seed=5)
  images = _images(seed=6)
  final, layers = _apply(model, params, images, method=model.encode, return_layers=True)
  assert len(layers) == 2
  np.testing.assert_array_equal(np.asarray(layers[-1]), np.asarray(final))
  want, _ = _np_encode(params, images, None, heads=2)
  np.testing.assert_allclose(np.asarray(final), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------
# 4. Mask token semantics.
# ---------------------------------------------------------------------------------
def _patch_slice(index: int):
  gy, gx = divmod(index, GRID)
  return slice(gy * PATCH, (gy + 1) * PATCH), slice(gx * PATCH, (gx + 1) * PATCH)


def test_mask_token_semantics():
  """Masked patches' pixels are ignored, visible ones are not; mask_token is used."""
  model = vit.mim_model("test", vocab_size=VOCAB, **TINY)
  params = _random_params(model, seed=7)
  mask, positions = _mask_and_positions()
  images = _images(seed=8)
  logits = _compile(
    lambda p, x, m: model.apply({"params": p}, x, m, positions, method=model.mim_logits),
    params,
    images,
    mask,
  )

  def fwd(x):
    return logits(params, x, mask)

  base = np.asarray(fwd(images))

  # Sample 0 masks patch 5 (grid (1, 1)); sample 1 masks patch 2 (grid (0, 2)).
  changed = images.copy()
  rows, cols = _patch_slice(5)
  changed[0, rows, cols] += 3.0
  rows, cols = _patch_slice(2)
  changed[1, rows, cols] = -changed[1, rows, cols]
  np.testing.assert_array_equal(np.asarray(fwd(changed)), base)

  # Sample 0 keeps patch 0 visible: its pixels change every masked prediction.
  changed = images.copy()
  rows, cols = _patch_slice(0)
  changed[0, rows, cols] += 3.0
  out = np.asarray(fwd(changed))
  assert np.abs(out[0] - base[0]).min() > 0  # Every logit of sample 0 moves.
  assert np.abs(out[0] - base[0]).max() > 1e-2
  np.testing.assert_array_equal(out[1], base[1])  # Other samples are independent.

  # Masked positions read mask_token; with an all-False mask it is unused.
  other = dict(params)
  # Not a constant shift: every read of the residual stream goes through a LayerNorm.
  other["mask_token"] = params["mask_token"] + jnp.asarray(
    np.random.default_rng(0).standard_normal(params["mask_token"].shape), jnp.float32
  )
  assert np.abs(np.asarray(logits(other, images, mask)) - base).max() > 1e-2
  none = np.zeros_like(mask)
  np.testing.assert_array_equal(
    np.asarray(logits(other, images, none)), np.asarray(logits(params, images, none))
  )


# ---------------------------------------------------------------------------------
# 5. Initialisation (unilm `_init_weights`, `fix_init_weight`).
# ---------------------------------------------------------------------------------
def _init_params(model, image_size):
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  key = _fast_key(0)
  return _flat(_run(lambda k, x: model.init(k, x)["params"], key, images))


def _check_trunc(values, std, tol=0.05):
  """`values` look like N(0, std) truncated to ±1 std (unilm pretraining's trunc_normal_)."""
  values = np.asarray(values).ravel()
  assert np.abs(values).max() <= std * (1 + 1e-6)
  assert np.abs(values).max() > 0.9 * std  # Not truncated tighter.
  want = std * TRUNC1_STD
  assert abs(values.std() / want - 1) < tol, (values.std(), want)
  assert abs(values.mean()) < 0.1 * want


def test_mim_init_matches_unilm():
  depth = 3
  init_values = 0.3
  model = vit.mim_model(
    "test",
    embed_dim=64,
    depth=depth,
    num_heads=2,
    vocab_size=512,
    use_abs_pos_emb=True,
    init_values=init_values,
    **TINY,
  )
  flat = _init_params(model, IMAGE)
  std = vit.INIT_STD
  assert std == 0.02
  for name in ["patch_embed/kernel", "lm_head/kernel"] + [
    f"blocks_{i}/{k}" for i in range(depth) for k in ("attn/qkv/kernel", "mlp/fc1/kernel")
  ]:
    _check_trunc(flat[name], std)
  # fix_init_weight: block l (1-based) attn.proj / mlp.fc2 weights / sqrt(2 l).
  for i in range(depth):
    for k in ("attn/proj/kernel", "mlp/fc2/kernel"):
      _check_trunc(flat[f"blocks_{i}/{k}"], std / math.sqrt(2 * (i + 1)))
  _check_trunc(flat["pos_embed"], std, tol=0.08)  # 17 * 64 samples.
  for name in ("cls_token", "mask_token"):
    assert np.abs(flat[name]).max() <= std * (1 + 1e-6)
    assert np.abs(flat[name]).max() > 0.5 * std
  # Distinct leaves get distinct draws.
  assert not np.allclose(flat["blocks_0/attn/qkv/kernel"], flat["blocks_1/attn/qkv/kernel"])
  assert not np.allclose(flat["cls_token"], flat["mask_token"])

  zeros = [
    "patch_embed/bias",
    "lm_head/bias",
    "norm/bias",
    "rel_pos_bias/relative_position_bias_table",
  ]
  ones = ["norm/scale"]
  for i in range(depth):
    pre = f"blocks_{i}/"
    zeros += [
      pre + k
      for k in (
        "attn/q_bias",
        "attn/v_bias",
        "attn/proj/bias",
        "mlp/fc1/bias",
        "mlp/fc2/bias",
        "norm1/bias",
        "norm2/bias",
      )
    ]
    ones += [pre + "norm1/scale", pre + "norm2/scale"]
    for g in ("gamma_1", "gamma_2"):
      np.testing.assert_array_equal(flat[pre + g], np.full((64,), init_values, np.float32))
  for name in zeros:
    np.testing.assert_array_equal(flat[name], 0.0, err_msg=name)
  for name in ones:
    np.testing.assert_array_equal(flat[name], 1.0, err_msg=name)
  covered = (
    set(zeros)
    | set(ones)
    | {"patch_embed/kernel", "lm_head/kernel", "pos_embed", "cls_token", "mask_token"}
    | {
      f"blocks_{i}/{k}"
      for i in range(depth)
      for k in (
        "attn/qkv/kernel",
        "mlp/fc1/kernel",
        "attn/proj/kernel",
        "mlp/fc2/kernel",
        "gamma_1",
        "gamma_2",
      )
    }
  )
  assert covered == set(flat)


@pytest.mark.parametrize("truncation", [1.0, 100.0])
def test_classifier_init(truncation):
  init_scale = 0.001
  model = vit.classifier_model(
    "test",
    128,
    embed_dim=64,
    depth=1,
    num_heads=2,
    image_size=16,
    patch_size=8,
    init_truncation=truncation,
    init_scale=init_scale,
  )
  flat = _init_params(model, 16)
  head = np.asarray(flat["head/kernel"])
  assert head.shape == (64, 128)
  if truncation == 1.0:
    _check_trunc(head, 0.02 * init_scale)
  else:  # timm's absolute ±2 bounds: effectively untruncated N(0, .02) * init_scale.
    want = 0.02 * init_scale
    assert abs(head.std() / want - 1) < 0.05
    assert np.abs(head).max() > 2.5 * want  # ~1% of the 8192 draws lie beyond 2.5 sigma.
    assert np.abs(head).max() <= 100 * want
    qkv = np.asarray(flat["blocks_0/attn/qkv/kernel"])
    assert abs(qkv.std() / 0.02 - 1) < 0.05 and np.abs(qkv).max() > 0.05
  np.testing.assert_array_equal(flat["head/bias"], 0.0)
  np.testing.assert_array_equal(flat["blocks_0/attn/relative_position_bias_table"], 0.0)
  np.testing.assert_array_equal(flat["fc_norm/scale"], 1.0)
  np.testing.assert_array_equal(flat["fc_norm/bias"], 0.0)
  np.testing.assert_array_equal(flat["blocks_0/gamma_1"], np.float32(0.1))


def test_trunc_normal_init_bounds_and_scale():
  x = np.asarray(vit.trunc_normal_init(std=0.5, truncation=2.0, scale=0.1)(_fast_key(1), (20000,)))
  assert np.abs(x).max() <= 0.1 * 1.0 * (1 + 1e-6)
  assert np.abs(x).max() > 0.095
  # Std of a unit normal truncated to ±2 is 0.8796.
  assert abs(x.std() / (0.05 * 0.8796) - 1) < 0.03


# ---------------------------------------------------------------------------------
# 6. Stochastic depth.
# ---------------------------------------------------------------------------------
def test_drop_path_rates_follow_linspace():
  model = vit.mim_model("test", depth=4, drop_path_rate=0.3, vocab_size=VOCAB, **TINY)
  bound = model.bind({"params": _random_params(model)})
  rates = [bound.blocks[i].drop_path_rate for i in range(4)]
  np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3], atol=1e-12)
  assert [bound.blocks[i].layer for i in range(4)] == [1, 2, 3, 4]


def test_drop_path_function():
  x = jnp.ones((64, 3, 4))

  def apply(rate, deterministic=False, key=None):
    key = _fast_key(2) if key is None else key
    return np.asarray(
      vit.drop_path(rate, "drop_path").apply(
        {}, x, deterministic=deterministic, rngs={"dropout": key}
      )
    )

  y = apply(0.5)
  per_sample = y.reshape(64, -1)
  # Whole samples are dropped (0) or kept and rescaled by 1 / keep.
  assert set(np.unique(per_sample)) <= {0.0, 2.0}
  assert (per_sample == per_sample[:, :1]).all()
  assert 5 < (per_sample[:, 0] == 0).sum() < 59
  np.testing.assert_array_equal(apply(0.0), x)
  np.testing.assert_array_equal(apply(0.5, deterministic=True), x)
  # The keep rate over many draws is 1 - rate (binomial, 6 sigma), and E[y] = x.
  kept = np.mean(
    [apply(0.3, key=jax.random.PRNGKey(k)).reshape(64, -1)[:, 0] > 0 for k in range(40)]
  )
  assert abs(kept - 0.7) < 6 * np.sqrt(0.7 * 0.3 / (64 * 40))


def test_drop_path_train_is_stochastic_eval_deterministic():
  model = vit.mim_model("test", depth=3, drop_path_rate=0.5, vocab_size=VOCAB, **TINY)
  params = _random_params(model, seed=11)
  images = _images(seed=12, batch=4)
  mask = np.zeros((4, NUM_PATCHES), bool)
  mask[:, ::3] = True
  positions = np.tile(np.arange(0, NUM_PATCHES, 3), (4, 1))

  def forward(key):
    def run(train):
      return model.apply(
        {"params": params}, images, mask, positions, train=train, rngs={"dropout": key}
      )

    return run(True), run(False)

  forward = _compile(forward, _fast_key(0))
  train_a, eval_a = map(np.asarray, forward(_fast_key(0)))
  train_b, eval_b = map(np.asarray, forward(_fast_key(1)))
  np.testing.assert_array_equal(eval_a, eval_b)  # Eval ignores the dropout rng.
  np.testing.assert_array_equal(np.asarray(forward(_fast_key(0))[0]), train_a)
  assert np.abs(train_a - train_b).max() > 1e-3
  assert np.abs(train_a - eval_a).max() > 1e-3


def test_zero_drop_path_train_equals_eval():
  model = vit.mim_model("test", drop_path_rate=0.0, vocab_size=VOCAB, **TINY)
  params = _random_params(model, seed=13)
  images = _images(seed=14)
  mask, positions = _mask_and_positions()

  def forward(p):
    def run(train):
      return model.apply(
        {"params": p}, images, mask, positions, train=train, rngs={"dropout": _fast_key(0)}
      )

    return run(True), run(False)

  train, evaluated = _run(forward, params)
  np.testing.assert_allclose(np.asarray(train), np.asarray(evaluated), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------
# 7. bfloat16 compute.
# ---------------------------------------------------------------------------------
def test_bfloat16_compute_close_to_float32():
  f32 = vit.mim_model("test", vocab_size=VOCAB, **TINY)
  bf16 = vit.mim_model("test", vocab_size=VOCAB, dtype=jnp.bfloat16, **TINY)
  class_bf16 = vit.classifier_model("test", NUM_CLASSES, dtype=jnp.bfloat16, **TINY)
  for model in (bf16, class_bf16):
    for leaf in jax.tree.leaves(vit.abstract_params(model)):
      assert leaf.dtype == jnp.float32
  params = _random_params(f32, seed=15)
  class_params = _random_params(class_bf16, seed=17)
  images = _images(seed=16)
  mask, positions = _mask_and_positions()

  def forward(p, cp):
    def logits(m):
      return m.apply({"params": p}, images, mask, positions, method=m.mim_logits)

    return (
      logits(f32),
      logits(bf16),
      bf16.apply({"params": p}, images, mask, method=bf16.encode),
      class_bf16.apply({"params": cp}, images),
    )

  want, got, encoded, class_logits = _run(forward, params, class_params)
  assert got.dtype == jnp.float32 and class_logits.dtype == jnp.float32
  assert encoded.dtype == jnp.bfloat16  # Activations really are bfloat16.
  want, got = np.asarray(want), np.asarray(got)
  err = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert 1e-6 < err < 0.05, err


# ---------------------------------------------------------------------------------
# 8. Rematerialisation.
# ---------------------------------------------------------------------------------
def test_remat_matches_no_remat():
  """Train mode (drop path on, same rng): outputs, loss and every gradient agree."""
  kw = dict(vocab_size=VOCAB, drop_path_rate=0.3, **TINY)
  plain = vit.mim_model("test", **kw)
  remat = vit.mim_model("test", remat=True, **kw)
  params = _random_params(plain, seed=18)
  remat_shapes = jax.tree.map(lambda a: a.shape, vit.abstract_params(remat))
  assert remat_shapes == jax.tree.map(lambda a: a.shape, params)
  images = _images(seed=19)
  mask, positions = _mask_and_positions()
  weights = np.random.default_rng(20).standard_normal((2, positions.shape[1], VOCAB))

  # The dropout key is one under which drop path (rate 0.3 in the last block, batch 2)
  # keeps at least one example in every branch, so every parameter gets a gradient.
  def loss_and_grad(model):
    def loss(p):
      out = model.apply(
        {"params": p},
        images,
        mask,
        positions,
        train=True,
        rngs={"dropout": _fast_key(4)},
        method=model.mim_logits,
      )
      return jnp.sum(out * weights), out

    return jax.value_and_grad(loss, has_aux=True)

  # remat=True really checkpoints each block (primitive `remat2`, or `checkpoint`).
  def num_checkpoints(model):
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, images, mask, positions))
    return len(re.findall(r"= (?:remat2?|checkpoint)\[", str(jaxpr(params))))

  assert num_checkpoints(remat) == 2
  assert num_checkpoints(plain) == 0

  # What the backward pass keeps: with remat, no per-block activation (the MLP hidden
  # layer, the attention probabilities) is saved, only block inputs; without, both are.
  def saved(model):
    def loss(p):
      out = model.apply(
        {"params": p},
        images,
        mask,
        positions,
        train=True,
        rngs={"dropout": _fast_key(3)},
        method=model.mim_logits,
      )
      return jnp.sum(out * weights)

    with contextlib.redirect_stdout(io.StringIO()) as out:
      ad_checkpoint.print_saved_residuals(loss, params)
    return "\n".join(
      line for line in out.getvalue().splitlines() if "from the argument" not in line
    )

  hidden = 4 * vit.VARIANTS["test"][0]
  assert f",{hidden}]" in saved(plain) and "softmax" in saved(plain)
  assert f",{hidden}]" not in saved(remat) and "softmax" not in saved(remat)

  both = _run(lambda p: (loss_and_grad(plain)(p), loss_and_grad(remat)(p)), params)
  ((l0, out0), g0), ((l1, out1), g1) = both
  np.testing.assert_allclose(np.asarray(out1), np.asarray(out0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5, atol=1e-4)
  flat0, flat1 = _flat(g0), _flat(g1)
  assert set(flat0) == set(flat1)
  for path, a in flat0.items():
    assert np.abs(np.asarray(a)).max() > 0, path  # Every parameter gets a gradient.
    np.testing.assert_allclose(
      np.asarray(flat1[path]), np.asarray(a), rtol=1e-4, atol=1e-5, err_msg=path
    )
