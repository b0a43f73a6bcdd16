"""Task `segment` (BEiT + UperNet): the schedule, layer-wise lr decay and weight decay against
transcriptions of mmcv / unilm; the train step's BatchNorm statistics and non-finite guard; the
padding and the majority baseline; bad input; the CLI on the built-in mosaics (train, eval,
pictures, exports) and a SIGTERM-stopped run resumed bit for bit.

The CLI runs use BEiT-test (2 blocks, features of blocks (0, 0, 1, 1)) on 32 px crops (patch 8:
a 4x4 grid), one device with XLA's fast CPU compile; the session's persistent XLA cache
(tests/conftest.py) compiles the same train step once for the three runs.
"""

import json
import os
import re
import signal
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from beit_jax import config_lib, exports
from beit_jax.models import segmentation
from beit_jax.tasks import segment
from beit_jax.tasks import segmentation_eval as seg_eval
from beit_jax.training import optim
from tests.tasks.test_pretrain_task import ROOT, run_main
from tests.training.test_faults import _exported_params

SMALL = os.path.join(ROOT, "configs", "segment_small.py")
ADE20K = os.path.join(ROOT, "configs", "segment_ade20k.py")
STEPS, CROP, NUM_CLASSES = 6, 32, 18  # The built-in mosaics have one class per photo (18).
CONFIG = f"--config={SMALL}:steps={STEPS},batch_size=8,crop={CROP}"
TINY = [
  "--config.data.source=builtin",
  "--config.data.num_images=32",
  "--config.model.variant=test",
  "--config.model.out_indices=(0,0,1,1)",
  "--config.model.channels=16",
  "--config.model.aux_channels=8",
  "--config.eval.max_images=4",
  "--config.eval_every=3",
  "--config.eval_batch_size=8",
  "--config.num_pictures=1",
  "--config.log_every=1",
  "--config.ckpt.every=3",
  "--config.ckpt.async_save=False",
  "--config.tensorboard=False",
]


# run_main sets XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}": one device, and
# XLA's fast CPU compile (compiling the tiny model optimised is most of a CLI run).
ONE_FAST_DEVICE = "1 --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def tiny_config(**optim_overrides):
  """configs/segment_small.py shrunk as TINY (BEiT-test, 32 px crops, 5 classes)."""
  config = config_lib.load_config_file(SMALL, f"steps=10,batch_size=4,crop={CROP},variant=test")
  config.model.out_indices = (0, 0, 1, 1)
  config.model.channels = 16
  config.model.aux_channels = 8
  config.optim.update(optim_overrides)
  return config


# ----------------------------------------------------------------------------------
# The schedule: mmcv 1.3's PolyLrUpdaterHook with linear warmup.
# ----------------------------------------------------------------------------------
def mmcv_poly_lr(it, base, max_iters, warmup_iters, warmup_ratio, power, min_lr):
  """mmcv 1.3 (mmcv/runner/hooks/lr_updater.py), by_epoch=False, warmup='linear':
  `PolyLrUpdaterHook.get_lr`, and `LrUpdaterHook.before_train_iter` applying
  `get_warmup_lr` while `cur_iter < warmup_iters` (Python floats)."""
  coeff = (1 - it / max_iters) ** power
  regular_lr = (base - min_lr) * coeff + min_lr
  if warmup_iters == 0 or it >= warmup_iters:
    return regular_lr
  k = (1 - it / warmup_iters) * (1 - warmup_ratio)
  return regular_lr * (1 - k)


