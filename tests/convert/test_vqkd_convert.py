"""`python -m beit_jax.convert vqkd`: a unilm VQ-KD tokenizer .pth (the PyTorch transcription
of `modeling_vqkd.py`, random weights) -> a tokenizer export whose tokens, through
`exports.load_tokenizer` and `models.tokenizer.tokenize`, are unilm's `get_codebook_indices`
of the same images; what is not a VQ-KD checkpoint is refused with the file named."""

import numpy as np
import pytest
import torch

from beit_jax import exports
from beit_jax.convert import __main__ as convert_cli
from beit_jax.models import tokenizer as tokenizer_lib
from beit_jax.models import vqkd
from tests.models import torch_vqkd


def test_cli_converts_a_unilm_tokenizer_whose_tokens_equal_unilms(tmp_path):
  model = torch_vqkd.random_model(seed=3)
  src, out = str(tmp_path / "vqkd.pth"), str(tmp_path / "tok")
  torch.save({"model": model.unilm_state_dict()}, src)
  convert_cli.main(["vqkd", src, out, "--encoder_heads=2", "--decoder_heads=2"])
  assert exports.tokenizer_info(out) == dict(grid=4, vocab_size=64, image_size=32)
  meta = exports.read_metadata(out)
  assert meta["kind"] == "vqkd" and meta["teacher"] == "24-d" and meta["source"] == src
  loaded, variables, _ = exports.load_tokenizer(out)
  assert isinstance(loaded, vqkd.VQKD) and loaded.vocab_size == 64
  assert not tokenizer_lib.can_decode(loaded)

  images01 = np.random.default_rng(4).uniform(size=(3, 32, 32, 3)).astype(np.float32)
  ids = np.asarray(tokenizer_lib.tokenize(loaded, variables, images01))
  with torch.no_grad():  # unilm: get_codebook_indices(x in [0, 1]) = encode(2 x - 1)
    x = torch.from_numpy(images01).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0
    _, want, _ = model.encode(x)
  assert ids.shape == (3, 4, 4) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids.reshape(-1), want.numpy())
  assert len(np.unique(ids)) > 4


def test_cli_refuses_what_is_not_a_vqkd_tokenizer(tmp_path):
  src = str(tmp_path / "beit.pth")
  torch.save(
    {"model": {"cls_token": torch.zeros(1, 1, 8), "blocks.0.norm1.weight": torch.ones(8)}}, src
  )
  with pytest.raises(
    SystemExit, match=f"{src} does not convert to a VQ-KD tokenizer: .*'cls_token'"
  ):
    convert_cli.main(["vqkd", src, str(tmp_path / "out")])
  assert not (tmp_path / "out").exists()
