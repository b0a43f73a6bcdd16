"""beit_jax.models.segmentation against Hugging Face's `BeitForSemanticSegmentation` (PyTorch,
random weights, random BatchNorm running statistics), converted with
`beit_jax.convert.segmentation`: inference and training-mode forwards, BatchNorm statistics on
an 8-device mesh, the full-size parameter counts, and torch's pooling / resize semantics.

The tiny HF model has 6 blocks and HF `out_indices` [2, 3, 5, 6], which HF reads as blocks
0, 1, 3, 4 (HF index i is `hidden_states[i - 1]`, block i - 2's output); a 4-block model could
not reach its last block in HF's convention. Patch 8 on 64 px gives an 8x8 grid, so the neck's
maps are 32, 16, 8 and 4 wide and the pyramid pools 4 -> 3 and 4 -> 6 do not divide.
"""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from transformers import BeitConfig, BeitForSemanticSegmentation

from beit_jax.convert import segmentation as convert
from beit_jax.models import segmentation as seg
from beit_jax.training import mesh as mesh_lib

TOL = 1e-4
DEPTH = 6
HF_OUT_INDICES = [2, 3, 5, 6]
OUT_INDICES = (0, 1, 3, 4)  # Our 0-based blocks for HF's indices above.
IMAGE = 64
NUM_CLASSES = 5

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(fn, *args):
  """`jax.jit(fn)(*args)` compiled with LLVM optimisation off (this CPU is slow at it)."""
  return jax.jit(fn).lower(*args).compile(compiler_options=_FAST_COMPILE)(*args)


def _flat(tree) -> dict[str, np.ndarray]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def hf_config(**overrides) -> BeitConfig:
  kw = dict(
    hidden_size=32,
    num_hidden_layers=DEPTH,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=IMAGE,
    patch_size=8,
    out_indices=HF_OUT_INDICES,
    use_relative_position_bias=True,
    layer_scale_init_value=0.1,
    layer_norm_eps=1e-6,  # unilm's (HF's default is 1e-12).
    drop_path_rate=0.0,
    pool_scales=[1, 2, 3, 6],
    auxiliary_channels=16,
    num_labels=NUM_CLASSES,
    semantic_loss_ignore_index=255,
  )
  kw.update(overrides)
  return BeitConfig(**kw)


def hf_model(seed: int = 0, **overrides) -> BeitForSemanticSegmentation:
  """The tiny HF model in eval mode, every parameter and BatchNorm running statistic random."""
  torch.manual_seed(seed)
  model = BeitForSemanticSegmentation(hf_config(**overrides))
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(torch.randn_like(p) * 0.05)  # Zero-initialised biases / tables matter too.
      if name.endswith("relative_position_bias_table"):
        p.add_(torch.randn_like(p) * 0.5)
      if "normalization" in name:
        p.mul_(1.0 + 0.3 * torch.randn_like(p))
      if name.endswith(("lambda_1", "lambda_2")):  # ~0.5: each block changes the features.
        p.mul_(5.0 * (1.0 + 0.3 * torch.randn_like(p)))
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(torch.randn_like(b) * 0.3)
      elif name.endswith("running_var"):
        b.copy_(torch.rand_like(b) + 0.5)
  return model.eval()


def hf_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def convert_hf(model: torch.nn.Module, **overrides):
  """(our Segmenter, variables) for an HF model."""
  params, stats, kwargs = convert.to_flax(
    hf_state_dict(model), out_indices=convert.blocks_from_hf_out_indices(HF_OUT_INDICES, DEPTH)
  )
  kwargs.update(drop_path_rate=0.0, **overrides)
  return seg.Segmenter(**kwargs), {"params": params, "batch_stats": stats}


