"""Linear probing: per-block probes learn exactly their own block's features, k-NN votes
right, the frozen backbone stays frozen, and the CLI reports every block."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from beit_jax import exports
from beit_jax.models import vit
from beit_jax.tasks import linear_probe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = os.path.join(ROOT, "configs", "linear_probe_small.py")


def separable_features(n=256, dim=16, num_classes=5, seed=0):
  """Block 0: well separated class clusters; block 1: noise carrying no label."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  centres = rng.normal(0, 4, (num_classes, dim))
  informative = centres[labels] + rng.normal(0, 0.5, (n, dim))
  noise = rng.normal(0, 1, (n, dim))
  return jnp.asarray(np.stack([informative, noise]), jnp.float32), jnp.asarray(labels)


def test_each_probe_learns_its_own_block():
  feats, labels = separable_features()
  probes = linear_probe.init_probes(jax.random.PRNGKey(0), 2, 16, 5)
  assert float(jnp.std(probes["kernel"])) < 0.02 and not np.any(np.asarray(probes["bias"]))
  tx = optax.adamw(0.05, weight_decay=1e-4)
  opt_state = tx.init(probes)

  @jax.jit
  def step(probes, opt_state):
    grads, (per_block, logits) = jax.grad(linear_probe.probe_loss, has_aux=True)(
      probes, feats, labels
    )
    updates, opt_state = tx.update(grads, opt_state, probes)
    return optax.apply_updates(probes, updates), opt_state, logits

  for _ in range(150):
    probes, opt_state, logits = step(probes, opt_state)
  acc = np.mean(np.asarray(jnp.argmax(logits, -1)) == np.asarray(labels)[None], axis=1)
  assert acc[0] == 1.0, acc  # Linearly separable by construction.
  assert acc[1] < 0.6, acc  # Noise: only memorisation of 256 points in 16-d.
  # The gradient of block 1's probe does not depend on block 0's features.
  g = jax.grad(lambda p, f: linear_probe.probe_loss(p, f, labels)[0])
  g1 = g(probes, feats)
  g2 = g(probes, feats.at[0].set(0.0))
  np.testing.assert_allclose(g1["kernel"][1], g2["kernel"][1], atol=1e-6)


def test_knn_votes_for_the_nearest_class():
  train = jnp.asarray([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], jnp.float32)
  labels = jnp.asarray([0, 0, 1, 1])
  scores = linear_probe.knn_predict(
    train, labels, jnp.asarray([[1.0, 0.2], [0.1, 2.0]]), k=2, temperature=0.07, num_classes=2
  )
  np.testing.assert_array_equal(np.argmax(np.asarray(scores), -1), [0, 1])


def test_block_features_are_cls_and_patch_mean_of_raw_block_outputs():
  model = vit.classifier_model("test", 3, image_size=16, patch_size=4)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  feats = jax.jit(linear_probe.block_features, static_argnums=0)(model, params, images)
  _, layers = jax.jit(
    lambda p, x: model.apply({"params": p}, x, return_layers=True, method=vit.BEiT.encode)
  )(params, images)
  assert feats.shape == (model.depth, 2, 2 * model.embed_dim)
  for block, h in enumerate(layers):
    np.testing.assert_allclose(feats[block, :, : model.embed_dim], h[:, 0], atol=1e-6)
    np.testing.assert_allclose(feats[block, :, model.embed_dim :], h[:, 1:].mean(1), atol=1e-6)


def test_cli_reports_every_block_and_knn(tmp_path):
  workdir = str(tmp_path / "lp")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "beit_jax.main",
      f"--config={SMALL}:steps=4,batch_size=8",
      f"--workdir={workdir}",
      "--config.model.variant=test",
      "--config.input.image_size=32",
      "--config.eval_batch_size=8",
      "--config.log_every=2",
      "--config.ckpt.async_save=False",
      "--config.tensorboard=False",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    final = [r for r in map(json.loads, f) if r["split"] == "final_eval"][-1]
  depth = vit.VARIANTS["test"][1]
  tops = [final[f"top1_block_{block + 1}"] for block in range(depth)]
  assert final["best_layer"] == 1 + int(np.argmax(tops)) and final["best_top1"] == max(tops)
  assert final["num_images"] == 18 and 0 <= final["knn_top1"] <= 1
  meta = json.load(open(os.path.join(workdir, "export", "final", "metadata.json")))
  assert meta["kind"] == exports.LINEAR_PROBE and meta["eval"]["best_layer"] == final["best_layer"]