@pytest.mark.parametrize(
  "base, total, warmup, ratio, power, min_lr, steps",
  [  # unilm's ADE20K recipe, then other powers / floors / ratios.
    (7e-4, 160_000, 1500, 1e-6, 1.0, 0.0, [0, 1, 750, 1499, 1500, 1501, 80_000, 159_999, 160_000]),
    (3e-5, 1000, 50, 1e-3, 0.9, 1e-6, [0, 1, 25, 49, 50, 51, 500, 999, 1000]),
    (1e-3, 40, 0, 1e-6, 2.0, 1e-5, [0, 1, 20, 39, 40]),
  ],
)
def test_warmup_poly_equals_mmcv(base, total, warmup, ratio, power, min_lr, steps):
  fn = optim.warmup_poly(base, total, warmup, ratio, power, min_lr)
  got = np.array([float(fn(s)) for s in steps])
  want = np.array([mmcv_poly_lr(s, base, total, warmup, ratio, power, min_lr) for s in steps])
  # float32: 1 - s / total near the end and 1 - k near step 0 carry ~1e-8 absolute errors.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * base)


def test_the_ade20k_config_schedule_is_unilms():
  """configs/segment_ade20k.py through `config_lib.lr_schedule` (what the task uses):
  lr 7e-4, 160k iterations, warmup 1500 with ratio 1e-6, power 1, min_lr 0."""
  config = config_lib.load_config_file(ADE20K)
  fn = config_lib.lr_schedule(config)
  steps = [0, 1, 1499, 1500, 1501, 100_000, 159_999]
  got = np.array([float(fn(s)) for s in steps])
  want = np.array([mmcv_poly_lr(s, 7e-4, 160_000, 1500, 1e-6, 1.0, 0.0) for s in steps])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * 7e-4)


# ----------------------------------------------------------------------------------
# Layer-wise lr decay and weight decay: unilm's segmentation rules on unilm's names.
# ----------------------------------------------------------------------------------
_INDEXED = re.compile(r"(blocks|fpn\d|lateral_convs|fpn_convs|psp_modules|convs)_(\d+)")


def unilm_name(path: str) -> str:
  """Flax path -> unilm / mmseg parameter name: `blocks_3` -> `blocks.3`, kernel / scale ->
  weight, and the neck `fpn1_0` ... inside the backbone (`backbone.fpn1.0`), as unilm's
  segmentation BEiT holds it."""
  parts = []
  for p in path.split("/"):
    m = _INDEXED.fullmatch(p)
    parts += [m.group(1), m.group(2)] if m else [{"kernel": "weight", "scale": "weight"}.get(p, p)]
  if re.fullmatch(r"fpn\d", parts[0]):
    parts = ["backbone", *parts]
  return ".".join(parts)


def unilm_get_num_layer_for_vit(var_name, num_max_layer):
  """unilm beit/semantic_segmentation/mmcv_custom/layer_decay_optimizer_constructor.py."""
  if var_name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
    return 0
  elif var_name.startswith("backbone.patch_embed"):
    return 0
  elif var_name.startswith("backbone.blocks"):
    layer_id = int(var_name.split(".")[2])
    return layer_id + 1
  else:
    return num_max_layer - 1


def unilm_lr_scale(name, layer_decay_rate, depth):
  """`LayerDecayOptimizerConstructor.add_params`: num_layers = paramwise_cfg.num_layers + 2,
  scale = layer_decay_rate ** (num_layers - layer_id - 1)."""
  num_layers = depth + 2
  layer_id = unilm_get_num_layer_for_vit(name, num_layers)
  return layer_decay_rate ** (num_layers - layer_id - 1)


