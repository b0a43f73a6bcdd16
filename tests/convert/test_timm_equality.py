"""timm's `Beit` (the real PyTorch package, random weights) -> `unilm_to_flax` -> our
`vit.BEiT`: equal pooled features and logits in the fine-tuning, shared rel-pos, Large
and vanilla (abs-pos, no LayerScale) layouts; `flax_to_unilm` loads back into timm."""

import jax
import numpy as np
import pytest
import torch
from timm.models import beit as timm_beit

from beit_jax.convert import beit as convert
from beit_jax.models import vit

TOL = 1e-4
BATCH = 2

# Reduced depth (2 blocks) and images; Base / Large widths and head counts kept.
LAYOUTS = {
  "base_rel_pos_mean_pool": dict(
    img_size=64,
    patch_size=16,
    embed_dim=768,
    num_heads=12,
    num_classes=10,
    global_pool="avg",
    use_abs_pos_emb=False,
    use_rel_pos_bias=True,
    init_values=0.1,
  ),
  "base_shared_rel_pos_cls_pool": dict(
    img_size=32,
    patch_size=8,
    embed_dim=768,
    num_heads=12,
    num_classes=7,
    global_pool="token",
    use_abs_pos_emb=False,
    use_shared_rel_pos_bias=True,
    init_values=0.1,
  ),
  "large_rel_pos": dict(
    img_size=48,
    patch_size=16,
    embed_dim=1024,
    num_heads=16,
    num_classes=5,
    global_pool="avg",
    use_abs_pos_emb=False,
    use_rel_pos_bias=True,
    init_values=1e-5,
  ),
  "vanilla_abs_pos": dict(  # Like beit_base_patch16_224_pt1k_800ep: no table, no gammas.
    img_size=64,
    patch_size=16,
    embed_dim=768,
    num_heads=12,
    num_classes=3,
    global_pool="avg",
    use_abs_pos_emb=True,
    init_values=None,
  ),
}


def timm_model(layout: str, seed: int = 0) -> timm_beit.Beit:
  """A 2-block timm `Beit` in eval mode with every parameter randomly perturbed."""
  torch.manual_seed(seed)
  return perturbed(timm_beit.Beit(depth=2, mlp_ratio=4.0, drop_path_rate=0.0, **LAYOUTS[layout]))


def perturbed(model: timm_beit.Beit) -> timm_beit.Beit:
  """`model` in eval mode with every parameter randomly perturbed."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(torch.randn_like(p) * 0.02)  # Zero-initialised biases / tables matter too.
      if name.endswith("relative_position_bias_table"):
        p.add_(torch.randn_like(p) * 0.5)  # Trained tables are O(1): make them count.
      # Per-channel gammas and LayerNorm parameters. Large's 1e-5 gammas end up ~0.02,
      # so its blocks are not hidden below the tolerance.
      if name.endswith(("gamma_1", "gamma_2")) or ("norm" in name and p.ndim == 1):
        p.mul_(1.0 + 0.3 * torch.randn_like(p))
  return model.eval()


def images(layout: str, seed: int = 1) -> np.ndarray:
  size = LAYOUTS[layout]["img_size"]
  return np.random.default_rng(seed).normal(size=(BATCH, size, size, 3)).astype(np.float32)


def timm_outputs(model: timm_beit.Beit, x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(pooled features, logits) of timm on the NCHW version of `x_nhwc`."""
  x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    logits = model(x)
  return pooled.numpy(), logits.numpy()


