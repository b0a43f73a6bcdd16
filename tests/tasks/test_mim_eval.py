"""The MIM eval's context-free baselines (beit_jax/tasks/mim_eval.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from beit_jax.models import dvae, vit
from beit_jax.tasks import mim_eval
from beit_jax.training import losses
from tests.tasks.test_pretrain_task import VOCAB, tiny_batch, tiny_tokenizer


def test_log_unigram_prior_is_add_one_smoothed():
  np.testing.assert_allclose(
    mim_eval.log_unigram_prior(np.array([3, 1, 0])), np.log(np.array([4, 2, 1]) / 7), rtol=1e-6
  )


def test_eval_step_scores_the_baselines_on_the_same_masked_tokens():
  model = vit.mim_model("test", image_size=16, patch_size=4, vocab_size=VOCAB)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  tokenizer, tok = tiny_tokenizer()
  batch = dict(tiny_batch(4), valid=np.array([True, True, True, False]))
  counts = np.random.default_rng(0).integers(0, 5, VOCAB)
  prior = mim_eval.log_unigram_prior(counts)
  step = jax.jit(mim_eval.make_eval_step(model, tokenizer, 6, "half"))
  sums = jax.device_get(step(params, batch, tok, prior))
  # The same masked tokens, by hand: the tokenizer's ids at the valid images' masked patches.
  ids = np.asarray(dvae.tokenize(tokenizer, tok, jnp.asarray(batch["tokenizer_image"]) / 255))
  targets = ids.reshape(4, -1)[batch["mask"] & batch["valid"][:, None]]
  assert sums["count"] == len(targets) > 0
  np.testing.assert_allclose(sums["unigram_loss_sum"], -prior[targets].sum(), rtol=1e-5)
  assert sums["frequent_correct"] == np.sum(targets == np.argmax(counts))
  # The histogram the prior is counted from: every position of the valid images.
  hist = jax.jit(mim_eval.make_token_histogram(tokenizer))(tok, batch)["counts"]
  np.testing.assert_array_equal(hist, np.bincount(ids[:3].ravel(), minlength=VOCAB))
  # The ViT's own sums are the masked-token loss of losses.masked_token_sums.
  mask = jnp.asarray(batch["mask"] & batch["valid"][:, None])
  positions, weights = losses.masked_positions(mask, 6)
  assert float(jnp.sum(weights)) == sums["count"]