def unilm_decays(name, shape):
  """`add_params`' no_decay test, on the full names (so 'backbone.cls_token' decays)."""
  return not (len(shape) == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token"))


def mini_params():
  """Abstract params of a 6-block segmenter (nothing allocated)."""
  model = segmentation.segmenter("mini", 5, CROP, patch_size=8, channels=16, aux_channels=8)
  return model, segmentation.abstract_variables(model)["params"]


def test_unilm_name_mapping():
  assert unilm_name("backbone/blocks_3/attn/qkv/kernel") == "backbone.blocks.3.attn.qkv.weight"
  assert unilm_name("fpn1_1/scale") == "backbone.fpn1.1.weight"
  assert unilm_name("decode_head/fpn_convs_0/bn/bias") == "decode_head.fpn_convs.0.bn.bias"


def test_layerwise_lr_scales_are_unilms_segmentation_scales():
  model, params = mini_params()
  depth = model.depth
  assert depth == 6
  flat = _flat(optim.layerwise_lr_scales(params, 0.65, depth, backbone="backbone"))
  shapes = _flat(params)
  assert set(flat) == set(shapes) and len(flat) > 80
  for path, scale in flat.items():
    want = unilm_lr_scale(unilm_name(path), 0.65, depth)
    assert scale == pytest.approx(want, rel=1e-12), path
  # The values spelled out.
  assert flat["backbone/cls_token"] == pytest.approx(0.65 ** (depth + 1))
  assert flat["backbone/patch_embed/kernel"] == pytest.approx(0.65 ** (depth + 1))
  for i in range(depth):
    assert flat[f"backbone/blocks_{i}/attn/qkv/kernel"] == pytest.approx(0.65 ** (depth - i))
    assert flat[f"backbone/blocks_{i}/attn/relative_position_bias_table"] == pytest.approx(
      0.65 ** (depth - i)
    )
  for path, scale in flat.items():
    if not path.startswith("backbone/"):  # Neck (fpn*), decode and auxiliary heads.
      assert scale == 1.0, path


def test_weight_decay_mask_is_unilms_segmentation_rule():
  _, params = mini_params()
  mask, shapes = _flat(optim.weight_decay_mask(params)), _flat(params)
  for path, x in shapes.items():
    assert mask[path] == unilm_decays(unilm_name(path), x.shape), path
  assert mask["backbone/cls_token"]  # Full name 'backbone.cls_token': not unilm's skip list.
  assert mask["backbone/blocks_0/attn/relative_position_bias_table"]
  assert mask["decode_head/bottleneck/conv/kernel"] and mask["fpn1_0/kernel"]
  for path in (
    "decode_head/bottleneck/bn/scale",
    "fpn1_1/scale",
    "backbone/blocks_0/gamma_1",
    "backbone/blocks_0/attn/q_bias",
    "decode_head/conv_seg/bias",
  ):
    assert not mask[path], path


def test_the_task_optimizer_applies_both_rules():
  """`make_step_parts`' optimizer on all-ones params with zero gradients (Adam's part 0):
  each leaf moves by -lr * wd * scale if it decays, not at all otherwise."""
  config = tiny_config(warmup_steps=0, weight_decay=0.05, layer_decay=0.65)
  model = segment.make_model(config, 5, None)
  parts = segment.make_step_parts(config, model)
  params = jax.tree.map(
    lambda x: jnp.ones(x.shape, x.dtype), segmentation.abstract_variables(model)["params"]
  )
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(parts.tx.update)(zeros, parts.tx.init(params), params)
  lr = config.optim.lr  # Step 0 without warmup: the base lr.
  assert float(parts.lr_fn(0)) == pytest.approx(lr, rel=1e-6)
  for path, u in _flat(updates).items():
    name = unilm_name(path)
    decays = unilm_decays(name, u.shape)
    want = -lr * 0.05 * unilm_lr_scale(name, 0.65, model.depth) if decays else 0.0
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-5, atol=0, err_msg=path)


# ----------------------------------------------------------------------------------
# The train step.
# ----------------------------------------------------------------------------------
# As tests/models/test_segmentation.py `_FAST_COMPILE` (not imported: that module pulls in
# torch and transformers): XLA:CPU's optimising passes are most of a tiny model's compile.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=_FAST_COMPILE)


def seg_batch(n=4, size=CROP, num_classes=5, seed=0):
  """Crops padded like mmseg's pipeline (image 0, label 255 beyond `valid_hw`)."""
  rng = np.random.default_rng(seed)
  valid = np.array([[size, size], [20, size], [size, 24], [16, 16]][:n], np.int32)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, num_classes, (n, size, size)).astype(np.uint8)
  for i, (h, w) in enumerate(valid):
    images[i, h:], images[i, :, w:] = 0, 0
    labels[i, h:], labels[i, :, w:] = 255, 255
  return {"image": images, "label": labels, "valid_hw": valid}


