"""unilm-layout state dicts <-> Flax params: forward equality with a numpy unilm forward
written in torch layout, config inference, round trip, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beit_jax import exports
from beit_jax.convert import beit as convert
from beit_jax.models import vit
from tests.models import test_vit as ref  # The independent numpy helpers (GELU, LN, index).


def _ln(x, sd, name):
  return ref._np_layer_norm(x, {"scale": sd[name + ".weight"], "bias": sd[name + ".bias"]})


def unilm_forward(sd, images, heads):
  """unilm VisionTransformer(ForMaskedImageModeling) forward on a torch-layout state dict
  (Linear y = x W^T + b, conv OIHW); returns the MIM logits of all patches or class logits."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  w = sd["patch_embed.proj.weight"]  # (D, 3, p, p)
  p = w.shape[-1]
  b, h, wd, _ = images.shape
  g = h // p
  patches = images.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(b, g * g, -1)
  x = patches @ w.reshape(w.shape[0], -1).T + sd["patch_embed.proj.bias"]
  x = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, x.shape[-1])), x], axis=1)
  if "pos_embed" in sd:
    x = x + sd["pos_embed"]
  n, d = x.shape[1], x.shape[2]
  hd = d // heads
  shared = (
    ref._np_rel_bias(sd["rel_pos_bias.relative_position_bias_table"], (g, g))
    if "rel_pos_bias.relative_position_bias_table" in sd
    else 0.0
  )
  i = 0
  while f"blocks.{i}.norm1.weight" in sd:
    pre = f"blocks.{i}."
    bias = shared
    if pre + "attn.relative_position_bias_table" in sd:
      bias = bias + ref._np_rel_bias(sd[pre + "attn.relative_position_bias_table"], (g, g))
    y = _ln(x, sd, pre + "norm1")
    qkv_bias = np.concatenate([sd[pre + "attn.q_bias"], np.zeros(d), sd[pre + "attn.v_bias"]])
    qkv = (y @ sd[pre + "attn.qkv.weight"].T + qkv_bias).reshape(b, n, 3, heads, hd)
    q, k, v = [qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3)]
    attn = ref._np_softmax(q * hd**-0.5 @ k.transpose(0, 1, 3, 2) + bias)
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    y = y @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
    x = x + sd.get(pre + "gamma_1", 1.0) * y
    y = ref._np_gelu(
      _ln(x, sd, pre + "norm2") @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"]
    )
    y = y @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
    x = x + sd.get(pre + "gamma_2", 1.0) * y
    i += 1
  if "lm_head.weight" in sd:
    return _ln(x, sd, "norm")[:, 1:] @ sd["lm_head.weight"].T + sd["lm_head.bias"]
  feat = (
    _ln(x[:, 1:].mean(1), sd, "fc_norm") if "fc_norm.weight" in sd else _ln(x, sd, "norm")[:, 0]
  )
  return feat @ sd["head.weight"].T + sd["head.bias"]


def random_unilm_state_dict(model: vit.BEiT, seed=0):
  """A torch-layout state dict with random values for every weight of `model`."""
  params = ref._random_params(model, seed)
  sd = convert.flax_to_unilm(params)
  rng = np.random.default_rng(seed + 1)
  return {
    k: (rng.normal(size=v.shape).astype(np.float32) * 0.3 if "index" not in k else v)
    for k, v in sd.items()
  }


