"""Fine-tuning: the step learns (with and without mixup) and is traced once; bad configs
stop before anything is written; the CLI saves, evaluates, keeps the best and resumes;
a converted unilm checkpoint at another resolution fine-tunes."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from beit_jax import config_lib, exports
from beit_jax.convert import beit as convert_beit
from beit_jax.data import mixup
from beit_jax.models import vit
from beit_jax.tasks import finetune
from beit_jax.training import mesh as mesh_lib
from beit_jax.training import optim
from beit_jax.training.train_state import TrainState, init_sharded

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = os.path.join(ROOT, "configs", "finetune_small.py")
TINY = [
  "--config.model.variant=test",
  "--config.input.image_size=32",
  "--config.eval_batch_size=8",
  "--config.log_every=2",
  "--config.ckpt.every=2",
  "--config.ckpt.async_save=False",
  "--config.tensorboard=False",
]


def run_main(*args, devices=8):
  env = dict(
    os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu"
  )
  return subprocess.run(
    [sys.executable, "-m", "beit_jax.main", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def tiny_step(config, num_classes=4, seed=0):
  mesh = mesh_lib.make_mesh(config.mesh)
  model = vit.classifier_model("test", num_classes, image_size=16, patch_size=4)
  lr_fn = optim.warmup_cosine(config.optim.lr, 0.0, 1000, 0)
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 16, 16, 3)))["params"]
  scales = optim.layerwise_lr_scales(params, config.optim.layer_decay, model.depth)
  tx = optim.make_optimizer(config.optim, lr_fn, wd_skip=model.no_weight_decay(), lr_scales=scales)
  state, state_sh = init_sharded(
    lambda: TrainState.create(params, tx, jax.random.PRNGKey(1), use_ema=config.ema_decay > 0), mesh
  )
  batch_sh, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  step = jax.jit(
    finetune.make_train_step(model, tx, lr_fn, config, num_classes),
    in_shardings=(state_sh, batch_sh, repl),
    out_shardings=(state_sh, repl),
    donate_argnums=(0,),
  )
  return state, step, batch_sh


def class_batch(n=16, num_classes=4, seed=0):
  """Each class a distinct colour with noise: learnable in a few steps."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n, dtype=np.int32) % num_classes
  colours = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220], [220, 220, 40]])
  images = colours[labels][:, None, None, :] + rng.normal(0, 20, (n, 16, 16, 3))
  return dict(
    image=np.clip(images, 0, 255).astype(np.uint8),
    label=labels,
    erase_boxes=np.zeros((n, 1, 4), np.int32),
  )


@pytest.mark.parametrize("use_mixup", [False, True])
def test_step_learns_and_is_traced_once(use_mixup):
  config = config_lib.load_config_file(SMALL)
  config.optim.lr = 3e-3
  config.mixup.prob = 1.0 if use_mixup else 0.0
  config.ema_decay = 0.9
  config.model.drop_path_rate = 0.0
  state, step, batch_sh = tiny_step(config)
  host = class_batch()
  batch = mesh_lib.global_batch(host, batch_sh)
  sampler = mixup.MixupSampler(mixup_alpha=0.8, cutmix_alpha=1.0, image_size=16, legacy_bbox=True)
  losses = []
  for i in range(40):  # Mixup and cutmix draws alternate: the same compiled step.
    mix = sampler.sample_step(0, i) if use_mixup else None
    state, metrics = step(state, batch, mix)
    losses.append(float(metrics["loss"]))
  # ln 4 = 1.39 at init; mixed soft targets have an entropy floor, so compare differences.
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
  # The EMA moved towards the params but is not equal to them.
  p, e = state.params["head"]["kernel"], state.ema_params["head"]["kernel"]
  assert 0 < float(jnp.max(jnp.abs(p - e)))
  if not use_mixup:
    assert float(metrics["train_top1"]) == 1.0


def test_random_erasing_reaches_the_model():
  """A box covering the whole image replaces it with noise: the gradients change (the
  0.001-scaled head makes the loss at init ln 4 whatever the input)."""
  config = config_lib.load_config_file(SMALL)
  config.model.drop_path_rate = 0.0
  config.optim.lr = 0.0
  host = class_batch()
  state, step, batch_sh = tiny_step(config)
  _, clean = step(state, mesh_lib.global_batch(host, batch_sh), None)
  erased = dict(host, erase_boxes=np.tile(np.array([[[0, 0, 16, 16]]], np.int32), (16, 1, 1)))
  state, step, batch_sh = tiny_step(config)
  _, noisy = step(state, mesh_lib.global_batch(erased, batch_sh), None)
  a, b = float(clean["grad_norm"]), float(noisy["grad_norm"])
  assert abs(a - b) > 0.05 * a, (a, b)


def test_bad_settings_stop_before_anything_is_written(tmp_path):
  workdir = tmp_path / "run"
  result = run_main(
    f"--config={SMALL}", f"--workdir={workdir}", "--config.optim.layer_decay=0", devices=1
  )
  assert result.returncode != 0 and "layer_decay" in result.stderr
  result = run_main(
    f"--config={SMALL}",
    f"--workdir={workdir}",
    f"--config.pretrained={tmp_path / 'nothing'}",
    devices=1,
  )
  assert result.returncode != 0 and "is not a params export" in result.stderr
  result = run_main(
    f"--config={SMALL}", f"--workdir={workdir}", "--config.input.auto_augment=rand-x9", devices=1
  )
  assert result.returncode != 0
  assert not workdir.exists()