def test_train_step_updates_batch_stats_and_a_non_finite_step_keeps_them():
  """Step 0 keeps the BatchNorm statistics of the train-mode forward on the normalised,
  unpadded crops; step 1 (NaN gradients injected) keeps params and statistics."""
  config = tiny_config()
  config.nonfinite.inject_at_steps = (1,)
  model = segment.make_model(config, 5, None)
  zeros = jnp.zeros((1, CROP, CROP, 3))
  init = _compiled(lambda: dict(model.init(jax.random.PRNGKey(0), zeros, train=False)))
  variables = jax.tree.map(np.asarray, init())
  parts = segment.make_step_parts(config, model)
  state = parts.init_fn(variables)
  batch = seg_batch()
  step = _compiled(parts.train_step, state, batch)

  first, metrics = step(state, batch)
  assert int(first.step) == 1 and float(metrics["nonfinite"]) == 0.0
  assert np.isfinite(float(metrics["loss"])) and 0 <= float(metrics["pixel_acc"]) <= 1

  def forward(v, x, rng):
    return model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng})[1]

  x = segment.normalize_and_unpad(batch["image"], batch["valid_hw"], config.input.norm)
  apply = _compiled(forward, variables, x, state.step_rng())
  direct = _flat(apply(variables, x, state.step_rng())["batch_stats"])
  got, init = _flat(first.batch_stats), _flat(variables["batch_stats"])
  assert set(got) == set(init) and len(got) == 2 * 14  # fpn1_1 + 13 ConvModules: mean, var.
  for name in init:
    np.testing.assert_allclose(got[name], direct[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.max(np.abs(got[name] - init[name])) > 1e-4, name  # Moved from (0, 1).
  padded = jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1.0  # Normalised, not unpadded.
  padded = _flat(apply(variables, padded, state.step_rng())["batch_stats"])
  assert max(np.max(np.abs(padded[k] - got[k])) for k in got) > 1e-4
  assert any(  # The params moved too.
    np.max(np.abs(a - b)) > 0
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(variables["params"]))
  )

  second, metrics = step(first, seg_batch(seed=1))
  assert int(second.step) == 2 and float(metrics["nonfinite"]) == 1.0
  for kept, before in (
    (second.params, first.params),
    (second.batch_stats, first.batch_stats),
    (second.opt_state, first.opt_state),
  ):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(kept), jax.tree.leaves(before)):
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------------
# Padding and the majority baseline.
# ----------------------------------------------------------------------------------
UNILM_NORMS = {  # mmseg img_norm_cfg (mean, std) in 0..255.
  "half": ((127.5,) * 3, (127.5,) * 3),
  "imagenet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
}


@pytest.mark.parametrize("norm", sorted(UNILM_NORMS))
def test_normalize_and_unpad_zeroes_exactly_the_padding(norm):
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)
  valid = np.array([[4, 3], [6, 5], [1, 2]], np.int32)
  got = np.asarray(segment.normalize_and_unpad(jnp.asarray(images), jnp.asarray(valid), norm))
  rows = np.arange(6)[None, :, None] < valid[:, 0, None, None]
  cols = np.arange(5)[None, None, :] < valid[:, 1, None, None]
  inside = np.broadcast_to((rows & cols)[..., None], got.shape)
  mean, std = (np.asarray(v) for v in UNILM_NORMS[norm])
  want = (images.astype(np.float64) - mean) / std
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got == 0, ~inside)  # No pixel value normalises to 0.
  np.testing.assert_allclose(got[inside], want[inside], rtol=1e-5, atol=1e-6)


