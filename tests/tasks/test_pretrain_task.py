"""The MIM step and the pretraining job: loss at init, overfitting, sharding invariance,
no retrace, config errors, the quick start's two stages, kill + resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

from beit_jax import config_lib, exports
from beit_jax.convert import __main__ as convert_cli
from beit_jax.models import dvae, vit
from beit_jax.tasks import mim_step, pretrain
from beit_jax.training import checkpointing, optim
from beit_jax.training import losses as losses_lib
from beit_jax.training import mesh as mesh_lib
from beit_jax.training.train_state import TrainState, init_sharded
from tests.models import torch_vqkd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = os.path.join(ROOT, "configs", "pretrain_small.py")
BASE = os.path.join(ROOT, "configs", "pretrain_base.py")
# Quick-start config shrunk for tests: ViT 32 px / patch 8 (4x4), tokenizer 16 px (4x4).
TINY = [
  "--config.input.batch_size=8",
  "--config.eval_batch_size=8",
  "--config.input.image_size=32",
  "--config.input.second_size=16",
  "--config.log_every=2",
  "--config.ckpt.every=2",
  "--config.ckpt.async_save=False",
  "--config.tensorboard=False",
  "--config.tokenizer.train.input.batch_size=8",
  "--config.tokenizer.train.input.image_size=16",
  "--config.tokenizer.train.eval_batch_size=8",
  "--config.tokenizer.train.model.hidden=16",
  "--config.tokenizer.train.model.codebook_dim=16",
  "--config.tokenizer.train.model.vocab_size=64",
  "--config.tokenizer.train.log_every=2",
  "--config.tokenizer.train.ckpt.async_save=False",
  "--config.tokenizer.train.tensorboard=False",
  "--config.pictures=False",
  "--config.tokenizer.train.pictures=False",
]
PICTURES = ["--config.pictures=True", "--config.tokenizer.train.pictures=True"]
VOCAB = 64


def run_main(*args, devices=8, wait=True, module="beit_jax.main", extra_env=None):
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    **(extra_env or {}),
  )
  cmd = [sys.executable, "-m", module, *args]
  if not wait:
    return subprocess.Popen(
      cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------------
# In-process pieces: a tiny ViT (16 px, patch 4 -> 4x4) and a tiny random dVAE (4x4).
# ----------------------------------------------------------------------------------
def tiny_tokenizer() -> tuple[dvae.DiscreteVAE, dict]:
  """A random compact dVAE for 16 px views (4x4 tokens of VOCAB) and its variables."""
  tokenizer = dvae.from_config(
    dict(
      arch="compact",
      vocab_size=VOCAB,
      recon_loss="mse",
      input_norm="half",
      num_layers=2,
      hidden=8,
      num_resblocks=0,
      codebook_dim=8,
    )
  )
  tok_params = tokenizer.init(
    jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)), rng=jax.random.PRNGKey(2), tau=1.0, hard=False
  )
  return tokenizer, tok_params


def tiny_setup(mesh, seed=0, lr=3e-3, drop_path=0.0, dtype=jnp.float32, min_shard_size=2**18):
  model = vit.mim_model(
    "test", image_size=16, patch_size=4, vocab_size=VOCAB, drop_path_rate=drop_path, dtype=dtype
  )
  tokenizer, tok_params = tiny_tokenizer()
  cfg = config_lib.adamw_config(lr=lr, weight_decay=0.05, clip_grad_norm=3.0)
  lr_fn = optim.warmup_cosine(lr, 1e-5, 1000, 0)
  tx = optim.make_optimizer(cfg, lr_fn, wd_skip=model.no_weight_decay())

  def init_fn():
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 16, 16, 3)))["params"]
    return TrainState.create(params, tx, jax.random.PRNGKey(seed + 1))

  state, state_sh = init_sharded(init_fn, mesh, min_shard_size)
  batch_sh, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  step = jax.jit(
    mim_step.make_train_step(model, tokenizer, tx, lr_fn, max_masked=6, input_norm="half"),
    in_shardings=(state_sh, batch_sh, jax.tree.map(lambda _: repl, tok_params)),
    out_shardings=(state_sh, repl),
    donate_argnums=(0,),
  )
  return state, step, tok_params, batch_sh


def tiny_batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
  mask = np.zeros((n, 16), bool)
  for i in range(n):
    mask[i, rng.choice(16, size=rng.integers(3, 7), replace=False)] = True
  return {"image": images, "tokenizer_image": images, "mask": mask}


def test_masked_positions_static_and_weighted():
  mask = jnp.array([[False, True, False, True, True], [False, False, False, False, True]])
  positions, weights = losses_lib.masked_positions(mask, 3)
  np.testing.assert_array_equal(positions, [[1, 3, 4], [4, 0, 1]])
  np.testing.assert_array_equal(weights, [[1, 1, 1], [1, 0, 0]])


def test_mim_loss_matches_direct_formula():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 3))
  weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  loss, acc = losses_lib.masked_token_loss(
    jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights)
  )
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = [(0, 0), (0, 1), (1, 0)]
  expected = -np.mean([logp[b, k, targets[b, k]] for b, k in picked])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  expected_acc = np.mean([logits[b, k].argmax() == targets[b, k] for b, k in picked])
  np.testing.assert_allclose(acc, expected_acc)


@pytest.mark.parametrize("loss_on", ["masked", "all"])
def test_loss_on_masked_or_every_patch_matches_the_direct_formula(loss_on):
  """config.loss_on (paper Table 4): the cross-entropy over the masked patches' tokens, or
  over every patch's, from the same masked input."""
  model = vit.mim_model("test", image_size=16, patch_size=4, vocab_size=VOCAB)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  tx = optim.make_optimizer(config_lib.adamw_config(lr=1e-3), optim.warmup_cosine(1e-3, 0, 10, 0))
  state = TrainState.create(params, tx, jax.random.PRNGKey(1))
  batch = tiny_batch(4)
  ids = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, (4, 16)), jnp.int32)
  update = jax.jit(mim_step.make_mim_update(model, tx, lambda s: 1e-3, 6, "half", loss_on=loss_on))
  _, metrics = update(state, batch["image"], batch["mask"], ids)
  positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (4, 16))
  logits = model.apply(
    {"params": params},
    (jnp.asarray(batch["image"], jnp.float32) / 255 - 0.5) / 0.5,
    jnp.asarray(batch["mask"]),
    positions,
    method=vit.BEiT.mim_logits,
  )
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  nll = -np.take_along_axis(logp, np.asarray(ids)[..., None], -1)[..., 0]
  chosen = batch["mask"] if loss_on == "masked" else np.ones((4, 16), bool)
  np.testing.assert_allclose(metrics["loss"], nll[chosen].mean(), rtol=1e-4)
  np.testing.assert_allclose(metrics["masked_per_image"], batch["mask"].sum(1).mean())
  with pytest.raises(ValueError, match="loss_on must be one of"):
    mim_step.make_mim_update(model, tx, lambda s: 1e-3, 6, "half", loss_on="some")


