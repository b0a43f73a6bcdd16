"""The pictures: right size, content that follows the input, and the inpainting identity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beit_jax.data import masking
from beit_jax.models import dvae, vit
from beit_jax.viz import __main__ as viz_cli
from beit_jax.viz import figures, pictures


def _images(n=2, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), np.uint8)


def test_mask_overlay_is_grey_exactly_where_the_mask_is_true():
  image = _images(1)[0]
  mask = np.zeros(16, bool)
  mask[[0, 5, 15]] = True  # 4x4 grid of 8 px patches.
  out = figures.mask_overlay(image, mask, 8)
  pixel_mask = np.kron(mask.reshape(4, 4), np.ones((8, 8), bool))
  assert out.shape == image.shape and out.dtype == np.uint8
  assert (out[pixel_mask] == figures.GREY).all()
  np.testing.assert_array_equal(out[~pixel_mask], image[~pixel_mask])
  gen = masking.BlockwiseMaskGenerator(4, 6, 2)
  fig = figures.masks_figure(_images(2), 8, gen, per_image=3)
  assert fig.ndim == 3 and fig.shape[1] > 4 * 32 and fig.shape[0] > 2 * 32


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


def test_token_map_and_codebook_follow_the_ids():
  ids = np.array([[0, 1], [1, 7]])
  out = figures.token_map(ids, 8, cell=4)
  assert out.shape == (8, 8, 3)
  np.testing.assert_array_equal(out[0, 4], out[4, 0])  # Same id, same colour.
  assert (out[0, 0] != out[0, 4]).any() and (out[4, 4] != out[0, 4]).any()
  assert len({tuple(c) for c in figures.token_colours(256)}) == 256
  a, b = figures.codebook_figure(ids, 8), figures.codebook_figure(np.zeros_like(ids), 8)
  assert a.shape == b.shape == (160, 512, 3) and (a != b).any()


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


def test_curves_from_metrics_records():
  records = [{"step": s, "loss": 7.0 / s, "lr": 1e-3} for s in range(1, 11)]
  fig = figures.curves_figure(records)
  assert fig.shape[0] > 100 and fig.dtype == np.uint8
  assert (figures.curves_figure(records[:5]) != fig).any()
  with pytest.raises(ValueError, match="None of"):
    figures.curves_figure(records, keys=("mlm_acc",))


def test_cli_without_an_export_says_what_to_run(tmp_path):
  with pytest.raises(SystemExit, match="run the quick start first"):
    viz_cli.main([f"--workdir={tmp_path}"])


def test_pictures_go_into_tensorboard(tmp_path):
  from beit_jax.training import metrics

  metrics.write_images(str(tmp_path), 7, {"masks": _images(1)[0]})
  events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert len(events) == 1 and b"pictures/masks" in events[0].read_bytes()
