"""beit_jax.convert.segmentation: an unilm / mmseg-named state dict, an mmseg checkpoint
container and HF's older (transformers < 5) key names convert to the same variables as HF's
`BeitForSemanticSegmentation.state_dict()`; unknown, missing and mis-shaped keys raise a
ValueError naming the key.

The mmseg names are written here from the modules, not from the converter's rules: unilm
`semantic_segmentation/backbone/beit.py` (`blocks.i.{norm1,attn.qkv,attn.q_bias,attn.v_bias,
attn.proj,attn.relative_position_bias_table,attn.relative_position_index,norm2,mlp.fc1,mlp.fc2,
gamma_1,gamma_2}`, `fpn1 = Sequential(ConvTranspose2d, SyncBatchNorm, GELU, ConvTranspose2d)`,
`fpn2 = Sequential(ConvTranspose2d)`), mmseg 0.11 `UPerHead` (`psp_modules` = PPM of
`Sequential(AdaptiveAvgPool2d, ConvModule)`, `bottleneck`, `lateral_convs`, `fpn_convs`,
`fpn_bottleneck`, `conv_seg`), `FCNHead` (`convs = Sequential(ConvModule...)`, `conv_seg`) and
mmcv `ConvModule` (`conv`, `bn`).
"""

import numpy as np
import pytest
import torch

from beit_jax import exports
from beit_jax.convert import __main__ as convert_cli
from beit_jax.convert import segmentation as convert
from beit_jax.models import segmentation as seg
from beit_jax.models import vit
from tests.models import test_segmentation as ref

OUT = ref.OUT_INDICES


def _conv_module(out, dst, hf, src):
  """mmcv ConvModule `dst.{conv,bn}` from HF BeitConvLayer `src.{convolution,normalization}`."""
  out[f"{dst}.conv.weight"] = hf[f"{src}.convolution.weight"]
  for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
    out[f"{dst}.bn.{name}"] = hf[f"{src}.normalization.{name}"]