def test_cli_saves_evaluates_keeps_best_and_resumes(tmp_path):
  workdir = str(tmp_path / "ft")
  common = [
    f"--config={SMALL}:steps=4,batch_size=8",
    f"--workdir={workdir}",
    *TINY,
    "--config.eval_every=2",
    "--config.mixup.prob=1.0",
  ]
  result = run_main(*common)
  assert result.returncode == 0, result.stderr[-3000:]
  evals = records(workdir, "eval") + records(workdir, "final_eval")
  assert [r["step"] for r in evals] == [2, 4]
  for r in evals:
    assert 0 <= r["top1"] <= r["top5"] <= 1 and r["num_images"] == 18
  best = json.load(open(os.path.join(workdir, "export", "best", "metadata.json")))
  assert best["eval"]["top1"] == max(r["top1"] for r in evals)
  assert best["kind"] == exports.CLASSIFIER and best["num_classes"] == 18
  # Resume: the same command with more steps continues from step 4.
  result = run_main(*[c.replace("steps=4", "steps=6") for c in common])
  assert result.returncode == 0, result.stderr[-3000:]
  train_steps = [r["step"] for r in records(workdir, "train")]
  assert train_steps == [2, 4, 6], train_steps
  model, params, meta = exports.load_classifier(os.path.join(workdir, "export", "final"))
  assert meta["step"] == 6 and model.num_classes == 18
  logits = model.apply({"params": params}, jnp.zeros((2, 32, 32, 3)), method=vit.BEiT.classify)
  assert logits.shape == (2, 18)


def test_fine_tunes_a_converted_unilm_checkpoint_at_a_new_resolution(tmp_path):
  # A unilm-layout MIM checkpoint (shared rel-pos, 32 px / patch 8 -> 4x4), random weights.
  mim = vit.mim_model("test", image_size=32, patch_size=8, vocab_size=64)
  params = mim.init(jax.random.PRNGKey(3), jnp.zeros((1, 32, 32, 3)))["params"]
  params = jax.tree.map(
    lambda x: x + 0.02 * jax.random.normal(jax.random.PRNGKey(4), x.shape), params
  )
  sd = convert_beit.flax_to_unilm(params)
  torch.save(
    {"model": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}, tmp_path / "mim.pth"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "beit_jax.convert",
      "beit",
      str(tmp_path / "mim.pth"),
      str(tmp_path / "converted"),
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  # Fine-tune at 48 px (6x6 grid): shared table -> every block, resized 4x4 -> 6x6.
  workdir = str(tmp_path / "ft")
  result = run_main(
    f"--config={SMALL}:steps=2,batch_size=8",
    f"--workdir={workdir}",
    *TINY,
    "--config.input.image_size=48",
    f"--config.pretrained={tmp_path / 'converted'}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  meta = json.load(open(os.path.join(workdir, "export", "final", "metadata.json")))
  report = meta["pretrained_report"]
  assert "blocks_1/attn/relative_position_bias_table" in report["resized"]
  assert "blocks_0/attn/qkv/kernel" in report["loaded"]
  assert {"head/kernel", "fc_norm/scale"} <= set(report["kept_from_init"])
  assert "lm_head/kernel" in report["dropped"]
  assert meta["model_kwargs"]["image_size"] == 48 and meta["model_kwargs"]["use_rel_pos_bias"]


@pytest.mark.parametrize(
  "arg, expected",
  [
    ("", dict(lr=4e-3, layer_decay=0.65, drop_path=0.1, batch=1024, mixup=1.0, crop=224 / 256)),
    (
      "variant=large",
      dict(lr=1e-3, layer_decay=0.75, drop_path=0.2, batch=1024, mixup=1.0, crop=224 / 256),
    ),
    (
      "setting=ft22k,image_size=384",
      dict(lr=2e-5, layer_decay=0.85, drop_path=0.1, batch=512, mixup=0.0, crop=1.0),
    ),
    (
      "variant=large,setting=ft22k",
      dict(lr=2e-5, layer_decay=0.9, drop_path=0.4, batch=512, mixup=0.0, crop=224 / 256),
    ),
  ],
)
def test_paper_recipes_are_valid_configs(arg, expected):
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", "finetune_base.py"), arg)
  got = dict(
    lr=config.optim.lr,
    layer_decay=config.optim.layer_decay,
    drop_path=config.model.drop_path_rate,
    batch=config.input.batch_size,
    mixup=config.mixup.prob,
    crop=config.input.eval_crop_pct,
  )
  assert got == expected
  assert config.input.auto_augment == "rand-m9-mstd0.5-inc1" and config.input.reprob == 0.25
  assert config.label_smoothing == 0.1 and config.optim.min_lr == 1e-6
  config.data = config_lib.data_config()  # Built-in photos: the checks run without ImageNet.
  finetune.check_config(config)
