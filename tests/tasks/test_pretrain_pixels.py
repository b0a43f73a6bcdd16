"""`config.target='pixels'` (paper Table 4's pixel regression): the target, the L2 loss
against a direct formula, learning, and the job end to end without any tokenizer."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beit_jax import config_lib, exports
from beit_jax.models import vit
from beit_jax.tasks import mim_step
from beit_jax.training import losses, optim
from beit_jax.training.train_state import TrainState
from tests.tasks.test_pretrain_task import SMALL, TINY, run_main, tiny_batch

PIXELS = 4 * 4 * 3  # The head of a patch-4 ViT regresses 48 values per patch.


def test_patch_targets_are_the_patches_in_token_order_normalised_per_patch():
  image = np.arange(8 * 8 * 3, dtype=np.float32).reshape(1, 8, 8, 3) ** 1.5
  image[0, 4:, :4] = 7.0  # Patch 2 (second row, first column) is flat.
  patches = np.asarray(vit.patchify(jnp.asarray(image), 4))
  assert patches.shape == (1, 4, 48)
  np.testing.assert_array_equal(patches[0, 1], image[0, :4, 4:].reshape(-1))
  np.testing.assert_array_equal(patches[0, 3], image[0, 4:, 4:].reshape(-1))
  target = np.asarray(losses.normalized_patch_pixels(jnp.asarray(image), 4))
  for k in (0, 1, 3):
    p = patches[0, k].astype(np.float64)
    np.testing.assert_allclose(target[0, k], (p - p.mean()) / np.sqrt(p.var() + 1e-6), rtol=1e-4)
  np.testing.assert_array_equal(target[0, 2], np.zeros(48))


def _state_and_update(target, loss_on="masked", lr=1e-3):
  model = vit.mim_model("test", image_size=16, patch_size=4, vocab_size=PIXELS)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  lr_fn = optim.warmup_cosine(lr, 1e-5, 1000, 0)
  tx = optim.make_optimizer(config_lib.adamw_config(lr=lr, weight_decay=0.05), lr_fn)
  state = TrainState.create(params, tx, jax.random.PRNGKey(1))
  update = mim_step.make_mim_update(model, tx, lr_fn, 6, "half", loss_on=loss_on, target=target)
  return model, params, state, jax.jit(update)


@pytest.mark.parametrize("loss_on", ["masked", "all"])
def test_pixel_loss_is_the_mse_of_the_chosen_patches(loss_on):
  model, params, state, update = _state_and_update("pixels", loss_on)
  batch = tiny_batch(4)
  _, metrics = update(state, batch["image"], batch["mask"], None)
  assert "mlm_acc" not in metrics
  images = (jnp.asarray(batch["image"], jnp.float32) / 255 - 0.5) / 0.5
  positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (4, 16))
  predictions = np.asarray(
    model.apply(
      {"params": params}, images, jnp.asarray(batch["mask"]), positions, method=vit.BEiT.mim_logits
    ),
    np.float64,
  )
  patches = np.asarray(images, np.float64).reshape(4, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(4, 16, 48)
  targets = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(
    patches.var(-1, keepdims=True) + 1e-6
  )
  per_patch = np.mean((predictions - targets) ** 2, axis=-1)
  chosen = batch["mask"] if loss_on == "masked" else np.ones((4, 16), bool)
  np.testing.assert_allclose(metrics["loss"], per_patch[chosen].mean(), rtol=1e-4)
  with pytest.raises(ValueError, match="target must be one of"):
    tx = optim.make_optimizer(config_lib.adamw_config(), 1e-3)
    mim_step.make_mim_update(model, tx, lambda s: 1e-3, 6, "half", target="depth")


def test_pixel_regression_learns_the_masked_patches_of_a_few_images():
  """From the masked input alone, the ViT's L2 loss falls far below 1 (the loss of
  painting each patch its own mean colour) on 8 images it trains on."""
  _, _, state, update = _state_and_update("pixels", lr=3e-3)
  rng = np.random.default_rng(0)
  smooth = rng.integers(0, 256, (8, 4, 4, 3)).astype(np.float32)
  images = np.repeat(np.repeat(smooth, 4, 1), 4, 2)  # Smooth-ish images, 16 px.
  images = (images + rng.normal(0, 20, images.shape)).clip(0, 255).astype(np.uint8)
  mask = tiny_batch(8)["mask"]
  losses_seen = []
  for _ in range(120):
    state, metrics = update(state, images, mask, None)
    losses_seen.append(metrics["loss"])
  first, last = float(losses_seen[0]), float(losses_seen[-1])
  assert first > 0.9, first  # At init the head outputs ~0: the mean-colour baseline.
  assert last < 0.5 * first, (first, last)


def test_pixel_target_job_runs_without_a_tokenizer(tmp_path):
  """The quick-start config with target=pixels: no tokenizer is trained or read, the eval
  reports the L2 loss beside the mean-colour baseline, the export says what it is, and
  fine-tuning's loader takes its backbone (lm_head of 8*8*3 dropped)."""
  workdir = str(tmp_path / "run")
  result = run_main(
    f"--config={SMALL}:steps=4,variant=test",
    f"--workdir={workdir}",
    *TINY,
    "--config.target=pixels",
    "--config.tokenizer.path=",
    devices=1,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, "tokenizer"))
  assert "pixel-regression target" in result.stderr
  assert "for each patch painted its own mean colour" in result.stderr
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  final = [r for r in records if r["split"] == "final_eval"][-1]
  assert final["num_images"] == 18 and "mlm_acc" not in final
  assert 0.8 < final["patch_mean_loss"] <= 1.0, final  # ~1 after per-patch normalisation.
  assert 0 < final["loss"] < 3 * final["patch_mean_loss"], final
  export = os.path.join(workdir, "export", "beit")
  model, params, meta = exports.load_pretrained(export)
  assert meta["target"] == "pixels" and meta["tokenizer"] == ""
  assert params["lm_head"]["kernel"].shape == (32, 8 * 8 * 3)
  viz = run_main(f"--export={export}", devices=1, module="beit_jax.viz")
  assert viz.returncode != 0 and "config.target='pixels'" in viz.stderr


@pytest.mark.parametrize(
  "override,message",
  [
    ("--config.target=depth", "config.target"),
    ("--config.model.vocab_size=64", "set it to 0"),
  ],
)
def test_bad_pixel_settings_rejected(tmp_path, override, message):
  result = run_main(
    f"--config={SMALL}:steps=2",
    f"--workdir={tmp_path / 'run'}",
    *TINY,
    "--config.target=pixels",
    override,
    devices=1,
  )
  assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "run").exists()
