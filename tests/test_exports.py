"""Params exports: the folder format, and one writer + loader per kind round-tripping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beit_jax import exports
from beit_jax.models import dvae, segmentation, vit, vqkd

TOKENIZER_CONFIG = dict(
  arch="compact",
  vocab_size=32,
  recon_loss="mse",
  input_norm="half",
  num_layers=2,
  hidden=8,
  num_resblocks=0,
  codebook_dim=8,
  dtype="float32",
)


def _random_like(abstract, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)


def _assert_equal_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_and_load_params(tmp_path):
  params = {
    "enc": {"w": np.arange(12.0, dtype=np.float32).reshape(3, 4)},
    "b": np.ones(2, np.int32),
  }
  out = exports.write(tmp_path / "export", params, metadata={"kind": "test", "n": 1})
  assert exports.read_metadata(out) == {"kind": "test", "n": 1}
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), params)
  loaded = exports.load_params(out, target)
  np.testing.assert_array_equal(np.asarray(loaded["enc"]["w"]), params["enc"]["w"])
  # Re-exporting over an existing export replaces it.
  params["enc"]["w"] = params["enc"]["w"] + 1
  exports.write(out, params, metadata={"kind": "test", "n": 2})
  np.testing.assert_array_equal(
    np.asarray(exports.load_params(out, target)["enc"]["w"]), params["enc"]["w"]
  )


def test_missing_export_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a beit_jax params export"):
    exports.read_metadata(tmp_path)


def test_tokenizer_export_round_trip_and_grid(tmp_path):
  model = dvae.from_config(TOKENIZER_CONFIG)
  params = _random_like(exports.tokenizer_abstract_params(model, 16))
  out = exports.write_tokenizer(
    tmp_path / "tok",
    params,
    TOKENIZER_CONFIG,
    16,
    step=7,
    eval_metrics={"psnr": 20.0},
    source="test",
  )
  assert exports.tokenizer_info(out) == dict(grid=4, vocab_size=32, image_size=16)
  loaded, variables, meta = exports.load_tokenizer(out)
  assert meta["kind"] == exports.TOKENIZER and meta["step"] == 7 and meta["source"] == "test"
  assert loaded.downsample == 4 and loaded.vocab_size == 32
  _assert_equal_trees(variables["params"], params)
  images = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 16, 16, 3)), jnp.float32)
  np.testing.assert_array_equal(
    dvae.tokenize(loaded, variables, images), dvae.tokenize(model, {"params": params}, images)
  )
  with pytest.raises(ValueError, match="not divisible"):
    exports.write_tokenizer(tmp_path / "bad", params, TOKENIZER_CONFIG, 18)


def test_beit_exports_round_trip_and_refuse_the_wrong_kind(tmp_path):
  mim = vit.mim_model("test", image_size=16, patch_size=4, vocab_size=16)
  params = _random_like(vit.abstract_params(mim))
  out = exports.write_mim(
    tmp_path / "mim",
    params,
    mim,
    input_norm="half",
    tokenizer=str(tmp_path / "tok"),
    tokenizer_image_size=16,
    step=3,
    eval_metrics={"loss": 1.0},
  )
  model, loaded, meta = exports.load_pretrained(out)
  assert vit.architecture(model) == vit.architecture(mim) and meta["vocab_size"] == 16
  assert meta["patch_size"] == 4 and meta["tokenizer_image_size"] == 16
  _assert_equal_trees(loaded, params)
  with pytest.raises(ValueError, match="not a classifier"):
    exports.load_classifier(out)
  with pytest.raises(ValueError, match="not a visual tokenizer"):
    exports.load_tokenizer(out)

  clf = vit.classifier_model("test", 5, image_size=16, patch_size=4)
  clf_params = _random_like(vit.abstract_params(clf), seed=1)
  out = exports.write_classifier(
    tmp_path / "clf",
    clf_params,
    clf,
    input_norm="half",
    pretrained="",
    step=9,
    eval_metrics={"top1": 0.5},
  )
  model, loaded, meta = exports.load_classifier(out)
  assert model.num_classes == 5 and meta["num_classes"] == 5 and meta["eval"]["top1"] == 0.5
  _assert_equal_trees(loaded, clf_params)
  _, any_beit, _ = exports.load_beit(out)  # A fine-tuned model is a backbone too.
  _assert_equal_trees(any_beit, clf_params)
  with pytest.raises(ValueError, match="not pretrained BEiT params"):
    exports.load_pretrained(out)

  kwargs = vit.architecture(mim)
  out = exports.write_converted_beit(tmp_path / "conv", params, kwargs, source="x.pth")
  _, loaded, meta = exports.load_pretrained(out)
  assert meta["kind"] == exports.CONVERTED_BEIT and meta["model_kwargs"] == kwargs
  _assert_equal_trees(loaded, params)


def test_linear_probe_export_round_trip(tmp_path):
  backbone = vit.classifier_model("test", 3, image_size=16, patch_size=4)
  depth, dim = backbone.depth, 2 * backbone.embed_dim
  probes = dict(
    kernel=np.random.default_rng(0).normal(size=(depth, dim, 3)).astype(np.float32),
    bias=np.arange(depth * 3, dtype=np.float32).reshape(depth, 3),
  )
  out = exports.write_linear_probe(
    tmp_path / "probe",
    probes,
    backbone,
    backbone="",
    num_classes=3,
    input_norm="half",
    step=4,
    eval_metrics={"best_layer": 2},
  )
  model, loaded, meta = exports.load_linear_probe(out)
  assert model.depth == depth and meta["eval"]["best_layer"] == 2
  _assert_equal_trees(loaded, probes)


def test_segmenter_export_round_trip(tmp_path):
  """params AND batch_stats saved and restored; the model rebuilt from its metadata computes
  what the original does; the kind is checked both ways."""
  model = segmentation.segmenter(
    "test",
    num_classes=5,
    image_size=32,
    patch_size=8,
    depth=4,
    out_indices=(0, 1, 2, 3),
    channels=16,
    aux_channels=8,
    pool_scales=(1, 2),
    drop_path_rate=0.0,
  )
  abstract = segmentation.abstract_variables(model)
  variables = {
    "params": jax.tree.map(lambda a: 0.1 * a, _random_like(abstract["params"], seed=2)),
    # Running variances must be positive; random, so that init values would not pass.
    "batch_stats": jax.tree.map(
      lambda a: np.abs(a) + 0.5, _random_like(abstract["batch_stats"], seed=3)
    ),
  }
  # Device arrays, like the restored ones (numpy operands can round differently when eager).
  variables = jax.tree.map(jnp.asarray, variables)
  out = exports.write_segmenter(
    tmp_path / "seg",
    variables,
    model,
    input_norm="half",
    pretrained="/pretrained/beit",
    step=11,
    eval_metrics={"mIoU": 0.25},
    source="seg.pth",
  )
  loaded, restored, meta = exports.load_segmenter(out)
  assert loaded == model
  assert segmentation.architecture(loaded) == segmentation.architecture(model)
  assert meta["kind"] == exports.SEGMENTER and meta["num_classes"] == 5
  assert (meta["image_size"], meta["patch_size"], meta["step"]) == (32, 8, 11)
  assert meta["input_norm"] == "half" and meta["pretrained"] == "/pretrained/beit"
  assert meta["eval"] == {"mIoU": 0.25} and meta["source"] == "seg.pth"
  assert set(restored) == {"params", "batch_stats"}
  _assert_equal_trees(restored["params"], variables["params"])
  _assert_equal_trees(restored["batch_stats"], variables["batch_stats"])

  images = np.random.default_rng(4).standard_normal((2, 32, 32, 3)).astype(np.float32)
  logits, aux = model.apply(variables, images, train=False)
  got_logits, got_aux = loaded.apply(restored, images, train=False)
  assert logits.shape == (2, 16, 16, 5) and np.isfinite(np.asarray(logits)).all()
  np.testing.assert_array_equal(np.asarray(got_logits), np.asarray(logits))
  np.testing.assert_array_equal(np.asarray(got_aux), np.asarray(aux))

  assert exports.load_segmenter(out, dtype=jnp.bfloat16)[0].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="not a classifier"):
    exports.load_classifier(out)
  with pytest.raises(ValueError, match="missing"):
    exports.write_segmenter(
      tmp_path / "bad",
      {"params": variables["params"]},
      model,
      input_norm="half",
      pretrained="",
      step=0,
    )
  clf = vit.classifier_model("test", 5, image_size=16, patch_size=4)
  clf_out = exports.write_classifier(
    tmp_path / "clf",
    _random_like(vit.abstract_params(clf)),
    clf,
    input_norm="half",
    pretrained="",
    step=0,
  )
  with pytest.raises(ValueError, match="not a segmenter"):
    exports.load_segmenter(clf_out)


def test_exports_on_a_bucket(gcs_bucket):
  """metadata.json through beit_jax.paths and params/ through Orbax (tensorstore) on gs://;
  a MIM export keeps its gs:// tokenizer path as it is."""
  model = dvae.from_config(TOKENIZER_CONFIG)
  params = _random_like(exports.tokenizer_abstract_params(model, 16))
  tok = exports.write_tokenizer(gcs_bucket.url("dall_e"), params, TOKENIZER_CONFIG, 16)
  assert tok == "gs://fake-bucket/dall_e"
  assert "dall_e/metadata.json" in gcs_bucket.keys()
  assert any(k.startswith("dall_e/params/") for k in gcs_bucket.keys())
  assert exports.is_export(tok) and exports.tokenizer_info(tok)["grid"] == 4
  _, variables, _ = exports.load_tokenizer(tok)
  _assert_equal_trees(variables["params"], params)

  mim = vit.mim_model("test", image_size=16, patch_size=4, vocab_size=32)
  out = exports.write_mim(
    gcs_bucket.url("beit/export/beit"),
    _random_like(vit.abstract_params(mim)),
    mim,
    input_norm="half",
    tokenizer=tok,
    tokenizer_image_size=16,
    step=1,
  )
  assert exports.read_metadata(out)["tokenizer"] == "gs://fake-bucket/dall_e"
  assert not exports.is_export(gcs_bucket.url("nothing"))
  assert not gcs_bucket.server.errors


