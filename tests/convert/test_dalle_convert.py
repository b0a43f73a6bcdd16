"""DALL-E dVAE weights -> this project's dVAE: equal to a PyTorch (torch.nn.functional)
forward of DALL-E's architecture on real photos; CLI export loads as a tokenizer;
pickled modules need the trust flag."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from beit_jax import exports
from beit_jax.convert import dalle
from beit_jax.data import sources
from beit_jax.models import dvae

N_HID, N_BLK, VOCAB, N_INIT, GROUPS = 64, 1, 512, 32, 4


def _conv(gen, n_out, n_in, k):
  w = torch.randn(n_out, n_in, k, k, generator=gen) / np.sqrt(n_in * k * k)
  return w, torch.randn(n_out, generator=gen) * 0.1


def _blocks(gen, prefix, sd, channels, kernels):
  """DALL-E blocks: channels [(n_in, n_out)] per group; res_path kernel sizes."""
  for g, (first_in, out) in enumerate(channels, start=1):
    for i in range(N_BLK):
      n_in, pre = first_in if i == 0 else out, f"{prefix}.group_{g}.block_{i + 1}."
      if n_in != out:
        sd[pre + "id_path.w"], sd[pre + "id_path.b"] = _conv(gen, out, n_in, 1)
      hid = out // 4
      dims = [(hid, n_in), (hid, hid), (hid, hid), (out, hid)]
      for j, ((o, n), k) in enumerate(zip(dims, kernels), start=1):
        sd[pre + f"res_path.conv_{j}.w"], sd[pre + f"res_path.conv_{j}.b"] = _conv(gen, o, n, k)


def random_dalle(seed=0):
  gen = torch.Generator().manual_seed(seed)
  enc, dec = {}, {}
  enc["blocks.input.w"], enc["blocks.input.b"] = _conv(gen, N_HID, 3, 7)
  h = N_HID
  _blocks(gen, "blocks", enc, [(h, h), (h, 2 * h), (2 * h, 4 * h), (4 * h, 8 * h)], (3, 3, 3, 1))
  enc["blocks.output.conv.w"], enc["blocks.output.conv.b"] = _conv(gen, VOCAB, 8 * h, 1)
  dec["blocks.input.w"], dec["blocks.input.b"] = _conv(gen, N_INIT, VOCAB, 1)
  _blocks(
    gen, "blocks", dec, [(N_INIT, 8 * h), (8 * h, 4 * h), (4 * h, 2 * h), (2 * h, h)], (1, 3, 3, 3)
  )
  dec["blocks.output.conv.w"], dec["blocks.output.conv.b"] = _conv(gen, 6, h, 1)
  return enc, dec


def _torch_blocks(sd, x, upsample):
  post_gain = 1.0 / (GROUPS * N_BLK) ** 2

  def conv(x, name):
    return F.conv2d(
      x, sd[name + ".w"], sd[name + ".b"], padding=(sd[name + ".w"].shape[-1] - 1) // 2
    )

  for g in range(1, GROUPS + 1):
    for i in range(1, N_BLK + 1):
      pre = f"blocks.group_{g}.block_{i}."
      ident = conv(x, pre + "id_path") if pre + "id_path.w" in sd else x
      r = x
      for j in range(1, 5):
        r = conv(F.relu(r), pre + f"res_path.conv_{j}")
      x = ident + post_gain * r
    if g < GROUPS:
      x = F.interpolate(x, scale_factor=2, mode="nearest") if upsample else F.max_pool2d(x, 2)
  return conv(F.relu(x), "blocks.output.conv")


def torch_encoder(sd, x01_nchw):
  x = 0.8 * x01_nchw + 0.1  # DALL-E map_pixels.
  x = F.conv2d(x, sd["blocks.input.w"], sd["blocks.input.b"], padding=3)
  return _torch_blocks(sd, x, upsample=False)


def torch_decoder_images(sd, ids):
  z = F.one_hot(ids, VOCAB).permute(0, 3, 1, 2).float()
  x = F.conv2d(z, sd["blocks.input.w"], sd["blocks.input.b"])
  stats = _torch_blocks(sd, x, upsample=True)
  return torch.clamp((torch.sigmoid(stats[:, :3]) - 0.1) / 0.8, 0, 1)  # unmap_pixels.


def real_photos(size=64, count=4):
  src = sources.BuiltinPhotosSource()
  photos = [
    Image.fromarray(src[i]["image"]).resize((size, size), Image.Resampling.BICUBIC)
    for i in (0, 4, 5, 17)[:count]
  ]
  return np.stack([np.asarray(p, np.float32) / 255.0 for p in photos])


def test_converted_dalle_equals_pytorch_on_real_photos():
  enc, dec = random_dalle()
  params, config = dalle.convert(
    {k: v.numpy() for k, v in enc.items()}, {k: v.numpy() for k, v in dec.items()}
  )
  assert (config["n_hid"], config["n_blk_per_group"], config["vocab_size"], config["n_init"]) == (
    N_HID,
    N_BLK,
    VOCAB,
    N_INIT,
  )
  model = dvae.from_config(config)
  images = real_photos()
  with torch.no_grad():
    expected = torch_encoder(enc, torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  logits = np.asarray(
    model.apply({"params": params}, jnp.asarray(images), method=dvae.DiscreteVAE.encode)
  )
  expected = expected.transpose(0, 2, 3, 1)
  assert np.max(np.abs(logits - expected)) <= 1e-4
  agree = np.mean(logits.argmax(-1) == expected.argmax(-1))
  assert agree >= 0.999, agree
  ids = dvae.tokenize(model, {"params": params}, jnp.asarray(images))
  recon = np.asarray(dvae.decode(model, {"params": params}, ids))
  with torch.no_grad():
    ref = torch_decoder_images(dec, torch.from_numpy(np.array(ids)).long()).numpy()
  assert np.max(np.abs(recon - ref.transpose(0, 2, 3, 1))) <= 1e-4


def test_cli_trust_flag_and_tokenizer_export(tmp_path):
  enc, dec = random_dalle(seed=1)
  # Pickled modules (like DALL-E's .pkl files) are refused without --trust_pickle.
  module_path = tmp_path / "module.pkl"
  torch.save(torch.nn.Linear(2, 2), module_path)
  with pytest.raises(ValueError, match="trust_pickle"):
    dalle.load_dalle_state_dict(str(module_path))
  with pytest.warns(UserWarning, match="runs code"):
    assert set(dalle.load_dalle_state_dict(str(module_path), trust_pickle=True)) == {
      "weight",
      "bias",
    }
  # State dicts convert through the CLI into a tokenizer export.
  torch.save(enc, tmp_path / "encoder.pth")
  torch.save(dec, tmp_path / "decoder.pth")
  out = tmp_path / "tokenizer"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "beit_jax.convert",
      "dalle",
      str(out),
      f"--encoder={tmp_path / 'encoder.pth'}",
      f"--decoder={tmp_path / 'decoder.pth'}",
      "--image_size=64",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert result.returncode == 0, result.stderr[-2000:]
  model, variables, meta = exports.load_tokenizer(str(out))
  assert meta["grid"] == 8 and model.vocab_size == VOCAB
  images = real_photos(count=2)
  with torch.no_grad():
    expected = torch_encoder(enc, torch.from_numpy(images).permute(0, 3, 1, 2)).argmax(1)
  np.testing.assert_array_equal(
    np.asarray(dvae.tokenize(model, variables, jnp.asarray(images))), expected.numpy()
  )