def test_loss_at_init_is_log_vocab_and_overfits_a_few_images():
  mesh = mesh_lib.make_mesh(config_lib.mesh_config())
  state, step, tok_params, batch_sh = tiny_setup(mesh)
  batch = mesh_lib.global_batch(tiny_batch(), batch_sh)
  state, metrics = step(state, batch, tok_params)
  first = float(metrics["loss"])
  assert abs(first - math.log(VOCAB)) < 0.5, first
  assert 0 < float(metrics["masked_per_image"]) <= 6
  for _ in range(150):
    # Synced every step: with 8 fake devices on a loaded 2-core machine, XLA:CPU can
    # deadlock when many multi-device steps are in flight (an all-reduce waits for a
    # device whose work is queued behind blocked pool threads).
    state, metrics = jax.block_until_ready(step(state, batch, tok_params))
  last, acc = float(metrics["loss"]), float(metrics["mlm_acc"])
  assert last < 0.3 * math.log(VOCAB), (first, last)
  assert acc > 0.8, acc
  assert int(state.step) == 151


def _two_steps(mesh_shape, batch_np, min_shard_size=0):
  data, fsdp = mesh_shape
  devices = jax.devices()[: data * fsdp]
  mesh = mesh_lib.make_mesh(config_lib.mesh_config(data, fsdp), devices=devices)
  state, step, tok_params, batch_sh = tiny_setup(mesh, drop_path=0.1, min_shard_size=min_shard_size)
  for _ in range(2):
    state, metrics = step(state, mesh_lib.global_batch(batch_np, batch_sh), tok_params)
  return state, jax.device_get(metrics)


