"""OpenAI's `dall_e` package (full-size Encoder / Decoder, random weights) -> `dalle.convert`
-> our dVAE: equal encoder logits, tokens and decoded images on real photos; pickled
`dall_e` modules load only with trust_pickle."""

import dall_e
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from beit_jax.convert import dalle
from beit_jax.models import dvae
from tests.convert.test_dalle_convert import real_photos

TOL = 1e-4
SIZE = 112  # 14 x 14 tokens.


def random_dalle(seed: int = 0, **kwargs) -> tuple[dall_e.Encoder, dall_e.Decoder]:
  """dall_e's Encoder / Decoder with their own random init, perturbed biases and larger
  residual branches / token embeddings, so that every layer shows in the outputs."""
  torch.manual_seed(seed)
  enc = dall_e.Encoder(**{k: v for k, v in kwargs.items() if k != "n_init"})
  dec = dall_e.Decoder(**kwargs)
  with torch.no_grad():
    for module in (enc, dec):
      for name, p in module.named_parameters():
        if name.endswith(".b"):  # Biases initialise to zero.
          p.add_(torch.randn_like(p) * 0.1)
        if name.endswith("conv_4.w"):  # Offsets part of the 1 / n_layers^2 post-gain.
          p.mul_(4.0)
    # The init's std 1/sqrt(vocab) makes one-hot codes ~0.01: scale towards embeddings.
    dec.blocks.input.w.mul_(32.0)
  return enc.eval(), dec.eval()


def numpy_sd(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in module.state_dict().items()}


def max_diff(a, b) -> float:
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def full_size():
  enc, dec = random_dalle()
  params, config = dalle.convert(numpy_sd(enc), numpy_sd(dec))
  return enc, dec, params, config


def test_full_size_dalle_equals_the_package_on_real_photos(full_size):
  enc, dec, params, config = full_size
  assert (
    config["n_hid"],
    config["n_blk_per_group"],
    config["group_count"],
    config["n_init"],
    config["vocab_size"],
  ) == (256, 2, 4, 128, 8192)
  model = dvae.from_config(config)
  variables = {"params": params}
  images = real_photos(size=SIZE)  # (4, 112, 112, 3) in [0, 1].
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    expected = enc(dall_e.map_pixels(x)).numpy().transpose(0, 2, 3, 1)
  # Our encode applies map_pixels itself (input_norm='dall_e'): it takes [0, 1] images.
  logits = np.asarray(model.apply(variables, jnp.asarray(images), method=dvae.DiscreteVAE.encode))
  assert logits.shape == (4, SIZE // 8, SIZE // 8, 8192)
  assert max_diff(logits, expected) <= TOL
  ids = logits.argmax(-1).astype(np.int32)  # What dvae.tokenize returns (saves a pass).
  agree = np.mean(ids == expected.argmax(-1))
  assert agree >= 0.999, agree

  # Decoder on the same ids, plus one map of random ids so many codebook rows are used.
  random_ids = np.random.default_rng(0).integers(0, 8192, (1,) + ids.shape[1:])
  all_ids = np.concatenate([ids, random_ids]).astype(np.int32)
  z = torch.nn.functional.one_hot(torch.from_numpy(all_ids).long(), 8192)
  with torch.no_grad():
    stats = dec(z.permute(0, 3, 1, 2).float())
    ref = dall_e.unmap_pixels(torch.sigmoid(stats[:, :3])).numpy().transpose(0, 2, 3, 1)
  recon = np.asarray(dvae.decode(model, variables, jnp.asarray(all_ids)))
  assert recon.shape == (5, SIZE, SIZE, 3)
  assert 0.0 < ref.min() and ref.max() < 1.0  # Nothing clipped: every pixel is compared.
  assert max_diff(recon, ref) <= TOL


def test_pickled_dall_e_module_needs_trust(tmp_path):
  enc, dec = random_dalle(seed=1, n_hid=64, vocab_size=512, n_init=32)
  path = tmp_path / "encoder.pkl"
  torch.save(enc, path)  # How OpenAI ships encoder.pkl: the whole module, pickled.
  with pytest.raises(ValueError, match="--trust_pickle"):
    dalle.load_dalle_state_dict(str(path))
  with pytest.warns(UserWarning, match="runs code"):
    loaded = dalle.load_dalle_state_dict(str(path), trust_pickle=True)
  assert set(loaded) == set(enc.state_dict())
  from_pickle, _ = dalle.convert(loaded, numpy_sd(dec))
  from_sd, config = dalle.convert(numpy_sd(enc), numpy_sd(dec))
  assert config["n_hid"] == 64 and config["vocab_size"] == 512 and config["n_init"] == 32
  jax.tree.map(np.testing.assert_array_equal, from_pickle, from_sd)