def test_majority_miou_on_hand_made_sums():
  junk = np.array([7, 1, 0, 3, 9])  # majority_miou reads only the label areas.
  sums = dict(area_intersect=junk, area_union=junk, area_pred_label=junk)
  # 100 labelled pixels in classes 0, 1, 3: predicting class 3 everywhere gives IoU 60 / 100
  # for it, 0 for classes 0 and 1; classes 2 and 4 (no pixels) are left out of the mean.
  label = np.array([10, 30, 0, 60, 0])
  assert seg_eval.majority_miou(dict(sums, area_label=label)) == pytest.approx(0.6 / 3)
  # The same through mmseg's metrics on the sums of that prediction.
  pred = np.array([0, 0, 0, 100, 0])
  inter = np.array([0, 0, 0, 60, 0])
  majority = dict(
    area_intersect=inter, area_union=label + pred - inter, area_pred_label=pred, area_label=label
  )
  assert seg_eval.segmentation_metrics(majority)["mIoU"] == pytest.approx(0.2)
  assert seg_eval.majority_miou(dict(sums, area_label=np.array([50, 50]))) == pytest.approx(0.25)
  assert seg_eval.majority_miou(dict(sums, area_label=np.array([0, 8, 0]))) == 1.0
  assert np.isnan(seg_eval.majority_miou(dict(sums, area_label=np.zeros(3))))


# ----------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------
BAD = [  # (overrides, the key the error line names)
  (["--config.eval.stride=40"], "config.eval.stride"),
  (["--config.input.crop_size=40"], "config.input.crop_size"),
  (["--config.data.source=masks"], "--config.data.num_classes"),
  (["--config.data.source=masks", "--config.data.num_classes=5"], "--config.data.path"),
]


def test_bad_settings_exit_2_with_one_error_line_before_anything_is_written(tmp_path):
  """(The processes run side by side: each only imports, parses and checks.)"""
  procs = []
  for i, (overrides, _) in enumerate(BAD):
    workdir = tmp_path / f"run{i}"
    procs.append(
      (
        workdir,
        run_main(
          CONFIG, *TINY, *overrides, f"--workdir={workdir}", devices=ONE_FAST_DEVICE, wait=False
        ),
      )
    )
  for (workdir, proc), (overrides, key) in zip(procs, BAD):
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2, (overrides, stderr[-2000:])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.count("error:") == 1, (overrides, stderr[-2000:])
    assert key in errors[0], (overrides, errors[0])
    assert "Traceback" not in stderr, stderr[-2000:]
    assert not workdir.exists(), overrides


# ----------------------------------------------------------------------------------
# The CLI: train, evaluate, draw, export; stop and resume.
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted CLI run: (workdir, completed process)."""
  workdir = tmp_path_factory.mktemp("segment") / "straight"
  return workdir, run_main(CONFIG, *TINY, f"--workdir={workdir}", devices=ONE_FAST_DEVICE)


def _records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def _state(workdir, step):
  """The raw train state of checkpoint `step` (nested dicts of numpy arrays)."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def _assert_trees_equal(want, got, what):
  assert jax.tree.structure(want) == jax.tree.structure(got), what
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=f"{what}: {jax.tree_util.keystr(path)}")