def test_step_same_on_every_mesh_as_on_1_device():
  """FSDP (every leaf of >= 64 elements split over 'fsdp') and data parallelism give the
  single-device result."""
  batch_np = tiny_batch(seed=3)
  ref_state, ref = _two_steps((1, 1), batch_np)
  ref_params = jax.device_get(ref_state.params)
  for shape in ((8, 1), (2, 4), (1, 8)):
    state, metrics = _two_steps(shape, batch_np, min_shard_size=64)
    fc1 = state.params["blocks_0"]["mlp"]["fc1"]["kernel"]  # (32, 128): 128 splits.
    expected = P() if shape[1] == 1 else P(None, "fsdp")
    assert fc1.sharding.spec == expected, (shape, fc1.sharding.spec)
    assert state.params["blocks_0"]["norm1"]["scale"].sharding.spec == P()  # 32 < 64.
    if shape[1] > 1:  # Adam moments follow their params.
      mu = state.opt_state[1][0].mu["blocks_0"]["mlp"]["fc1"]["kernel"]
      assert mu.sharding.spec == P(None, "fsdp")
    np.testing.assert_allclose(metrics["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref["grad_norm"], rtol=1e-4)
    # Params after two AdamW steps (lr 3e-3): Adam's normalisation amplifies
    # reduction-order differences of near-zero gradients, so compare at 2% of one step.
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=6e-5),
      jax.device_get(state.params),
      ref_params,
    )


def test_checkpoint_from_2x4_resumes_on_1_device_and_on_8x1(tmp_path):
  batch_np = tiny_batch(seed=4)
  state, _ = _two_steps((2, 4), batch_np, min_shard_size=64)
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", save_interval_steps=1)
  ckpt.save(2, state, force=True)
  ckpt.wait()
  losses = {}
  for shape in ((1, 1), (8, 1)):
    mesh = mesh_lib.make_mesh(
      config_lib.mesh_config(*shape), devices=jax.devices()[: shape[0] * shape[1]]
    )
    fresh, step, tok_params, batch_sh = tiny_setup(mesh, seed=9)
    shardings = jax.tree.map(lambda x: x.sharding, fresh)
    restored = ckpt.restore_latest(fresh, shardings)
    assert int(restored.step) == 2
    np.testing.assert_array_equal(
      np.asarray(restored.params["lm_head"]["kernel"]),
      np.asarray(state.params["lm_head"]["kernel"]),
    )
    restored, metrics = step(restored, mesh_lib.global_batch(batch_np, batch_sh), tok_params)
    assert int(restored.step) == 3
    losses[shape] = float(metrics["loss"])
  ckpt.close()
  assert abs(losses[(1, 1)] - losses[(8, 1)]) < 1e-5, losses


def test_no_retrace_across_steps():
  mesh = mesh_lib.make_mesh(config_lib.mesh_config())
  state, step, tok_params, batch_sh = tiny_setup(mesh)
  for seed in range(4):  # New data each step (including a different mask count).
    state, _ = step(state, mesh_lib.global_batch(tiny_batch(seed=seed), batch_sh), tok_params)
  assert step._cache_size() == 1