def flax_outputs(params, kwargs, x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(pooled features, logits) of our `BEiT` built from converted params."""
  model = vit.BEiT(**kwargs)
  variables = {"params": params}
  pooled = model.apply(variables, x_nhwc, method=lambda m, x: m.pooled_features(m.encode(x)))
  logits = model.apply(variables, x_nhwc)
  return np.asarray(pooled), np.asarray(logits)


def max_diff(a, b) -> float:
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def case(request):
  """(layout, timm model, x, timm pooled, timm logits, params, kwargs), built once."""
  layout = request.param
  model = timm_model(layout)
  x = images(layout)
  pooled, logits = timm_outputs(model, x)
  params, kwargs = convert.unilm_to_flax(model.state_dict())
  return layout, model, x, pooled, logits, params, kwargs


def test_inferred_architecture(case):
  layout, model, _, _, _, _, kwargs = case
  cfg = LAYOUTS[layout]
  assert kwargs["embed_dim"] == cfg["embed_dim"] and kwargs["num_heads"] == cfg["num_heads"]
  assert kwargs["depth"] == 2 and kwargs["mlp_ratio"] == 4.0
  assert (kwargs["image_size"], kwargs["patch_size"]) == (cfg["img_size"], cfg["patch_size"])
  assert kwargs["num_classes"] == cfg["num_classes"] and kwargs["vocab_size"] == 0
  assert kwargs["use_mean_pooling"] == (cfg["global_pool"] == "avg")
  assert kwargs["use_rel_pos_bias"] == cfg.get("use_rel_pos_bias", False)
  assert kwargs["use_shared_rel_pos_bias"] == cfg.get("use_shared_rel_pos_bias", False)
  assert kwargs["use_abs_pos_emb"] == cfg["use_abs_pos_emb"]
  assert (kwargs["init_values"] > 0) == bool(cfg["init_values"])  # Gammas exist or not.
  assert not kwargs["use_mask_token"]  # timm's fine-tuning Beit has no mask token.
  # timm keeps k_bias and relative_position_index as non-persistent buffers.
  sd = model.state_dict()
  assert not any(k.endswith(("k_bias", "relative_position_index")) for k in sd)


def test_pooled_features_and_logits_equal_timm(case):
  _, _, x, pooled, logits, params, kwargs = case
  got_pooled, got_logits = flax_outputs(params, kwargs, x)
  assert max_diff(got_pooled, pooled) <= TOL
  assert max_diff(got_logits, logits) <= TOL
  assert np.std(logits) > 0.05  # The logits are not dominated by a tiny head.


def test_k_bias_buffers_are_dropped(case):
  """A state dict that does carry timm's (all-zero) k_bias buffers converts the same."""
  _, model, _, _, _, params, _ = case
  sd = dict(model.state_dict())
  buffers = {k: v for k, v in model.named_buffers() if k.endswith("k_bias")}
  assert buffers and all(torch.count_nonzero(v) == 0 for v in buffers.values())
  sd.update(buffers)
  with_k, _ = convert.unilm_to_flax(sd)
  jax.tree.map(np.testing.assert_array_equal, with_k, params)


def test_flax_to_unilm_loads_back_into_timm(case):
  layout, model, x, _, logits, params, _ = case
  sd = convert.flax_to_unilm(params)
  index_keys = {k for k in sd if k.endswith("relative_position_index")}
  # Our indices equal timm's (non-persistent) buffers, which timm's state dict omits.
  buffers = dict(model.named_buffers())
  assert bool(index_keys) == bool(
    LAYOUTS[layout].get("use_rel_pos_bias") or LAYOUTS[layout].get("use_shared_rel_pos_bias")
  )
  for k in index_keys:
    np.testing.assert_array_equal(sd[k], buffers[k].numpy())
  assert set(convert.flax_to_unilm(params, with_index=False)) == set(sd) - index_keys
  fresh = timm_beit.Beit(depth=2, mlp_ratio=4.0, **LAYOUTS[layout]).eval()
  fresh.load_state_dict(
    {k: torch.from_numpy(v) for k, v in sd.items() if k not in index_keys}, strict=True
  )
  for key, value in model.state_dict().items():
    np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy(), err_msg=key)
  _, back = timm_outputs(fresh, x)
  assert max_diff(back, logits) <= 1e-6


def test_timms_beitv2_models_convert_equal():
  """timm's registered `beitv2_base_patch16_224` / `beitv2_large_patch16_224` definitions
  (BEiT v2 backbones: per-block rel-pos, LayerScale 1e-5, mean pooling), 2 blocks at 32 px:
  pooled features and logits of the converted model equal timm's."""
  import timm

  for name, width in (("beitv2_base_patch16_224", 768), ("beitv2_large_patch16_224", 1024)):
    torch.manual_seed(3)
    model = perturbed(
      timm.create_model(name, pretrained=False, depth=2, img_size=32, num_classes=6)
    )
    x = np.random.default_rng(2).normal(size=(BATCH, 32, 32, 3)).astype(np.float32)
    pooled, logits = timm_outputs(model, x)
    params, kwargs = convert.unilm_to_flax(model.state_dict())
    assert (
      kwargs["embed_dim"] == width and kwargs["use_rel_pos_bias"] and kwargs["use_mean_pooling"]
    )
    assert not kwargs["use_abs_pos_emb"] and kwargs["init_values"] > 0
    got_pooled, got_logits = flax_outputs(params, kwargs, x)
    assert max_diff(got_pooled, pooled) <= TOL and max_diff(got_logits, logits) <= TOL, name
