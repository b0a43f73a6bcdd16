"""The drawings: right size, content that follows the input."""

import numpy as np
import pytest

from beit_jax.data import masking
from beit_jax.viz import figures


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


def test_token_map_and_codebook_follow_the_ids():
  ids = np.array([[0, 1], [1, 7]])
  out = figures.token_map(ids, 8, cell=4)
  assert out.shape == (8, 8, 3)
  np.testing.assert_array_equal(out[0, 4], out[4, 0])  # Same id, same colour.
  assert (out[0, 0] != out[0, 4]).any() and (out[4, 4] != out[0, 4]).any()
  assert len({tuple(c) for c in figures.token_colours(256)}) == 256
  a, b = figures.codebook_figure(ids, 8), figures.codebook_figure(np.zeros_like(ids), 8)
  assert a.shape == b.shape == (160, 512, 3) and (a != b).any()


def test_curves_from_metrics_records():
  records = [{"step": s, "loss": 7.0 / s, "lr": 1e-3} for s in range(1, 11)]
  fig = figures.curves_figure(records)
  # Two panels side by side (loss, lr), 900 px wide, drawn by matplotlib.
  assert fig.shape == (320, 900, 3) and fig.dtype == np.uint8
  assert (figures.curves_figure(records[:5]) != fig).any()
  with_eval = figures.curves_figure(records, [{"step": 10, "loss": 0.5}])
  assert with_eval.shape == fig.shape and (with_eval != fig).any()
  # Eval-only keys get a panel too; three panels take two rows.
  evals = [{"step": 1, "psnr": 20.0}]
  assert figures.curves_figure(records, evals, keys=("psnr",)).shape == (320, 900, 3)
  assert figures.curves_figure(records, evals, keys=("loss", "lr", "psnr")).shape == (580, 900, 3)
  with pytest.raises(ValueError, match="None of"):
    figures.curves_figure(records, keys=("mlm_acc",))


def test_titled_adds_a_band_with_title_and_caption():
  image = np.full((40, 60, 3), 7, np.uint8)
  out = figures.titled(image, "Masks", "The ViT's view with the masked patches grey.")
  assert out.shape[0] == 40 + 34 and out.shape[1] > 60  # Widened to fit the caption.
  np.testing.assert_array_equal(out[34:, :60], image)
  band = out[:34]
  assert (band == 255).mean() > 0.8 and (band < 128).any()  # White, with dark text.


def test_png_and_metrics_on_a_bucket(fake_gcs):
  image = np.zeros((8, 8, 3), np.uint8)
  out = figures.save_png(image, fake_gcs.url("run/pictures/x.png"))
  assert out == "gs://fake-bucket/run/pictures/x.png" and fake_gcs.keys() == ["run/pictures/x.png"]
  with open(fake_gcs.local("run/metrics.jsonl"), "w") as f:
    f.write('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 1, "split": "eval"}\n')
  assert figures.read_metrics(fake_gcs.url("run/metrics.jsonl")) == [
    {"step": 1, "split": "train", "loss": 2.0}
  ]
