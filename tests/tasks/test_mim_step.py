"""beit_jax.tasks.mim_step with BEiT v2's patch aggregation, and the v2 pretraining job:
the step's loss is the sum of the two heads' cross-entropies (unilm `loss_1 + loss_2`),
both heads learn, the job on a VQ-KD export exports a plain BEiT while its checkpoints keep
the extra blocks (a resume needs them), and the v2 configs are unilm's PRETRAINING.md rows."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from beit_jax import config_lib, exports
from beit_jax.convert import __main__ as convert_cli
from beit_jax.models import beit_v2, vit
from beit_jax.tasks import mim_step, pretrain
from beit_jax.training import optim
from beit_jax.training.train_state import TrainState
from tests.models import torch_vqkd
from tests.tasks.kill import kill_after_first_checkpoint
from tests.tasks.test_pretrain_task import ROOT, TINY, VOCAB, run_main, tiny_batch

V2_BASE = os.path.join(ROOT, "configs", "pretrain_v2_base.py")
V2_SMALL = os.path.join(ROOT, "configs", "pretrain_v2_small.py")


def _v2_state(lr=3e-3):
  model = beit_v2.mim_model(
    "test", image_size=16, patch_size=4, vocab_size=VOCAB, early_layers=1, drop_path_rate=0.0
  )
  params = mim_step.init_params(model, jax.random.PRNGKey(0))
  tx = optim.make_optimizer(config_lib.adamw_config(lr=lr), optim.warmup_cosine(lr, 0, 1000, 0))
  return model, tx, TrainState.create(params, tx, jax.random.PRNGKey(1))


def _nll(logits, ids, chosen):
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  nll = -np.take_along_axis(logp, np.asarray(ids)[..., None], -1)[..., 0]
  return nll[chosen].mean()


def test_v2_loss_is_the_sum_of_both_heads_cross_entropies_and_both_learn():
  model, tx, state = _v2_state()
  batch = tiny_batch(4)
  ids = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, (4, 16)), jnp.int32)
  update = jax.jit(mim_step.make_mim_update(model, tx, lambda s: 3e-3, 16, "half"))
  params0 = jax.device_get(state.params)
  positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (4, 16))
  logits, cls_pt_logits = model.apply(
    {"params": params0},
    (jnp.asarray(batch["image"], jnp.float32) / 255 - 0.5) / 0.5,
    jnp.asarray(batch["mask"]),
    positions,
    method=beit_v2.BEiTv2.mim_logits,
  )
  want_mim = _nll(logits, ids, batch["mask"])
  want_cls_pt = _nll(cls_pt_logits, ids, batch["mask"])
  assert abs(want_mim - want_cls_pt) > 1e-3  # two different heads
  state, metrics = update(state, batch["image"], batch["mask"], ids)
  np.testing.assert_allclose(metrics["mim_loss"], want_mim, rtol=1e-4)
  np.testing.assert_allclose(metrics["cls_pt_loss"], want_cls_pt, rtol=1e-4)
  np.testing.assert_allclose(metrics["loss"], want_mim + want_cls_pt, rtol=1e-5)
  assert abs(float(metrics["loss"]) - 2 * math.log(VOCAB)) < 1.0
  # The extra blocks get gradients (they moved), the last block too.
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, params0)
  assert moved["cls_pt_layers_1"]["mlp"]["fc2"]["kernel"] > 1e-4
  assert moved["blocks_1"]["attn"]["qkv"]["kernel"] > 1e-4
  for _ in range(150):
    state, metrics = update(state, batch["image"], batch["mask"], ids)
  assert float(metrics["mim_loss"]) < 0.3 * want_mim, metrics
  assert float(metrics["cls_pt_loss"]) < 0.3 * want_cls_pt, metrics
  assert float(metrics["mlm_acc"]) > 0.8 and float(metrics["cls_pt_acc"]) > 0.8, metrics


def test_v2_model_with_pixel_targets_is_refused():
  model, tx, _ = _v2_state()
  with pytest.raises(ValueError, match="patch aggregation predicts tokens"):
    mim_step.make_mim_update(model, tx, lambda s: 1e-3, 6, "half", target="pixels")


def test_make_model_builds_v2_only_when_asked_and_backbone_is_a_plain_beit():
  c = config_lib.load_config_file(V2_BASE)
  m = dict(c.model, variant="test")
  v2 = mim_step.make_model(dict(m, early_layers=1), 32, 64)
  assert isinstance(v2, beit_v2.BEiTv2) and v2.early_layers == 1 and v2.head_layers == 2
  assert type(mim_step.make_model(dict(m, patch_aggregation=False), 32, 64)) is vit.BEiT
  params = mim_step.init_params(v2, jax.random.PRNGKey(0))
  plain, plain_params = mim_step.backbone(v2, params)
  assert type(plain) is vit.BEiT and type(mim_step.eval_model(v2)) is vit.BEiT
  assert sorted(params) == sorted([*plain_params, "cls_pt_layers_0", "cls_pt_layers_1"])


def test_v2_base_config_is_unilms_pretraining_rows():
  c = config_lib.load_config_file(V2_BASE)
  # The 1600-epoch Base row: batch 128 x 16, 625 steps per epoch of ImageNet-1k.
  assert c.total_steps == 1600 * 625 and c.optim.warmup_steps == 10 * 625
  assert (c.optim.lr, c.optim.min_lr, c.optim.b1, c.optim.b2, c.optim.eps) == (
    1.5e-3,
    1e-5,
    0.9,
    0.999,
    1e-8,
  )
  assert (c.optim.weight_decay, c.optim.clip_grad_norm, c.input.batch_size) == (0.05, 3.0, 2048)
  assert (c.model.drop_path_rate, c.model.init_values) == (0.1, 0.1)
  assert c.model.patch_aggregation and (c.model.early_layers, c.model.head_layers) == (9, 2)
  assert c.model.use_shared_rel_pos_bias and not c.model.use_abs_pos_emb
  assert (c.input.second_size, c.input.second_interpolation) == (224, "bicubic")
  assert c.input.crop_scale == (0.2, 1.0) and c.input.norm == "imagenet"
  assert pretrain.mask_counts(c) == (75, 16) and c.mask.kind == "blockwise"
  short = config_lib.load_config_file(V2_BASE, "schedule=300")
  assert short.total_steps == 300 * 625 and short.optim.b2 == 0.98
  assert short.model.drop_path_rate == 0.0
  large = config_lib.load_config_file(V2_BASE, "variant=large")
  assert (large.model.variant, large.model.early_layers, large.model.init_values) == (
    "large",
    21,
    1e-5,
  )
  assert large.optim.clip_grad_norm == 3.0
  with pytest.raises(ValueError, match="not one of unilm's rows"):
    config_lib.load_config_file(V2_BASE, "schedule=800")


def test_v2_pretraining_on_a_vqkd_export_killed_resumes_bit_identically(tmp_path):
  """configs/pretrain_v2_small.py shrunk (32 px, patch 8 -> 4x4) on a converted tiny VQ-KD
  (32 px -> 4x4 codes of 64): both heads' losses are logged, the export is a plain BEiT,
  and a run killed after a checkpoint (which holds the extra blocks: the resume restores
  them) ends with the same export, bit for bit, as one that ran straight through."""
  src, tok = str(tmp_path / "vqkd.pth"), str(tmp_path / "vqkd")
  torch.save({"model": torch_vqkd.random_model(seed=5).unilm_state_dict()}, src)
  convert_cli.main(["vqkd", src, tok, "--encoder_heads=2", "--decoder_heads=2"])
  tiny = [a for a in TINY if not a.startswith(("--config.input.second_size", "--config.tok"))]
  args = [
    f"--config={V2_SMALL}:steps=12,variant=test",
    *tiny,
    f"--config.tokenizer.path={tok}",
    "--config.input.second_size=32",
    "--config.model.early_layers=1",
  ]
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  first = run_main(*args, f"--workdir={straight}")
  assert first.returncode == 0, first.stderr[-3000:]
  assert "BEiT v2-test masked image modeling with patch aggregation" in first.stderr
  records = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
  for r in train:
    np.testing.assert_allclose(r["loss"], r["mim_loss"] + r["cls_pt_loss"], rtol=1e-5)
  assert abs(train[0]["cls_pt_loss"] - math.log(64)) < 1.0
  model, params, meta = exports.load_pretrained(os.path.join(straight, "export", "beit"))
  assert type(model) is vit.BEiT and model.vocab_size == 64 and meta["tokenizer"] == tok
  assert not [k for k in params if k.startswith("cls_pt_layers_")] and "blocks_1" in params

  proc = run_main(*args, f"--workdir={killed}", wait=False)
  saved = kill_after_first_checkpoint(proc, os.path.join(killed, "checkpoints"))
  assert saved < 12, "the run ended before it could be killed"
  resumed = run_main(*args, f"--workdir={killed}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"at step {saved}" in resumed.stderr
  _, again, _ = exports.load_pretrained(os.path.join(killed, "export", "beit"))
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(early_layers=6), "config.model.early_layers=6 must be in 1..5"),
    (dict(early_layers=-1), "config.model.early_layers=-1"),
    (dict(head_layers=0), "config.model.head_layers=0"),
  ],
)
def test_bad_patch_aggregation_settings_are_refused_by_the_config_check(overrides, message):
  """Checked in `pretrain.check_config`, which the job runs before it compiles or writes
  anything (the CLI path is tests/tasks/test_pretrain_task.py's bad-settings test)."""
  config = config_lib.load_config_file(V2_SMALL)  # mini: 6 blocks
  config.model.update(overrides)
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    pretrain.check_config(config)
  pixels = config_lib.load_config_file(V2_SMALL)
  pixels.target = "pixels"
  with pytest.raises(ValueError, match="patch_aggregation=True predicts tokens"):
    pretrain.check_config(pixels)


def test_v2_config_without_a_tokenizer_says_how_to_get_a_vqkd():
  with pytest.raises(FileNotFoundError, match="a VQ-KD tokenizer: `python -m beit_jax.main"):
    pretrain.check_config(config_lib.load_config_file(V2_SMALL))