def test_vqkd_export_round_trip_and_codebook_shape_check(tmp_path):
  kwargs = dict(
    image_size=16, patch_size=8, encoder_width=32, encoder_depth=1, encoder_heads=2,
    decoder_width=32, decoder_depth=1, decoder_heads=2, code_dim=4, num_codes=8, teacher_dim=6,
  )  # fmt: skip
  model = vqkd.VQKD(**kwargs)
  codebook = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), codebook)["params"]
  with pytest.raises(ValueError, match=r"codebook shape \(4, 8\) != \(num_codes, code_dim\)"):
    exports.write_vqkd(str(tmp_path / "bad"), params, codebook.T, kwargs)
  assert not (tmp_path / "bad").exists()
  out = exports.write_vqkd(str(tmp_path / "tok"), params, codebook, kwargs, step=7, teacher="clip")
  assert exports.tokenizer_info(out) == dict(grid=2, vocab_size=8, image_size=16)
  loaded, variables, meta = exports.load_tokenizer(out)
  assert loaded == model and meta["step"] == 7 and meta["teacher"] == "clip"
  np.testing.assert_array_equal(np.asarray(variables["codebook"]), np.asarray(codebook))
  for a, b in zip(
    jax.tree_util.tree_leaves(variables["params"]), jax.tree_util.tree_leaves(params)
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  model = dvae.from_config(TOKENIZER_CONFIG)
  dvae_params = _random_like(exports.tokenizer_abstract_params(model, 16))
  dalle = exports.write_tokenizer(tmp_path / "dvae", dvae_params, TOKENIZER_CONFIG, 16)
  with pytest.raises(ValueError, match="holds a 'dvae' export, not a VQ-KD tokenizer"):
    exports.load_vqkd(dalle)
