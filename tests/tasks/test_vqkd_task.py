"""The VQ-KD tokenizer job: its step against the quantiser's reference functions, k-means
on the first batch, 8 devices = 1 device, a CLI run killed and resumed bit-identically, the
export as pretraining targets, and bad settings refused before anything is written."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from beit_jax import exports
from beit_jax.models import teacher as teacher_lib
from beit_jax.models import tokenizer as tokenizer_lib
from beit_jax.models import vector_quantizer as vq
from beit_jax.models import vit, vqkd
from beit_jax.tasks import vqkd as vqkd_task
from beit_jax.training import loop
from beit_jax.training import mesh as mesh_lib
from beit_jax.training.train_state import init_sharded
from tests.tasks.kill import kill_after_first_checkpoint
from tests.tasks.test_pretrain_task import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = os.path.join(ROOT, "configs", "vqkd_small.py")
BASE = os.path.join(ROOT, "configs", "vqkd_base.py")
SIZE, PATCH, CODES = 16, 4, 32  # 16 px views -> 4x4 codes of 32.


def beit_teacher(directory, num_classes=5, image_size=SIZE, patch=PATCH) -> str:
  """A random tiny BEiT classifier export (32-d, mean pooling) as the teacher."""
  model = vit.classifier_model("test", num_classes, image_size=image_size, patch_size=patch)
  params = model.init(jax.random.PRNGKey(3), jnp.zeros((1, image_size, image_size, 3)))["params"]
  return exports.write_classifier(
    directory, params, model, input_norm="imagenet", pretrained="", step=0
  )


def clip_teacher(directory) -> str:
  """A random tiny CLIP-layout teacher export (16-d projection)."""
  kwargs = dict(kind="clip", image_size=SIZE, patch_size=PATCH, embed_dim=32, depth=1,
                num_heads=2, proj_dim=16)  # fmt: skip
  model = teacher_lib.Teacher(**kwargs)
  params = model.init(jax.random.PRNGKey(4), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  return exports.write_teacher(directory, params, kwargs)


def tiny_config(teacher: str) -> ml_collections.ConfigDict:
  sys.path.insert(0, os.path.dirname(SMALL))
  try:
    import vqkd_small

    c = vqkd_small.get_config(f"steps=4,num_codes={CODES},batch_size=8")
  finally:
    sys.path.pop(0)
  c.input.image_size = SIZE
  c.model.patch_size = PATCH
  c.model.variant = "test"
  c.teacher.path = teacher
  c.eval_batch_size = 8
  c.log_every = 2
  c.ckpt.every = 2
  c.ckpt.async_save = False
  c.tensorboard = False
  c.pictures = False
  return c


TINY = [
  f"--config={SMALL}:steps=4,num_codes={CODES},batch_size=8",
  f"--config.input.image_size={SIZE}",
  f"--config.model.patch_size={PATCH}",
  "--config.model.variant=test",
  "--config.eval_batch_size=8",
  "--config.log_every=2",
  "--config.ckpt.every=2",
  "--config.ckpt.async_save=False",
  "--config.tensorboard=False",
  "--config.pictures=False",
]


# ----------------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------------
def _state_and_step(config, devices):
  mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
  replicated = mesh_lib.replicated(mesh)
  spec = vqkd_task.teacher_spec(config)
  features_fn, teacher_params = vqkd_task.load_teacher(config.teacher.path, spec, replicated)
  parts = vqkd_task.make_step_parts(config, spec, features_fn)
  state, sharding = init_sharded(parts.init_fn, mesh)
  step = loop.compile_train_step(
    parts.train_step,
    sharding,
    mesh_lib.batch_sharding(mesh),
    jax.tree.map(lambda _: replicated, teacher_params),
  )
  return parts, state, step, features_fn, teacher_params, mesh


def _batch(seed=0, n=8):
  rng = np.random.default_rng(seed)
  return {vqkd_task.IMAGE_KEY: rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)}


def test_first_step_initialises_the_codebook_by_kmeans_then_moves_it_by_ema(tmp_path):
  config = tiny_config(beit_teacher(str(tmp_path / "teacher")))
  parts, state, step, features_fn, teacher_params, mesh = _state_and_step(config, jax.devices())
  assert not bool(state.batch_stats["initted"])
  np.testing.assert_array_equal(np.asarray(state.batch_stats["codebook"]), 0.0)
  host = _batch()
  params0, rng0 = jax.device_get(state.params), state.step_rng()
  x = jnp.asarray(host[vqkd_task.IMAGE_KEY]).astype(jnp.float32) / 255.0 * 2.0 - 1.0
  z = parts.model.apply({"params": params0}, x, method=vqkd.VQKD.encode)
  flat = vq.l2norm(z).reshape(-1, z.shape[-1])
  means, bins = vq.kmeans_cosine(rng0, flat, CODES, config.codebook.kmeans_iters)
  _, indices, _ = vq.quantize(z, means)
  expected = vq.ema_update(means, flat, indices, 0.99)
  batch = mesh_lib.global_batch(host, mesh_lib.batch_sharding(mesh))

  state, metrics = step(state, batch, teacher_params)
  stats = jax.device_get(state.batch_stats)
  assert bool(stats["initted"])
  np.testing.assert_allclose(stats["codebook"], np.asarray(expected), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(stats["codebook"], axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(
    stats["cluster_size"],
    np.asarray(vq.usage_ema(bins.astype(jnp.float32), indices, 0.99)),
    atol=1e-5,
  )
  assert float(metrics["token_counts"].sum()) == 8 * 16
  # The loss is the cosine distance to the teacher plus the commitment term.
  target = features_fn(teacher_params, jnp.asarray(host[vqkd_task.IMAGE_KEY]))
  z_q, _, quant = vq.quantize(z, means)
  rec = parts.model.apply({"params": params0}, z_q, method=vqkd.VQKD.decode)
  np.testing.assert_allclose(
    float(metrics["rec_loss"]), float(vqkd.cosine_distance(rec, target)), rtol=1e-4
  )
  np.testing.assert_allclose(float(metrics["quant_loss"]), float(quant), rtol=1e-4)
  np.testing.assert_allclose(
    float(metrics["loss"]), float(metrics["rec_loss"] + metrics["quant_loss"]), rtol=1e-6
  )
  # Step two keeps the initialised codebook (no second k-means): the EMA of step 2's batch.
  codes = stats["codebook"]
  params1 = jax.device_get(state.params)
  host2 = _batch(1)
  x2 = jnp.asarray(host2[vqkd_task.IMAGE_KEY]).astype(jnp.float32) / 255.0 * 2.0 - 1.0
  z2 = parts.model.apply({"params": params1}, x2, method=vqkd.VQKD.encode)
  flat2 = vq.l2norm(z2).reshape(-1, z2.shape[-1])
  _, idx2, _ = vq.quantize(z2, jnp.asarray(codes))
  state, _ = step(
    state, mesh_lib.global_batch(host2, mesh_lib.batch_sharding(mesh)), teacher_params
  )
  np.testing.assert_allclose(
    np.asarray(state.batch_stats["codebook"]),
    np.asarray(vq.ema_update(codes, flat2, idx2, 0.99)),
    atol=1e-5,
  )


def test_step_on_8_devices_equals_1_device(tmp_path):
  """The codebook update sums over the global batch: the same codebook and params on a mesh
  of 8 as on 1 device (a per-device update would differ)."""
  config = tiny_config(clip_teacher(str(tmp_path / "teacher")))
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    _, state, step, _, teacher_params, mesh = _state_and_step(config, devices)
    for seed in range(3):
      batch = mesh_lib.global_batch(_batch(seed), mesh_lib.batch_sharding(mesh))
      state, _ = step(state, batch, teacher_params)
    results.append(jax.device_get((state.params, state.batch_stats)))
  assert len(jax.devices()) >= 8
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5)


# ----------------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------------
def _export(workdir):
  model, variables, meta = exports.load_tokenizer(os.path.join(workdir, "export", "tokenizer"))
  return model, jax.device_get(variables), meta


def test_cli_run_killed_resumes_bit_identically_and_exports_pretraining_targets(tmp_path):
  teacher = beit_teacher(str(tmp_path / "teacher"))
  args = [*TINY, f"--config.teacher.path={teacher}"]
  steps = ["--config.total_steps=24", "--config.ckpt.every=6", "--config.log_every=6"]
  straight = str(tmp_path / "straight")
  first = run_main(*args, *steps, f"--workdir={straight}")
  assert first.returncode == 0, first.stderr[-3000:]
  records = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [6, 12, 18, 24]
  for key in ("loss", "rec_loss", "quant_loss", "usage", "perplexity", "lr", "grad_norm"):
    assert np.isfinite(train[-1][key]), key
  assert train[-1]["rec_loss"] < train[0]["rec_loss"]  # It learns the teacher's features.
  final = [r for r in records if r["split"] == "final_eval"][0]
  assert final["num_images"] > 0 and 0 < final["usage"] <= 1 and 0 <= final["rec_loss"] <= 2
  summary = first.stderr[first.stderr.index("Summary:") :]
  assert "a VQ-KD tokenizer (test), 32 codes" in summary and "cosine similarity" in summary

  killed = str(tmp_path / "killed")
  proc = run_main(*args, *steps, f"--workdir={killed}", wait=False)
  saved = kill_after_first_checkpoint(proc, os.path.join(killed, "checkpoints"))
  assert saved < 24, "the run ended before it could be killed"
  resumed = run_main(*args, *steps, f"--workdir={killed}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"at step {saved}" in resumed.stderr
  (_, a, meta), (_, b, _) = _export(straight), _export(killed)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  assert meta["step"] == 24 and meta["grid"] == 4 and meta["kind"] == "vqkd"

  # The export is a tokenizer pretraining takes: 4x4 codes of the 16 px view.
  model, variables, _ = _export(straight)
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, SIZE, SIZE, 3)), jnp.float32)
  ids = tokenizer_lib.tokenize(model, variables, images)
  assert ids.shape == (2, 4, 4) and int(ids.max()) < CODES
  assert exports.tokenizer_info(os.path.join(straight, "export", "tokenizer")) == dict(
    grid=4, vocab_size=CODES, image_size=SIZE
  )


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--config.model.teacher_dim=24"], "config.model.teacher_dim=24 (the decoder's output)"),
    (["--config.model.patch_size=8"], "is not the teacher's patch grid (4x4)"),
    (["--config.input.image_size=32", "--config.model.patch_size=8"], "sees 16 px images"),
    (["--config.teacher.path="], "config.teacher.path is empty"),
    (["--config.codebook.decay=1.0"], "config.codebook.decay=1.0 must be in (0, 1)"),
  ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, extra, message):
  teacher = clip_teacher(str(tmp_path / "teacher"))
  workdir = tmp_path / "run"
  result = run_main(*TINY, f"--config.teacher.path={teacher}", *extra, f"--workdir={workdir}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_base_config_is_unilms_recipe():
  sys.path.insert(0, os.path.dirname(BASE))
  try:
    import vqkd_base

    c = vqkd_base.get_config()
  finally:
    sys.path.pop(0)
  assert c.total_steps == 250_200 and c.optim.warmup_steps == 25_020
  assert (c.optim.lr, c.optim.min_lr, c.optim.b2, c.optim.weight_decay) == (2e-4, 1e-5, 0.99, 1e-4)
  assert c.input.batch_size == 512 and tuple(c.input.crop_scale) == (0.08, 1.0)
  assert (c.model.num_codes, c.model.code_dim, c.codebook.decay) == (8192, 32, 0.99)
  assert vqkd.VARIANTS[c.model.variant] == ((768, 12, 12), (768, 3, 12))