def mmseg_state_dict(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The unilm / mmseg state dict of the same weights as the HF one."""
  out = {
    "backbone.cls_token": hf["beit.embeddings.cls_token"],
    "backbone.patch_embed.proj.weight": hf["beit.embeddings.patch_embeddings.projection.weight"],
    "backbone.patch_embed.proj.bias": hf["beit.embeddings.patch_embeddings.projection.bias"],
  }
  grid = ref.IMAGE // 8
  for i in range(ref.DEPTH):
    h, u = f"beit.layers.{i}.", f"backbone.blocks.{i}."
    out[u + "gamma_1"] = hf[h + "lambda_1"]
    out[u + "gamma_2"] = hf[h + "lambda_2"]
    for a, b in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
      out[u + a + ".weight"] = hf[h + b + ".weight"]
      out[u + a + ".bias"] = hf[h + b + ".bias"]
    qkv = [hf[h + f"attention.{n}_proj.weight"] for n in "qkv"]
    out[u + "attn.qkv.weight"] = np.concatenate(qkv, axis=0)
    out[u + "attn.q_bias"] = hf[h + "attention.q_proj.bias"]
    out[u + "attn.v_bias"] = hf[h + "attention.v_proj.bias"]
    out[u + "attn.proj.weight"] = hf[h + "attention.o_proj.weight"]
    out[u + "attn.proj.bias"] = hf[h + "attention.o_proj.bias"]
    table = h + "relative_position_bias.relative_position_bias_table"
    out[u + "attn.relative_position_bias_table"] = hf[table]
    out[u + "attn.relative_position_index"] = vit.relative_position_index((grid, grid))
    for n in ("fc1", "fc2"):
      out[u + f"mlp.{n}.weight"] = hf[h + f"mlp.{n}.weight"]
      out[u + f"mlp.{n}.bias"] = hf[h + f"mlp.{n}.bias"]
  neck = {
    "fpn1.0": "fpn.fpn1.conv_transpose1",
    "fpn1.1": "fpn.fpn1.normalization",
    "fpn1.3": "fpn.fpn1.conv_transpose2",
    "fpn2.0": "fpn.fpn2",
  }
  for dst, src in neck.items():
    for k, v in hf.items():
      if k.startswith(src + "."):
        out[f"backbone.{dst}.{k[len(src) + 1 :]}"] = v
  for j in range(4):
    _conv_module(
      out, f"decode_head.psp_modules.{j}.1", hf, f"decode_head.psp_modules.blocks.{j}.conv"
    )
  _conv_module(out, "decode_head.bottleneck", hf, "decode_head.psp_bottleneck")
  for j in range(3):
    _conv_module(out, f"decode_head.lateral_convs.{j}", hf, f"decode_head.lateral_convs.{j}")
    _conv_module(out, f"decode_head.fpn_convs.{j}", hf, f"decode_head.fpn_convs.{j}")
  _conv_module(out, "decode_head.fpn_bottleneck", hf, "decode_head.fpn_bottleneck")
  _conv_module(out, "auxiliary_head.convs.0", hf, "auxiliary_head.convs.0")
  for head in ("decode_head", "auxiliary_head"):
    out[f"{head}.conv_seg.weight"] = hf[f"{head}.classifier.weight"]
    out[f"{head}.conv_seg.bias"] = hf[f"{head}.classifier.bias"]
  return out


# transformers < 5 names of the same model (what `conversion_mapping.py` renames on load).
_LEGACY = (
  ("beit.layers.", "beit.encoder.layer."),
  ("attention.q_proj", "attention.attention.query"),
  ("attention.k_proj", "attention.attention.key"),
  ("attention.v_proj", "attention.attention.value"),
  ("attention.o_proj", "attention.output.dense"),
  ("mlp.fc1", "intermediate.dense"),
  ("mlp.fc2", "output.dense"),
  (".relative_position_bias.", ".attention.attention.relative_position_bias."),
  ("fpn.fpn1.conv_transpose1.", "fpn1.0."),
  ("fpn.fpn1.normalization.", "fpn1.1."),
  ("fpn.fpn1.conv_transpose2.", "fpn1.3."),
  ("fpn.fpn2.", "fpn2.0."),
  ("decode_head.psp_bottleneck.", "decode_head.bottleneck."),
  (".convolution.", ".conv."),
  (".normalization.", ".bn."),
)


def legacy_hf_state_dict(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in hf.items():
    for a, b in _LEGACY:
      key = key.replace(a, b)
    key = key.replace("psp_modules.blocks.", "psp_modules.").replace(".conv.conv.", ".1.conv.")
    key = key.replace(".conv.bn.", ".1.bn.")
    out[key] = value
  return out


@pytest.fixture(scope="module")
def hf_sd():
  return ref.hf_state_dict(ref.hf_model(seed=3))


@pytest.fixture(scope="module")
def hf_converted(hf_sd):
  return convert.to_flax(hf_sd, out_indices=OUT)


def _assert_same(a, b):
  fa, fb = ref._flat(a), ref._flat(b)
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_mmseg_state_dict_converts_like_hf(hf_sd, hf_converted):
  params, stats, kwargs = hf_converted
  sd = mmseg_state_dict(hf_sd)
  assert "decode_head.psp_modules.3.1.bn.running_var" in sd and "backbone.fpn1.3.bias" in sd
  checkpoint = {"meta": {"iter": 160000}, "state_dict": sd}  # mmseg's checkpoint container.
  m_params, m_stats, m_kwargs = convert.to_flax(checkpoint, out_indices=OUT)
  assert m_kwargs == kwargs
  _assert_same(m_params, params)
  _assert_same(m_stats, stats)
  assert kwargs["out_indices"] == OUT and kwargs["aux_channels"] == 16
  assert (kwargs["num_classes"], kwargs["channels"], kwargs["depth"]) == (5, 32, ref.DEPTH)


def test_legacy_hf_names_convert_like_hf(hf_sd, hf_converted):
  legacy = legacy_hf_state_dict(hf_sd)
  assert "beit.encoder.layer.0.attention.attention.query.weight" in legacy
  assert "decode_head.psp_modules.0.1.conv.weight" in legacy and "fpn1.0.weight" in legacy
  params, stats, _ = convert.to_flax(legacy, out_indices=OUT)
  _assert_same(params, hf_converted[0])
  _assert_same(stats, hf_converted[1])


def test_layouts(hf_sd, hf_converted):
  """Transposed conv (in, out, 2, 2) -> (2, 2, in, out); conv OIHW -> HWIO; fused qkv rows."""
  params, stats, _ = hf_converted
  w = hf_sd["fpn.fpn2.weight"]
  np.testing.assert_array_equal(params["fpn2_0"]["kernel"], w.transpose(2, 3, 0, 1))
  w = hf_sd["decode_head.fpn_bottleneck.convolution.weight"]
  np.testing.assert_array_equal(
    params["decode_head"]["fpn_bottleneck"]["conv"]["kernel"], w.transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(stats["fpn1_1"]["var"], hf_sd["fpn.fpn1.normalization.running_var"])
  qkv = params["backbone"]["blocks_2"]["attn"]["qkv"]["kernel"]
  np.testing.assert_array_equal(qkv[:, 32:64], hf_sd["beit.layers.2.attention.k_proj.weight"].T)


def test_unknown_key_is_named(hf_sd):
  for key in ("decode_head.conv_cat.convolution.weight", "beit.embeddings.mask_token", "foo.bar"):
    bad = dict(hf_sd, **{key: np.zeros((1, 1, 32), np.float32)})
    with pytest.raises(ValueError, match="no place in the model") as e:
      convert.to_flax(bad, out_indices=OUT)
    assert key in str(e.value)


def test_missing_key_is_named(hf_sd):
  cases = {
    "decode_head.classifier.bias": "decode_head.conv_seg.bias",
    "fpn.fpn1.normalization.running_mean": "backbone.fpn1.1.running_mean",
    "auxiliary_head.convs.0.normalization.weight": "auxiliary_head.convs.0.bn.weight",
    "beit.layers.4.lambda_2": "backbone.blocks.4.gamma_2",
    "beit.layers.1.attention.k_proj.weight": "backbone.blocks.1.attn.k.weight",
    "beit.layers.0.mlp.fc1.weight": "blocks.0.mlp.fc1.weight",
  }
  for drop, named in cases.items():
    bad = {k: v for k, v in hf_sd.items() if k != drop}
    with pytest.raises(ValueError) as e:
      convert.to_flax(bad, out_indices=OUT)
    assert named in str(e.value), (drop, str(e.value))


def test_shape_mismatch_and_pool_scales(hf_sd):
  key = "decode_head.lateral_convs.1.normalization.bias"
  bad = dict(hf_sd, **{key: np.zeros(7, np.float32)})
  with pytest.raises(ValueError, match="shape") as e:
    convert.to_flax(bad, out_indices=OUT)
  assert key in str(e.value)
  with pytest.raises(ValueError, match="4 pyramid pooling branches"):
    convert.to_flax(hf_sd, out_indices=OUT, pool_scales=(1, 2, 3))
  with pytest.raises(ValueError, match="out_indices"):
    convert.to_flax(hf_sd, out_indices=(0, 1, 3, 6))


def _save_pth(checkpoint, path) -> str:
  """torch.save of a (nested) dict of numpy arrays as tensors."""

  def tensors(x):
    return {k: tensors(v) for k, v in x.items()} if isinstance(x, dict) else torch.tensor(x)

  torch.save(tensors(checkpoint), path)
  return str(path)


def test_cli_converts_mmseg_and_hf_checkpoints_to_a_segmenter_export(tmp_path, hf_sd, hf_converted):
  """`convert segmentation SRC.pth OUT`: the export loads (`exports.load_segmenter`) as the
  model and variables of `to_flax`, and computes HF's outputs; HF's state dict converts the
  same way."""
  params, stats, kwargs = hf_converted
  src = _save_pth({"meta": {"iter": 8}, "state_dict": mmseg_state_dict(hf_sd)}, tmp_path / "m.pth")
  out = str(tmp_path / "mmseg_export")
  convert_cli.main(["segmentation", src, out, "--out_indices", "0,1,3,4"])
  model, variables, meta = exports.load_segmenter(out)
  assert model == seg.Segmenter(**kwargs)
  _assert_same(variables["params"], params)
  _assert_same(variables["batch_stats"], stats)
  assert meta["kind"] == exports.SEGMENTER and meta["source"] == src
  assert meta["input_norm"] == "half" and meta["num_classes"] == ref.NUM_CLASSES
  assert meta["model_kwargs"]["out_indices"] == list(OUT)

  x = ref.images()
  ref_logits, ref_aux = ref.hf_forward(ref.hf_model(seed=3), x)  # The model of `hf_sd`.
  logits, aux = ref._run(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert np.abs(ref_logits).max() > 0.1
  assert ref._max_diff(logits, ref_logits) <= ref.TOL
  assert ref._max_diff(aux, ref_aux) <= ref.TOL

  src = _save_pth(hf_sd, tmp_path / "hf.pth")
  out = str(tmp_path / "hf_export")
  args = ["--out_indices=0,1,3,4", "--pool_scales=1,2,3,6", "--input_norm=imagenet"]
  convert_cli.main(["segmentation", src, out, *args])
  model, variables, meta = exports.load_segmenter(out)
  assert model == seg.Segmenter(**kwargs) and meta["input_norm"] == "imagenet"
  _assert_same(variables["params"], params)
  _assert_same(variables["batch_stats"], stats)


def test_cli_refuses_what_is_not_a_segmentation_checkpoint(tmp_path, hf_sd):
  sd = mmseg_state_dict(hf_sd)
  classifier = {  # A unilm classification-style backbone: no neck, no heads.
    k.removeprefix("backbone."): v
    for k, v in sd.items()
    if k.startswith("backbone.") and not k.startswith("backbone.fpn")
  }
  src = _save_pth({"model": classifier}, tmp_path / "cls.pth")
  out = tmp_path / "out"
  with pytest.raises(SystemExit, match=r"is not a segmentation checkpoint: .*'decode_head\.\*'"):
    convert_cli.main(["segmentation", src, str(out)])
  src = _save_pth(sd, tmp_path / "seg.pth")
  with pytest.raises(SystemExit, match="does not convert .* 4 pyramid pooling branches"):
    convert_cli.main(["segmentation", src, str(out), "--out_indices=0,1,3,4", "--pool_scales=1,2"])
  assert not exports.is_export(out)