CASES = {
  "mim_shared_rel_pos": dict(vocab_size=50, use_shared_rel_pos_bias=True),
  "cls_per_block_rel_pos": dict(
    vocab_size=0,
    num_classes=7,
    use_shared_rel_pos_bias=False,
    use_rel_pos_bias=True,
    use_mask_token=False,
  ),
  "vanilla_abs_pos_no_layerscale": dict(
    vocab_size=0,
    num_classes=5,
    use_abs_pos_emb=True,
    use_shared_rel_pos_bias=False,
    init_values=0.0,
    use_mask_token=False,
    use_mean_pooling=False,
  ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_weights_give_unilm_outputs(case):
  model = vit.BEiT(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, **CASES[case])
  sd = random_unilm_state_dict(model)
  ckpt = {"model": {("backbone." + k if case.startswith("cls") else k): v for k, v in sd.items()}}
  params, kwargs = convert.unilm_to_flax(ckpt, num_heads=None if "rel" in case else 4)
  assert kwargs["image_size"] == 16 and kwargs["depth"] == 2 and kwargs["num_heads"] == 4
  converted = vit.BEiT(**kwargs)
  images = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype(np.float32)
  expected = unilm_forward(sd, images.astype(np.float64), 4)
  if converted.vocab_size:
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    got = converted.apply(
      {"params": params}, images, jnp.zeros((2, 16), bool), positions, method=vit.BEiT.mim_logits
    )
  else:
    got = converted.apply({"params": params}, images, method=vit.BEiT.classify)
  assert np.max(np.abs(np.asarray(got) - expected)) <= 1e-4


def test_round_trip_is_identity_and_infers_base():
  params = ref._random_params(vit.mim_model("test", image_size=32, patch_size=8, vocab_size=20), 0)
  sd = convert.flax_to_unilm(params)
  assert sd["blocks.0.attn.qkv.weight"].shape == (96, 32)
  assert sd["patch_embed.proj.weight"].shape == (32, 3, 8, 8)
  np.testing.assert_array_equal(
    sd["rel_pos_bias.relative_position_index"], vit.relative_position_index((4, 4))
  )
  back, kwargs = convert.unilm_to_flax(sd)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
  assert kwargs["use_shared_rel_pos_bias"] and kwargs["vocab_size"] == 20
  zeros = jax.tree.map(
    lambda a: np.zeros(a.shape, np.float32), vit.abstract_params(vit.mim_model("base"))
  )
  base = convert.flax_to_unilm(zeros, with_index=False)
  kwargs = convert.infer_model_kwargs(base)
  assert (
    kwargs["embed_dim"],
    kwargs["depth"],
    kwargs["num_heads"],
    kwargs["image_size"],
    kwargs["patch_size"],
    kwargs["vocab_size"],
  ) == (768, 12, 12, 224, 16, 8192)
  assert vit.param_count(vit.BEiT(**kwargs)) == 91_965_776


def test_mismatches_name_the_key():
  params = ref._random_params(vit.mim_model("test", image_size=16, patch_size=4, vocab_size=20), 0)
  sd = convert.flax_to_unilm(params)
  broken = dict(sd)
  del broken["blocks.1.mlp.fc2.bias"]
  with pytest.raises(ValueError, match="blocks_1/mlp/fc2/bias"):
    convert.unilm_to_flax(broken)
  with pytest.raises(ValueError, match="disagrees with the relative-position table"):
    convert.unilm_to_flax(sd, num_heads=3)
  with pytest.raises(ValueError, match="no place in the model"):
    convert.unilm_to_flax({**sd, "decoder.weight": np.zeros((2, 2))})
  with pytest.raises(ValueError, match="Not a BEiT state dict"):
    convert.unwrap_state_dict({"state_dict": {"conv.weight": np.zeros(3)}})


class NotWeights:
  """A pickled object that is not a tensor: weights-only loading must refuse it."""

  def __reduce__(self):
    return (print, ("this would run at load time",))


def test_cli_converts_a_torch_checkpoint_to_a_loadable_export(tmp_path):
  import os
  import subprocess
  import sys

  import torch

  model = vit.mim_model("test", image_size=16, patch_size=4, vocab_size=30)
  sd = random_unilm_state_dict(model, seed=5)
  src = tmp_path / "beit.pth"
  torch.save(
    {"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, "epoch": 3},
    src,
  )
  out = tmp_path / "converted"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-m", "beit_jax.convert", "beit", str(src), str(out)],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Converted" in result.stdout
  loaded, params, meta = exports.load_pretrained(str(out))
  assert meta["kind"] == "beit" and loaded.vocab_size == 30 and loaded.depth == 2
  images = np.random.default_rng(4).normal(size=(2, 16, 16, 3)).astype(np.float32)
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  got = loaded.apply(
    {"params": params}, images, jnp.zeros((2, 16), bool), positions, method=vit.BEiT.mim_logits
  )
  expected = unilm_forward(sd, images.astype(np.float64), 2)
  assert np.max(np.abs(np.asarray(got) - expected)) <= 1e-4

  # And back: export -> unilm-layout .pth equal to the original state dict.
  back = tmp_path / "back.pth"
  result = subprocess.run(
    [sys.executable, "-m", "beit_jax.convert", "to_pth", str(out), str(back)],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  returned = torch.load(back, weights_only=True)["model"]
  assert set(returned) == set(sd)
  for key, value in sd.items():
    np.testing.assert_array_equal(returned[key].numpy(), value)

  bad = tmp_path / "code.pth"
  torch.save({"model": NotWeights()}, bad)
  with pytest.raises(ValueError, match="pickled code"):
    convert.load_torch_checkpoint(str(bad))


def test_cli_reads_and_writes_a_bucket(fake_gcs):
  """`convert beit gs://.../beit.pth gs://.../converted` in process: the .pth read through
  beit_jax.paths, the export written to the bucket."""
  import torch

  from beit_jax.convert import __main__ as convert_cli

  model = vit.mim_model("test", image_size=16, patch_size=4, vocab_size=30)
  sd = random_unilm_state_dict(model, seed=6)
  torch.save(
    {"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}},
    fake_gcs.local("beit.pth"),
  )
  convert_cli.main(["beit", fake_gcs.url("beit.pth"), fake_gcs.url("converted")])
  assert "converted/metadata.json" in fake_gcs.keys()
  _, params, meta = exports.load_pretrained(fake_gcs.url("converted"))
  assert meta["source"] == fake_gcs.url("beit.pth")
  np.testing.assert_array_equal(np.asarray(params["cls_token"]).ravel(), sd["cls_token"].ravel())


def test_cli_with_a_bucket_path_and_no_gcsfs_says_what_to_install(no_gcs_backend):
  from beit_jax.convert import __main__ as convert_cli

  with pytest.raises(SystemExit, match=r"^src='gs://fake-bucket/beit.pth': gs:// paths need gcsfs"):
    convert_cli.main(["beit", "gs://fake-bucket/beit.pth", "/tmp/out"])


@pytest.mark.parametrize("shared_lm_head", [True, False])
def test_a_beit_v2_pretraining_checkpoint_converts_to_its_backbone(
  tmp_path, capsys, shared_lm_head
):
  """unilm `beitv2_*_pt1k*.pth` (`VisionTransformerForMaskedImageModelingCLS`): the
  patch-aggregation blocks (and, without a shared head, `cls_pt_norm` / `cls_pt_lm_head`)
  are pretraining-only and dropped; the rest converts exactly as a v1 MIM checkpoint."""
  import torch

  from beit_jax.convert import __main__ as convert_cli

  model = vit.mim_model("test", image_size=16, patch_size=4, vocab_size=30)
  sd = random_unilm_state_dict(model, seed=6)
  extra = {
    k.replace("blocks.", "cls_pt_layers.", 1): v + 1.0
    for k, v in sd.items()
    if k.startswith("blocks.")
  }
  if not shared_lm_head:
    extra.update({f"cls_pt_{k}": v for k, v in sd.items() if k.startswith(("norm.", "lm_head."))})
  v2 = {**sd, **extra}
  assert convert.pretraining_only_keys({"model": v2}) == sorted(extra)
  params, kwargs = convert.unilm_to_flax({"model": v2})
  want_params, want_kwargs = convert.unilm_to_flax({"model": sd})
  assert kwargs == want_kwargs
  jax.tree.map(np.testing.assert_array_equal, params, want_params)
  src, out = tmp_path / "beitv2.pth", tmp_path / "converted"
  torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in v2.items()}}, src)
  convert_cli.main(["beit", str(src), str(out)])
  assert (
    f"Dropped {len(extra)} weights of BEiT v2's patch-aggregation head" in capsys.readouterr().out
  )
  loaded, loaded_params, _ = exports.load_pretrained(str(out))
  assert type(loaded) is vit.BEiT and not [k for k in loaded_params if "cls_pt" in k]
