"""beit_jax.models.beit_v2 (unilm `VisionTransformerForMaskedImageModelingCLS`): both heads'
logits equal an independent numpy transcription (tests/models/test_vit.py's blocks), the
parameter tree is BEiT's plus the extra blocks, the extra blocks' init is unilm's (PyTorch's
default Linear init, then the sqrt(2 l) rescale), their drop-path rates, and dropping them
leaves a plain BEiT MIM model with the same first head."""

import math

import jax
import numpy as np
import pytest

from beit_jax.models import beit_v2, vit
from tests.models.test_vit import (
  TINY,
  VOCAB,
  _apply,
  _flat,
  _images,
  _mask_and_positions,
  _np_block,
  _np_encode,
  _np_layer_norm,
  _random_params,
)


def _np_both_logits(params, images, mask, positions, heads, early):
  x, p, layers, shared = _np_encode(params, images, mask, heads, return_layers=True)
  y = np.concatenate([x[:, :1], layers[early - 1][:, 1:]], axis=1)
  for i in range(sum(1 for k in p if k.startswith("cls_pt_layers_"))):
    y = _np_block(y, p[f"cls_pt_layers_{i}"], heads, shared)

  def head(states):
    states = _np_layer_norm(states, p["norm"])[:, 1:]
    states = np.stack([states[s, positions[s]] for s in range(states.shape[0])])
    return states @ p["lm_head"]["kernel"] + p["lm_head"]["bias"]

  return head(x), head(y)


@pytest.mark.parametrize("depth, early", [(2, 1), (3, 2)])
def test_both_heads_equal_the_numpy_transcription(depth, early):
  model = beit_v2.mim_model(
    "test", vocab_size=VOCAB, depth=depth, early_layers=early, drop_path_rate=0.0, **TINY
  )
  assert model.depth == depth and model.head_layers == 2 and model.use_shared_rel_pos_bias
  params = _random_params(model)
  images = _images()
  mask, positions = _mask_and_positions()
  got, got_cls = _apply(model, params, images, mask, positions, method=model.mim_logits)
  want, want_cls = _np_both_logits(params, images, mask, positions, 2, early)
  assert np.abs(want_cls - want).max() > 0.1  # the two heads differ
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(got_cls), want_cls, rtol=1e-4, atol=1e-4)


def test_params_are_beits_plus_the_extra_blocks_and_drop_to_a_beit():
  model = beit_v2.mim_model("test", vocab_size=VOCAB, early_layers=1, **TINY)
  flat = _flat(vit.abstract_params(model))
  plain = vit.mim_model("test", vocab_size=VOCAB, **TINY)
  plain_flat = _flat(vit.abstract_params(plain))
  extra = {k for k in flat if k not in plain_flat}
  assert {k.split("/")[0] for k in extra} == {"cls_pt_layers_0", "cls_pt_layers_1"}
  assert {k.split("/", 1)[1] for k in extra} == {
    k.split("/", 1)[1] for k in plain_flat if k.startswith("blocks_0/")
  }  # each extra block is a BEiT block
  assert all(flat[k].shape == plain_flat[k].shape for k in plain_flat)
  params = _random_params(model)
  backbone = beit_v2.backbone_params(params)
  assert set(_flat(backbone)) == set(plain_flat)
  assert beit_v2.backbone_model(model) == plain
  images = _images()
  mask, positions = _mask_and_positions()
  first, _ = _apply(model, params, images, mask, positions, method=model.mim_logits)
  alone = _apply(plain, backbone, images, mask, positions, method=plain.mim_logits)
  np.testing.assert_allclose(np.asarray(first), np.asarray(alone), rtol=1e-6, atol=1e-6)


def test_extra_blocks_init_is_unilms():
  model = beit_v2.mim_model(
    "small", vocab_size=VOCAB, image_size=32, patch_size=8, early_layers=9
  )  # 384 wide, 12 blocks: the bounds are far from the trunc-normal's +-0.02
  params = beit_v2.init_params(model, jax.random.PRNGKey(0))
  d = model.embed_dim
  for i in range(2):
    block = params[f"cls_pt_layers_{i}"]
    rescale = 1.0 / math.sqrt(2.0 * (9 + i + 1))
    for layer, fan_in, scale in (
      (block["attn"]["qkv"], d, 1.0),
      (block["attn"]["proj"], d, rescale),
      (block["mlp"]["fc1"], d, 1.0),
      (block["mlp"]["fc2"], 4 * d, rescale),
    ):
      kernel = np.asarray(layer["kernel"])
      bound = scale / math.sqrt(fan_in)
      assert np.abs(kernel).max() <= bound
      assert np.abs(kernel).max() > 0.99 * bound  # uniform: the bound is reached
      np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.02)
      if "bias" in layer:  # PyTorch's default bias: U(+-1/sqrt(fan_in)), not rescaled
        bias = np.asarray(layer["bias"])
        assert np.abs(bias).max() <= 1 / math.sqrt(fan_in) and bias.std() > 0.3 / math.sqrt(fan_in)
    np.testing.assert_array_equal(np.asarray(block["attn"]["q_bias"]), 0.0)
    np.testing.assert_array_equal(np.asarray(block["gamma_1"]), np.float32(0.1))
  # The backbone keeps vit.BEiT's trunc-normal init (+-0.02, scaled by sqrt(2 l)).
  assert np.abs(np.asarray(params["blocks_0"]["mlp"]["fc1"]["kernel"])).max() <= 0.02
  again = beit_v2.init_params(model, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(
    np.asarray(again["cls_pt_layers_1"]["mlp"]["fc2"]["kernel"]),
    np.asarray(params["cls_pt_layers_1"]["mlp"]["fc2"]["kernel"]),
  )


def test_extra_blocks_drop_path_rates_layers_and_bad_early_layers():
  # depth 2, early 1, 2 extra blocks: their rates come from linspace(0, 0.3, max(2, 3)).
  model = beit_v2.mim_model("test", vocab_size=VOCAB, early_layers=1, drop_path_rate=0.3, **TINY)
  bound = model.bind({"params": _random_params(model)})
  assert [b.drop_path_rate for b in bound.cls_pt_layers] == pytest.approx([0.15, 0.3])
  assert [b.layer for b in bound.cls_pt_layers] == [2, 3]
  assert [b.drop_path_rate for b in bound.blocks] == pytest.approx([0.0, 0.3])
  assert beit_v2.mim_model("base", image_size=32, patch_size=16).early_layers == 9
  assert beit_v2.mim_model("large", image_size=32, patch_size=16).early_layers == 21
  with pytest.raises(ValueError, match=r"early_layers=2 must be in 1\.\.1 \(depth 2\)"):
    vit.abstract_params(beit_v2.mim_model("test", vocab_size=VOCAB, early_layers=2, **TINY))