def test_bfloat16_step_matches_float32_at_init():
  mesh = mesh_lib.make_mesh(config_lib.mesh_config(), devices=jax.devices()[:1])
  losses = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    state, step, tok_params, batch_sh = tiny_setup(mesh, dtype=dtype)
    state, metrics = step(state, mesh_lib.global_batch(tiny_batch(), batch_sh), tok_params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    losses[dtype] = float(metrics["loss"])
  assert losses[jnp.float32] != losses[jnp.bfloat16]
  assert abs(losses[jnp.float32] - losses[jnp.bfloat16]) < 0.02, losses


@pytest.mark.parametrize("kind", ["blockwise", "random"])
def test_transforms_make_two_views_and_masks(kind):
  c = load(SMALL)
  c.mask.kind = kind
  train, evaluation, max_masked = pretrain.make_transforms(c)
  assert max_masked == 24  # round(64 * 75 / 196) for the 8x8 grid.
  image = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
  counts = []
  for seed in range(50):
    out = train(image, np.random.default_rng(seed))
    assert out["image"].shape == (64, 64, 3) and out["tokenizer_image"].shape == (32, 32, 3)
    assert out["mask"].shape == (64,) and out["mask"].dtype == bool
    counts.append(int(out["mask"].sum()))
  assert max(counts) <= 24 and (kind == "blockwise" or min(counts) == 24)
  first = evaluation(image, np.random.default_rng(7))
  again = evaluation(image, np.random.default_rng(7))
  for key in ("image", "tokenizer_image", "mask"):
    np.testing.assert_array_equal(first[key], again[key])


def test_weight_decay_follows_unilm_no_weight_decay():
  model = vit.mim_model("test", image_size=16, patch_size=4, vocab_size=VOCAB, use_abs_pos_emb=True)
  mask = optim.weight_decay_mask(vit.abstract_params(model), model.no_weight_decay())
  assert mask["mask_token"] and mask["rel_pos_bias"]["relative_position_bias_table"]
  assert not mask["cls_token"] and not mask["pos_embed"]
  assert not mask["blocks_0"]["attn"]["q_bias"] and not mask["blocks_0"]["gamma_1"]
  assert mask["blocks_0"]["attn"]["qkv"]["kernel"] and not mask["lm_head"]["bias"]


# ----------------------------------------------------------------------------------
# Configs and the job.
# ----------------------------------------------------------------------------------
def load(path, arg=None):
  return config_lib.load_config_file(path, arg)


def test_base_config_is_the_paper_recipe():
  c = load(BASE)
  assert c.total_steps == 800 * 625 and c.optim.warmup_steps == 10 * 625
  assert (c.input.batch_size, c.optim.lr, c.optim.min_lr, c.optim.clip_grad_norm) == (
    2048,
    1.5e-3,
    1e-5,
    3.0,
  )
  assert (c.model.drop_path_rate, c.model.init_values, c.optim.weight_decay) == (0.1, 0.1, 0.05)
  assert (c.input.image_size, c.input.second_size, c.model.patch_size) == (224, 112, 16)
  assert pretrain.mask_counts(c) == (75, 16)
  assert c.data.name == "imagenet2012" and c.model.use_shared_rel_pos_bias
  large = load(os.path.join(ROOT, "configs", "pretrain_large.py"))
  assert large.model.variant == "large" and large.model.init_values == 1e-5
  assert large.optim.clip_grad_norm == 1.0


def test_main_job_without_imagenet_or_tokenizer_says_what_to_do(tmp_path):
  workdir = tmp_path / "run"
  result = run_main(
    f"--config={BASE}",
    f"--workdir={workdir}",
    f"--config.data.data_dir={tmp_path / 'no_tfds'}",
    devices=1,
  )
  assert result.returncode != 0
  assert "config.tokenizer.path is empty" in result.stderr
  assert "imagenet2012" in result.stderr and "tfds build" in result.stderr
  assert "configs/pretrain_small.py" in result.stderr
  assert not workdir.exists()


@pytest.mark.parametrize(
  "override,message",
  [
    ("--config.input.image_size=36", "not divisible by config.model.patch_size"),
    ("--config.mask.num_patches=17", "exceeds the 4x4=16 patches"),
    ("--config.model.patch_size=4", "token grid but the ViT has"),
    ("--config.input.second_size=32", "trained on 16 px views"),
    ("--config.model.vocab_size=100", "config.model.vocab_size=100 but the tokenizer"),
    ("--config.tokenizer.path=/nonexistent", "is not a tokenizer export"),
    ("--config.mask.min_patches=9", "config.mask.min_patches=9 is above"),
    ("--config.input.batch_size=6", "batch_size=6 is not divisible by the 8 devices"),
  ],
)
def test_bad_settings_rejected_before_anything_is_written(tmp_path, override, message):
  workdir = tmp_path / "run"
  result = run_main(
    f"--config={SMALL}:steps=2",
    f"--workdir={workdir}",
    *TINY,
    override,
    devices=8 if "batch_size" in override else 1,
  )
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert not workdir.exists()


def test_quick_start_two_stages_then_kill_and_resume(tmp_path):
  workdir = str(tmp_path / "run")
  first = run_main(
    f"--config={SMALL}:steps=4,tokenizer_steps=2,variant=test",
    f"--workdir={workdir}",
    *TINY,
    *PICTURES,
  )
  assert first.returncode == 0, first.stderr[-3000:]
  assert os.path.exists(os.path.join(workdir, "tokenizer", "export", "tokenizer", "metadata.json"))
  assert "Stage 2/2" in first.stderr
  # Each stage ends with its summary; the MIM one puts the ViT beside the context-free
  # baselines (the final eval records them too).
  assert first.stderr.count("Summary:") == 2
  assert "for the training tokens' frequencies; mlm_acc" in first.stderr
  assert f"Export: {workdir}/export/beit" in first.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [2, 4]
  for key in ("loss", "mlm_acc", "grad_norm", "lr", "masked_per_image", "images_per_s"):
    assert np.isfinite(train[-1][key]), key
  assert abs(train[0]["loss"] - math.log(VOCAB)) < 1.0
  final = [r for r in records if r["split"] == "final_eval"]
  assert final and final[0]["num_images"] == 18 and 0 <= final[0]["mlm_acc"] <= 1
  assert 0 < final[0]["frequent_acc"] < 1 and 0 < final[0]["unigram_loss"] < math.log(VOCAB)
  assert abs(final[0]["loss"] - math.log(VOCAB)) < 1.5
  model, params, meta = exports.load_pretrained(os.path.join(workdir, "export", "beit"))
  assert meta["step"] == 4 and model.vocab_size == VOCAB and model.image_size == 32
  assert params["lm_head"]["kernel"].shape == (32, VOCAB)
  # The run draws what it learned (beit_jax/viz.py) into its workdir.
  pictures = os.path.join(workdir, "pictures")
  assert sorted(os.listdir(pictures)) == sorted(
    f"{n}.png"
    for n in ("masks", "reconstructions", "inpainting", "tokens", "codebook", "attention", "curves")
  )
  assert all(os.path.getsize(os.path.join(pictures, f)) > 500 for f in os.listdir(pictures))
  assert sorted(os.listdir(os.path.join(workdir, "tokenizer", "pictures"))) == sorted(
    f"{n}.png" for n in ("reconstructions", "tokens", "codebook", "curves")
  )
  # The README's Python snippets run against this export (as runs/pretrain_small).
  readme = open(os.path.join(ROOT, "README.md")).read()
  section = readme.split("## Using the exports from Python")[1].split("\n## ")[0]
  snippets = [block.split("```")[0] for block in section.split("```python\n")[1:]]
  assert len(snippets) >= 2
  os.makedirs(tmp_path / "api" / "runs")
  os.symlink(workdir, tmp_path / "api" / "runs" / "pretrain_small")
  cwd = os.getcwd()
  os.chdir(tmp_path / "api")
  try:
    for snippet in snippets:
      scope = {}
      exec(compile(snippet, "README.md", "exec"), scope)
  finally:
    os.chdir(cwd)
  assert scope["recon"].shape[-1] == 3

  # Kill a longer run after its first new checkpoint; the rerun resumes from it.
  proc = run_main(
    f"--config={SMALL}:steps=400,tokenizer_steps=2,variant=test",
    f"--workdir={workdir}",
    *TINY,
    wait=False,
  )
  ckpt_dir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    steps = [int(s) for s in os.listdir(ckpt_dir) if s.isdigit()]
    if max(steps) >= 8:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = max(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  assert 8 <= saved < 400
  resumed = run_main(
    f"--config={SMALL}:steps={saved + 2},tokenizer_steps=2,variant=test",
    f"--workdir={workdir}",
    *TINY,
  )
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Using the tokenizer already trained" in resumed.stderr
  assert f"at step {saved}" in resumed.stderr
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps[-1] == saved + 2


def test_pretraining_on_a_vqkd_tokenizers_targets(tmp_path):
  """BEiT v2's targets: a converted unilm VQ-KD tokenizer (tiny, random; 32 px -> 4x4 codes
  of 64) tokenizes the ViT's own 32 px view (second_size = image_size); the job trains on
  its codes, evaluates against their unigram baseline, exports, and draws the pictures that
  need no pixel decoder (VQ-KD decodes to teacher features, not images)."""
  src, tok = str(tmp_path / "vqkd.pth"), str(tmp_path / "vqkd")
  torch.save({"model": torch_vqkd.random_model(seed=5).unilm_state_dict()}, src)
  convert_cli.main(["vqkd", src, tok, "--encoder_heads=2", "--decoder_heads=2"])
  workdir = str(tmp_path / "run")
  tiny = [a for a in TINY if not a.startswith(("--config.input.second_size", "--config.pictures"))]
  run = run_main(
    f"--config={SMALL}:steps=2,variant=test",
    f"--workdir={workdir}",
    *tiny,
    f"--config.tokenizer.path={tok}",
    "--config.input.second_size=32",
    "--config.pictures=True",
  )
  assert run.returncode == 0, run.stderr[-3000:]
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [2] and abs(train[0]["loss"] - math.log(64)) < 1.0
  final = [r for r in records if r["split"] == "final_eval"][0]
  assert 0 < final["unigram_loss"] < math.log(64) and 0 <= final["mlm_acc"] <= 1
  model, _, meta = exports.load_pretrained(os.path.join(workdir, "export", "beit"))
  assert model.vocab_size == 64 and meta["tokenizer"] == tok
  assert sorted(os.listdir(os.path.join(workdir, "pictures"))) == sorted(
    f"{n}.png" for n in ("masks", "tokens", "codebook", "attention", "curves")
  )