def images(batch: int = 2, seed: int = 1, size: int = IMAGE) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def hf_forward(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """HF (logits, auxiliary logits), NHWC. HF's output has no auxiliary logits: hooked."""
  aux = []
  hook = model.auxiliary_head.register_forward_hook(lambda m, i, o: aux.append(o))
  try:
    with torch.set_grad_enabled(model.training):
      out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  finally:
    hook.remove()
  return (
    out.logits.detach().numpy().transpose(0, 2, 3, 1),
    aux[0].detach().numpy().transpose(0, 2, 3, 1),
  )


def _max_diff(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# -- 1. Inference ---------------------------------------------------------------------------
def test_matches_hf_inference():
  hf = hf_model()
  model, variables = convert_hf(hf)
  x = images()
  ref_logits, ref_aux = hf_forward(hf, x)
  logits, aux = _run(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert logits.shape == (2, IMAGE // 2, IMAGE // 2, NUM_CLASSES) == ref_logits.shape  # Stride 4.
  assert aux.shape == (2, IMAGE // 8, IMAGE // 8, NUM_CLASSES) == ref_aux.shape  # fpn3: stride p.
  assert np.abs(ref_logits).max() > 0.1 and np.abs(ref_aux).max() > 0.1
  assert _max_diff(logits, ref_logits) <= TOL
  assert _max_diff(aux, ref_aux) <= TOL


def test_hf_out_indices_are_blocks_plus_two():
  """Reading HF's indices one block off (block i - 1, the naive '1-based' reading) is far from
  HF: the equality above depends on the translation."""
  hf = hf_model()
  model, variables = convert_hf(hf, out_indices=tuple(i - 1 for i in HF_OUT_INDICES))
  x = images()
  ref_logits, _ = hf_forward(hf, x)
  logits, _ = _run(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert _max_diff(logits, ref_logits) > 100 * TOL
  assert convert.blocks_from_hf_out_indices([3, 5, 7, 11], 12) == (1, 3, 5, 9)
  assert convert.blocks_from_hf_out_indices([0], 12) == (11,)
  with pytest.raises(ValueError, match="patch embeddings"):
    convert.blocks_from_hf_out_indices([1, 2, 3, 4], 12)


# -- 2. Training mode -----------------------------------------------------------------------
def test_train_mode_matches_hf():
  """Batch statistics in the forward and the updated running statistics of every BatchNorm
  (torch updates running_var with the unbiased variance) equal torch's `train()` forward.
  HF has no dropout before its classifiers; ours is off (dropout_rate=0), drop path is 0."""
  hf = hf_model(seed=2)
  model, variables = convert_hf(hf, dropout_rate=0.0)
  x = images(seed=3)
  hf.train()
  ref_logits, ref_aux = hf_forward(hf, x)
  _, ref_stats, _ = convert.to_flax(hf_state_dict(hf), out_indices=OUT_INDICES)

  def step(v, x):
    (logits, aux), updates = model.apply(v, x, train=True, mutable=["batch_stats"])
    return logits, aux, updates["batch_stats"]

  logits, aux, stats = _run(step, variables, x)
  assert _max_diff(logits, ref_logits) <= TOL
  assert _max_diff(aux, ref_aux) <= TOL
  old, new, ref = _flat(variables["batch_stats"]), _flat(stats), _flat(ref_stats)
  assert set(new) == set(ref) and len(new) == 2 * (1 + 12 + 1)  # fpn1, UperNet, FCN BNs.
  for name in new:
    assert _max_diff(new[name], old[name]) > 1e-4, name  # The step did move each statistic.
    np.testing.assert_allclose(new[name], ref[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_train_mode_needs_two_values_per_channel():
  model = seg.Segmenter(**_tiny_kwargs())
  variables = _init(model)
  with pytest.raises(ValueError, match="more than 1 value per channel"):
    model.apply(variables, images(batch=1, size=32), train=True, mutable=["batch_stats"])


# -- 3. BatchNorm on a mesh -----------------------------------------------------------------
def _tiny_kwargs(**overrides):
  kw = dict(
    image_size=32,
    patch_size=8,
    embed_dim=32,
    depth=4,
    num_heads=2,
    out_indices=(0, 1, 2, 3),
    num_classes=NUM_CLASSES,
    channels=16,
    aux_channels=8,
    drop_path_rate=0.0,
    dropout_rate=0.0,
  )
  kw.update(overrides)
  return kw


def _init(model: seg.Segmenter, seed: int = 0):
  x = jnp.zeros((2, model.image_size, model.image_size, 3))
  return _run(lambda x: model.init(jax.random.PRNGKey(seed), x, train=False), x)


def test_batch_stats_on_8_device_mesh_equal_one_device():
  """jit over a batch sharded on 8 devices (one image each): BatchNorm's statistics are the
  global batch's (SyncBN), equal to the one-device run's; a sub-batch's would differ."""
  assert jax.device_count() == 8  # tests/conftest.py sets the fake CPU devices.
  model = seg.Segmenter(**_tiny_kwargs())
  variables = _init(model)
  x = images(batch=8, seed=4, size=32)

  def step(v, x):
    (logits, aux), updates = model.apply(v, x, train=True, mutable=["batch_stats"])
    return logits, aux, updates["batch_stats"]

  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
  batch_sh, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  x_sh = mesh_lib.global_batch({"images": x}, batch_sh)["images"]
  assert len(x_sh.sharding.device_set) == 8 and x_sh.addressable_shards[0].data.shape[0] == 1
  sharded = jax.jit(step, out_shardings=(batch_sh, batch_sh, repl))(
    jax.device_put(variables, repl), x_sh
  )
  one = jax.devices()[0]
  single = _run(step, jax.device_put(variables, one), jax.device_put(x, one))
  assert sharded[0].sharding.spec == batch_sh.spec
  for a, b in zip(sharded[:2], single[:2]):
    assert _max_diff(a, b) <= 1e-5
  sh_stats, one_stats = _flat(sharded[2]), _flat(single[2])
  assert set(sh_stats) == set(one_stats)
  for name in one_stats:
    np.testing.assert_allclose(sh_stats[name], one_stats[name], rtol=1e-5, atol=1e-6, err_msg=name)
  part = _flat(_run(step, variables, x[:2])[2])
  assert max(_max_diff(part[k], one_stats[k]) for k in part) > 1e-3


# -- 4. Parameter counts --------------------------------------------------------------------
@pytest.mark.parametrize(
  "variant, width, depth, heads, hf_out, expected",
  [
    ("base", 768, 12, 12, [3, 5, 7, 11], 163_080_812),
    ("large", 1024, 24, 16, [7, 11, 15, 23], 440_398_636),
  ],
)
def test_param_count_equals_hf(variant, width, depth, heads, hf_out, expected):
  """150 classes at 512 px: ours (`jax.eval_shape`) == HF's built on the meta device, params
  and BatchNorm running statistics both."""
  config = BeitConfig(
    hidden_size=width,
    num_hidden_layers=depth,
    num_attention_heads=heads,
    intermediate_size=4 * width,
    image_size=512,
    use_relative_position_bias=True,
    out_indices=hf_out,
    num_labels=150,
  )
  with torch.device("meta"):
    hf = BeitForSemanticSegmentation(config)
  hf_params = sum(p.numel() for p in hf.parameters())
  hf_stats = sum(
    b.numel() for n, b in hf.named_buffers() if n.endswith(("running_mean", "running_var"))
  )
  model = seg.segmenter(variant, 150, 512)
  assert model.channels == width and len(model.out_indices) == 4
  ours = seg.abstract_variables(model)
  assert seg.param_count(model) == hf_params == expected
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ours["batch_stats"])) == hf_stats


def test_segmenter_defaults():
  base, large = seg.segmenter("base", 150, 512), seg.segmenter("large", 150, 640)
  assert (base.out_indices, base.channels, base.init_values) == ((3, 5, 7, 11), 768, 0.1)
  assert (large.out_indices, large.channels, large.drop_path_rate) == ((7, 11, 15, 23), 1024, 0.2)
  assert large.init_values == 1e-6 and large.image_size == 640
  assert seg.default_out_indices(4) == (0, 1, 2, 3)
  assert seg.default_out_indices(6) == (0, 2, 3, 5)
  with pytest.raises(ValueError, match="pass out_indices"):
    seg.segmenter("test", 5, 32)  # 2 blocks.
  with pytest.raises(ValueError, match="out_indices"):
    seg.abstract_variables(seg.Segmenter(**_tiny_kwargs(out_indices=(0, 1, 2, 4))))


def test_dropout2d_drops_whole_channels():
  """mmseg's `cls_seg` dropout is Dropout2d: a channel is zeroed at every pixel of an example
  or kept (scaled by 1 / (1 - rate)) at all of them."""
  head = seg.FCNHead(NUM_CLASSES, channels=16, dropout_rate=0.5)
  feats = [jnp.asarray(np.random.default_rng(7).standard_normal((2, 4, 4, 32)), jnp.float32)] * 4
  variables = head.init(jax.random.PRNGKey(0), feats, False)
  _, state = head.apply(
    variables,
    feats,
    True,
    rngs={"dropout": jax.random.PRNGKey(1)},
    mutable=["batch_stats", "intermediates"],
    capture_intermediates=True,
  )
  x = np.asarray(state["intermediates"]["convs_0"]["__call__"][0])
  y = np.asarray(state["intermediates"]["dropout"]["__call__"][0])
  keep = (y != 0).any(axis=(1, 2))  # (B, C)
  assert 0.2 < keep.mean() < 0.8
  np.testing.assert_allclose(y, x * keep[:, None, None, :] * 2.0, rtol=1e-6)


# -- 5. torch's pooling and resize ----------------------------------------------------------
@pytest.mark.parametrize("size", [(4, 4), (5, 7), (13, 9), (2, 2), (8, 8)])
@pytest.mark.parametrize("out", [1, 2, 3, 6])
def test_adaptive_avg_pool_matches_torch(size, out):
  x = np.random.default_rng(5).standard_normal((2, *size, 3)).astype(np.float32)
  ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), out)
  ours = seg.adaptive_avg_pool(jnp.asarray(x), out)
  assert ours.shape == (2, out, out, 3)
  assert _max_diff(ours, ref.numpy().transpose(0, 2, 3, 1)) <= 1e-6


def test_adaptive_bins_are_torchs():
  assert seg.adaptive_bins(4, 3) == [(0, 2), (1, 3), (2, 4)]  # Overlapping.
  assert seg.adaptive_bins(2, 6) == [(0, 1), (0, 1), (0, 1), (1, 2), (1, 2), (1, 2)]
  assert seg.adaptive_bins(13, 6) == [(0, 3), (2, 5), (4, 7), (6, 9), (8, 11), (10, 13)]


@pytest.mark.parametrize(
  "size, out",
  [((2, 2), (8, 8)), ((3, 5), (7, 16)), ((6, 6), (4, 4)), ((8, 8), (3, 5)), ((16, 16), (64, 64))],
)
def test_resize_bilinear_matches_torch(size, out):
  """Up and down: torch's `interpolate(mode='bilinear', align_corners=False)` (no antialias;
  `jax.image.resize`'s default antialias differs from it when downsampling)."""
  x = np.random.default_rng(6).standard_normal((2, *size, 3)).astype(np.float32)
  ref = torch.nn.functional.interpolate(
    torch.from_numpy(x.transpose(0, 3, 1, 2)), size=out, mode="bilinear", align_corners=False
  )
  ours = seg.resize_bilinear(jnp.asarray(x), out)
  assert _max_diff(ours, ref.numpy().transpose(0, 2, 3, 1)) <= 1e-6
  logits = seg.resize_logits(jnp.asarray(x[..., :2]), out)
  assert logits.shape == (2, *out, 2) and logits.dtype == jnp.float32
