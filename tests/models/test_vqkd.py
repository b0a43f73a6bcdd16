"""beit_jax.models.vqkd + beit_jax.convert.vqkd against the PyTorch transcription of unilm's
`modeling_vqkd.py` (tests/models/torch_vqkd.py; random weights): the same codes (100%),
quantised features, commitment loss, decoder output and cosine loss from a converted unilm
state dict; parameter counts at Base size; and the converter's refusals."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from beit_jax.convert import vqkd as convert
from beit_jax.models import vqkd
from tests.models import torch_vqkd


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def converted():
  model = torch_vqkd.random_model()
  sd = model.unilm_state_dict()
  sd["teacher_model.visual.proj"] = torch.zeros(3, 3)  # dropped, as unilm drops them
  sd["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
  params, codebook, kwargs = convert.unilm_to_flax({"model": sd}, encoder_heads=2, decoder_heads=2)
  return model, sd, params, codebook, kwargs


def test_converted_model_equals_unilm(converted):
  model, _, params, codebook, kwargs = converted
  assert kwargs == dict(
    image_size=32, patch_size=8, encoder_width=32, encoder_depth=2, encoder_heads=2,
    decoder_width=32, decoder_depth=1, decoder_heads=2, mlp_ratio=4.0, code_dim=8,
    num_codes=64, teacher_dim=24,
  )  # fmt: skip
  np.testing.assert_array_equal(codebook, model.quantize.weight.detach().numpy())
  x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  target = np.random.default_rng(2).normal(size=(2, 16, 24)).astype(np.float32)
  with torch.no_grad():
    zq_t, idx_t, loss_t = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    rec_t = model.decode(zq_t)
    rec_loss_t = model.calculate_rec_loss(rec_t, torch.from_numpy(target))

  ours = vqkd.VQKD(**kwargs)
  out = ours.apply({"params": params}, jnp.asarray(x), jnp.asarray(codebook))
  idx = np.asarray(out["indices"]).reshape(-1)
  np.testing.assert_array_equal(idx, idx_t.numpy())  # the codes: 100% equal
  assert len(np.unique(idx)) > 4
  np.testing.assert_allclose(float(out["quant_loss"]), float(loss_t), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(out["rec"]), rec_t.numpy(), atol=1e-4)
  rec_loss = vqkd.cosine_distance(out["rec"], jnp.asarray(target))
  np.testing.assert_allclose(float(rec_loss), float(rec_loss_t), rtol=1e-5)
  tokens = ours.apply(
    {"params": params}, jnp.asarray(x), jnp.asarray(codebook), method=vqkd.VQKD.tokens
  )
  assert tokens.shape == (2, 16) and tokens.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(tokens).reshape(-1), idx_t.numpy())


def test_param_count_equals_unilm(converted):
  model, _, params, _, _ = converted
  torch_count = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("quantize"))
  assert _count(params) == torch_count


def test_base_param_count_equals_unilm():
  """vqkd_encoder_base_decoder_3x768x12 (224 px, 8192 x 32 codes, CLIP's 512-d targets):
  ours (`jax.eval_shape`) == the transcription's, built on the meta device."""
  with torch.device("meta"):
    model = torch_vqkd.VQKD(
      img_size=224, patch_size=16, enc=(768, 12, 12), dec=(768, 3, 12), n_embed=8192,
      embed_dim=32, decoder_out_dim=512,
    )  # fmt: skip
  torch_count = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("quantize"))
  ours = vqkd.VQKD()  # the defaults are Base's
  assert _count(vqkd.abstract_params(ours)) == torch_count == 108_829_216


def test_init_is_finite_and_the_codebook_is_not_a_param():
  model = vqkd.VQKD(
    image_size=32, patch_size=8, encoder_width=32, encoder_depth=1, encoder_heads=2,
    decoder_width=32, decoder_depth=1, decoder_heads=2, code_dim=8, num_codes=16,
    teacher_dim=12,
  )  # fmt: skip
  codebook = jnp.eye(16, 8)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), codebook)
  assert set(variables) == {"params"}
  flat = flax.traverse_util.flatten_dict(variables["params"])
  assert ("encode_task_layer_2", "kernel") in flat and ("decoder_norm", "scale") in flat
  assert all(np.isfinite(np.asarray(v)).all() for v in flat.values())


def test_converter_refuses_missing_and_unknown_keys(converted):
  _, sd, *_ = converted
  missing = {k: v for k, v in sd.items() if k != "encode_task_layer.2.bias"}
  with pytest.raises(ValueError, match="encode_task_layer_2/bias"):
    convert.unilm_to_flax(missing, encoder_heads=2, decoder_heads=2)
  with pytest.raises(ValueError, match="'head.weight' is none of"):
    convert.unilm_to_flax({**sd, "head.weight": torch.zeros(3)}, 2, 2)
  no_codebook = {k: v for k, v in sd.items() if k != "quantize.embedding.weight"}
  with pytest.raises(ValueError, match="no quantize.embedding.weight"):
    convert.unilm_to_flax(no_codebook, 2, 2)
  wrong_grid = {**sd, "decoder.pos_embed": torch.zeros(1, 1 + 25, 32)}  # 5x5, codes 4x4
  with pytest.raises(ValueError, match="does not read the encoder's 4\\^2 code grid"):
    convert.unilm_to_flax(wrong_grid, 2, 2)
