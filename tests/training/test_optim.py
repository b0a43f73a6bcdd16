"""Schedules equal unilm's `cosine_scheduler`; the weight-decay mask follows its rule."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from beit_jax.training import optim


def unilm_cosine_scheduler(
  base_value, final_value, total_iters, warmup_iters, start_warmup_value=0
):
  """unilm beit/utils.py cosine_scheduler, written out per iteration (numpy)."""
  warmup = np.array([])
  if warmup_iters > 0:
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
  iters = np.arange(total_iters - warmup_iters)
  schedule = np.array(
    [
      final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / (len(iters))))
      for i in iters
    ]
  )
  return np.concatenate((warmup, schedule))


@pytest.mark.parametrize("total,warmup", [(100, 10), (57, 0), (40, 39), (30, 1)])
def test_warmup_cosine_equals_unilm(total, warmup):
  expected = unilm_cosine_scheduler(1.5e-3, 1e-5, total, warmup)
  fn = optim.warmup_cosine(1.5e-3, 1e-5, total, warmup)
  got = np.array([float(fn(i)) for i in range(total)])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
  assert float(fn(total + 50)) == pytest.approx(1e-5, rel=1e-5)  # Clamped after the end.


def test_cosine_ramp_endpoints_and_monotone():
  fn = optim.cosine_ramp(1.0, 1 / 16, 150)
  values = np.array([float(fn(i)) for i in range(200)])
  assert values[0] == pytest.approx(1.0)
  assert values[75] == pytest.approx((1 + 1 / 16) / 2, rel=1e-5)
  assert np.all(values[150:] == pytest.approx(1 / 16))
  assert np.all(np.diff(values[:151]) < 0)
  up = optim.cosine_ramp(0.0, 6.6, 5000)
  assert float(up(0)) == 0.0 and float(up(5000)) == pytest.approx(6.6)


def test_weight_decay_mask_rule():
  params = {
    "blocks": {
      "attn": {"qkv": {"kernel": jnp.ones((4, 12))}, "q_bias": jnp.ones(4)},
      "norm1": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
      "conv": {"w": jnp.ones((3, 3, 2, 4)), "b": jnp.ones(4)},
    },
    "pos_embed": jnp.ones((1, 5, 4)),
    "mask_token": jnp.ones((1, 1, 4)),
  }
  mask = optim.weight_decay_mask(params, skip=("pos_embed",))
  assert mask["blocks"]["attn"]["qkv"]["kernel"] is True
  assert mask["blocks"]["conv"]["w"] is True
  assert mask["mask_token"] is True  # unilm decays mask_token in pretraining.
  for leaf in (
    mask["blocks"]["attn"]["q_bias"],
    mask["blocks"]["norm1"]["scale"],
    mask["blocks"]["norm1"]["bias"],
    mask["blocks"]["conv"]["b"],
    mask["pos_embed"],
  ):
    assert leaf is False


def unilm_layer_id(var_name, num_max_layer):
  """unilm optim_factory.get_num_layer_for_vit, on torch-style names."""
  if var_name in ("cls_token", "mask_token", "pos_embed"):
    return 0
  elif var_name.startswith("patch_embed"):
    return 0
  elif var_name.startswith("rel_pos_bias"):
    return num_max_layer - 1
  elif var_name.startswith("blocks"):
    return int(var_name.split(".")[1]) + 1
  return num_max_layer - 1


def test_layer_ids_and_scales_match_unilm():
  from beit_jax.models import vit

  depth = 4
  model = vit.BEiT(
    image_size=16,
    patch_size=8,
    embed_dim=16,
    depth=depth,
    num_heads=2,
    use_abs_pos_emb=True,
    vocab_size=10,
    num_classes=3,
  )
  params = vit.abstract_params(model)
  scales = optim.layerwise_lr_scales(params, 0.65, depth)
  flat = jax_flatten(scales)
  assert len(flat) > 30
  for path, scale in flat.items():
    torch_name = path.replace("blocks_", "blocks.").replace("/", ".")
    lid = unilm_layer_id(torch_name, depth + 2)
    assert lid == optim.vit_layer_id(path, depth), path
    assert scale == pytest.approx(0.65 ** (depth + 1 - lid)), path
  assert flat["blocks_0/attn/qkv/kernel"] == pytest.approx(0.65**4)
  assert flat["head/kernel"] == 1.0 and flat["rel_pos_bias/relative_position_bias_table"] == 1.0


def jax_flatten(tree):
  import flax

  return flax.traverse_util.flatten_dict(tree, sep="/")


def test_lr_scales_scale_the_whole_adamw_step():
  from beit_jax import config_lib

  params = {"blocks_0": {"w": jnp.ones((3, 3))}, "head": {"kernel": jnp.full((3, 2), 2.0)}}
  grads = {"blocks_0": {"w": jnp.full((3, 3), 0.5)}, "head": {"kernel": jnp.full((3, 2), -1.0)}}
  cfg = config_lib.adamw_config(lr=0.1, weight_decay=0.05)
  plain = optim.make_optimizer(cfg, lambda s: 0.1)
  scales = {"blocks_0": {"w": 0.25}, "head": {"kernel": 1.0}}
  decayed = optim.make_optimizer(cfg, lambda s: 0.1, lr_scales=scales)
  u_plain, _ = plain.update(grads, plain.init(params), params)
  u_dec, _ = decayed.update(grads, decayed.init(params), params)
  np.testing.assert_allclose(u_dec["blocks_0"]["w"], 0.25 * u_plain["blocks_0"]["w"], rtol=1e-6)
  np.testing.assert_allclose(u_dec["head"]["kernel"], u_plain["head"]["kernel"], rtol=1e-6)
  # Step includes the decoupled weight decay: -lr * (adam + wd * p), adam = sign-ish 1.
  np.testing.assert_allclose(u_plain["blocks_0"]["w"], -0.1 * (1.0 + 0.05), rtol=1e-4)
