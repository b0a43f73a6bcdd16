"""The pictures fed from a model: the inpainting identity, attention maps, TensorBoard."""

import jax
import jax.numpy as jnp
import numpy as np

from beit_jax.models import dvae, vit
from beit_jax.training import metrics
from beit_jax.viz import figures, pictures


def _images(n=2, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), np.uint8)


def test_inpainting_with_the_true_tokens_everywhere_is_the_reconstruction():
  tok = dvae.from_config(
    dict(
      arch="compact",
      vocab_size=32,
      recon_loss="mse",
      input_norm="half",
      num_layers=2,
      hidden=8,
      num_resblocks=0,
      codebook_dim=8,
    )
  )
  tok_vars = tok.init(
    jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), rng=jax.random.PRNGKey(1), tau=1.0, hard=False
  )
  views = _images(2, 16)
  true_ids = pictures.tokenize(tok, tok_vars, views)
  assert true_ids.shape == (2, 4, 4)
  other = (true_ids + 1) % 32
  none = np.zeros((2, 16), bool)
  np.testing.assert_array_equal(pictures.inpainted_ids(true_ids, other, none), true_ids)
  np.testing.assert_array_equal(
    pictures.decode_ids(tok, tok_vars, pictures.inpainted_ids(true_ids, other, none)),
    pictures.decode_ids(tok, tok_vars, true_ids),
  )
  some = none.copy()
  some[0, 3] = True
  mixed = pictures.inpainted_ids(true_ids, other, some)
  assert mixed[0, 0, 3] == other[0, 0, 3] and (mixed[1] == true_ids[1]).all()
  fig = figures.reconstructions_figure(views, pictures.decode_ids(tok, tok_vars, true_ids))
  assert fig.shape[1] > 4 * 16
  assert figures.psnr(views[0], views[0]) == float("inf") and figures.psnr(views[0], views[1]) < 20


def test_cls_attention_maps_per_head():
  model = vit.mim_model("test", image_size=32, patch_size=8, vocab_size=16)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  # Random (not the zero-init) rel-pos table so the maps differ between images.
  maps = pictures.cls_attention(model, params, _images(2), "half")
  heads = vit.VARIANTS["test"][2]
  assert maps.shape == (2, heads, 4, 4)
  assert (maps >= 0).all() and (maps.sum((2, 3)) < 1.0).all()  # The rest is on cls itself.
  assert not np.allclose(maps[0], maps[1])
  fig = figures.attention_figure(_images(2), maps)
  assert fig.shape[1] > (1 + heads) * 32


def test_pictures_go_into_tensorboard(tmp_path):
  metrics.write_images(str(tmp_path), 7, {"masks": _images(1)[0]})
  events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert len(events) == 1 and b"pictures/masks" in events[0].read_bytes()