def test_cli_trains_evaluates_draws_and_exports(straight):
  workdir, result = straight
  assert result.returncode == 0, result.stderr[-3000:]
  train = _records(workdir, "train")
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  # Logged per step (log_every 1): step s ran with mmcv's lr of iteration s - 1.
  warmup = max(STEPS // 10, 1)
  for r in train:
    want = mmcv_poly_lr(r["step"] - 1, 7e-4, STEPS, warmup, 1e-6, 1.0, 0.0)
    assert r["lr"] == pytest.approx(want, rel=1e-5, abs=1e-7 * 7e-4), r  # As above (float32).
    assert np.isfinite(r["loss"]) and 0 <= r["pixel_acc"] <= 1
  evals = _records(workdir, "eval") + _records(workdir, "final_eval")
  assert [r["step"] for r in evals] == [3, STEPS]
  for r in evals:
    assert r["num_images"] == 4 and r["skipped_images"] == 0, r
    for key in ("mIoU", "mAcc", "aAcc", "majority_mIoU"):
      assert 0 <= r[key] <= 1, (key, r)
    assert r["majority_mIoU"] > 0
  assert evals[-1]["best_mIoU"] == max(r["mIoU"] for r in evals)
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["step"] == STEPS and any("mIoU" in line for line in summary["lines"])
  png = os.path.join(workdir, "pictures", "segmentation.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 500

  final_dir = os.path.join(workdir, "export", "segmenter")
  model, variables, meta = exports.load_segmenter(final_dir)
  assert meta["kind"] == exports.SEGMENTER and meta["step"] == STEPS
  assert meta["num_classes"] == model.num_classes == NUM_CLASSES and model.image_size == CROP
  assert tuple(model.out_indices) == (0, 0, 1, 1) and model.depth == 2
  assert meta["eval"]["mIoU"] == evals[-1]["mIoU"]
  image = np.random.default_rng(0).integers(0, 256, (1, CROP, CROP, 3), dtype=np.uint8)
  x = jnp.asarray(image, jnp.float32) / 127.5 - 1
  apply = _compiled(lambda v, x: model.apply(v, x, train=False), variables, x)
  logits, aux = apply(variables, x)
  assert logits.shape == (1, CROP // 2, CROP // 2, NUM_CLASSES)  # Patch 8: stride 2.
  assert aux.shape[-1] == NUM_CLASSES and np.isfinite(np.asarray(logits)).all()
  # The export is the last checkpoint's params and BatchNorm statistics, bit for bit.
  state = _state(workdir, STEPS)
  assert int(state["step"]) == STEPS
  _assert_trees_equal(
    {"params": state["params"], "batch_stats": state["batch_stats"]},
    jax.tree.map(np.asarray, variables),
    "export/segmenter vs checkpoint",
  )
  # The best export holds the best eval's step and value.
  best = exports.read_metadata(os.path.join(workdir, "export", "best"))
  top = max(evals, key=lambda r: r["mIoU"])
  assert best["kind"] == exports.SEGMENTER and best["eval"]["mIoU"] == top["mIoU"]
  assert best["step"] == min(r["step"] for r in evals if r["mIoU"] == top["mIoU"])
  exports.load_segmenter(os.path.join(workdir, "export", "best"))


def test_stop_and_resume_equals_the_uninterrupted_run(straight, tmp_path):
  """SIGTERM after the first step (a checkpoint off the save grid), then the same command:
  the final params AND BatchNorm statistics equal the uninterrupted run's, bit for bit."""
  want_dir, result = straight
  assert result.returncode == 0, result.stderr[-3000:]
  stopped = tmp_path / "stopped"
  proc = run_main(CONFIG, *TINY, f"--workdir={stopped}", devices=ONE_FAST_DEVICE, wait=False)
  metrics = stopped / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and '"train"' in metrics.read_text():
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "Stopped by SIGTERM at step" in stderr, stderr[-3000:]
  at = int(stderr.split("Stopped by SIGTERM at step ")[1].split()[0])
  assert 0 < at < STEPS and not (stopped / "export" / "segmenter").exists(), at
  resumed = run_main(CONFIG, *TINY, f"--workdir={stopped}", devices=ONE_FAST_DEVICE)
  assert resumed.returncode == 0 and f"at step {at}" in resumed.stderr, resumed.stderr[-3000:]

  for export in ("segmenter", "best"):
    want = _exported_params(want_dir / "export" / export)
    got = _exported_params(stopped / "export" / export)
    assert set(want) == {"params", "batch_stats"}
    _assert_trees_equal(want, got, f"stopped at {at}, export/{export}")
  ref = _state(want_dir, STEPS)
  end = _state(stopped, STEPS)
  _assert_trees_equal(ref["opt_state"], end["opt_state"], f"stopped at {at}, opt_state")
  # The resumed steps continue the schedule and the metrics of the uninterrupted run.
  ref_train = {r["step"]: r for r in _records(want_dir, "train")}
  for r in _records(stopped, "train"):
    assert r["lr"] == pytest.approx(ref_train[r["step"]]["lr"], rel=1e-6), r["step"]
    assert r["loss"] == pytest.approx(ref_train[r["step"]]["loss"], rel=1e-6), r["step"]
  assert _records(stopped, "final_eval")[-1]["mIoU"] == _records(want_dir, "final_eval")[-1]["mIoU"]
