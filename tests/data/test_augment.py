"""Tests for beit_jax.data.augment (timm RandomErasing and the fine-tuning transform).

The references are the installed timm's own functions, driven by an adapter
(tests/data/timm_draws.py) that feeds them the draws augment.py makes from a numpy
Generator.
"""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm.data.random_erasing as timm_re
import torch
from PIL import Image
from timm.data.transforms_factory import transforms_imagenet_train

from beit_jax import pixels
from beit_jax.data import augment
from tests.data.timm_draws import Draws, patch_timm_random, photo


class _BoxRecorder:
  """Stands in for the image tensor in timm ``RandomErasing._erase``."""

  def __init__(self):
    self.boxes = []

  def __setitem__(self, key, value):
    _, ys, xs = key
    self.boxes.append((ys.start, xs.start, ys.stop - ys.start, xs.stop - xs.start))
    assert value.shape[0] == 3


# ----------------------------------------------------------------------------
# Random-erasing boxes.
# ----------------------------------------------------------------------------


def test_erase_box_statistics():
  sampler = augment.RandomErasingBoxes(0.25)
  rng = np.random.default_rng(0)
  boxes = np.stack([sampler(224, 224, rng) for _ in range(20000)])
  assert boxes.shape == (20000, 1, 4) and boxes.dtype == np.int32
  boxes = boxes[:, 0]
  has = boxes[:, 2] > 0
  assert abs(has.mean() - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 20000)
  assert np.all(boxes[~has] == 0)
  top, left, h, w = boxes[has].T
  assert np.all((h > 0) & (w > 0) & (h < 224) & (w < 224))
  assert np.all((top >= 0) & (left >= 0))
  assert np.all((top + h <= 224) & (left + w <= 224))
  assert (top + h == 224).any() and (top == 0).any()  # Inclusive randint.
  frac = h * w / 224**2
  assert frac.min() >= 0.019 and frac.max() <= 0.34
  assert frac.min() < 0.021 and frac.max() > 0.32
  aspect = h / w
  assert aspect.min() > 0.28 and aspect.max() < 1 / 0.28
  assert abs(np.mean(np.log(aspect))) < 0.02  # Symmetric in log aspect.


@pytest.mark.parametrize("height,width", [(224, 224), (31, 17), (8, 8), (5, 12)])
@pytest.mark.parametrize("min_count,max_count", [(1, 1), (1, 3), (2, 4)])
def test_erase_boxes_match_timm(height, width, min_count, max_count, monkeypatch):
  ours = augment.RandomErasingBoxes(0.7, min_count=min_count, max_count=max_count)
  theirs = timm_re.RandomErasing(
    0.7, mode="const", min_count=min_count, max_count=max_count, device="cpu"
  )
  placed = 0
  for seed in range(150):
    draws = Draws(seed)
    monkeypatch.setattr(timm_re, "random", draws)
    recorder = _BoxRecorder()
    theirs._erase(recorder, 3, height, width, torch.float32)
    rng = np.random.default_rng(seed)
    got = ours(height, width, rng)
    n = len(recorder.boxes)
    assert got.shape == (max_count, 4)
    assert [tuple(b) for b in got[:n].tolist()] == recorder.boxes, seed
    assert np.all(got[n:] == 0)
    assert rng.random() == draws.g.random()  # Same number of draws.
    placed += n
  assert placed > 50


# ----------------------------------------------------------------------------
# Device-side erasing.
# ----------------------------------------------------------------------------


def _box_union(boxes, height, width):
  mask = np.zeros((len(boxes), height, width), bool)
  for i, rows in enumerate(boxes):
    for top, left, h, w in rows:
      mask[i, top : top + h, left : left + w] = True
  return mask


_BOXES = np.array(
  [
    [[2, 3, 10, 20], [5, 10, 30, 30]],  # Overlapping.
    [[0, 0, 0, 0], [4, 4, 0, 9]],  # Nothing (an h = 0 box).
    [[0, 0, 40, 48], [0, 0, 0, 0]],  # The whole image.
    [[39, 47, 1, 1], [0, 20, 40, 1]],  # A corner pixel and a column.
  ],
  np.int32,
)


def test_apply_random_erasing_pixel():
  images = jnp.full((4, 40, 48, 3), 5.0, jnp.float32)
  fn = jax.jit(augment.apply_random_erasing, static_argnames="mode")
  out = np.asarray(fn(images, _BOXES, jax.random.key(0), mode="pixel"))
  assert out.shape == images.shape and out.dtype == np.float32
  union = _box_union(_BOXES, 40, 48)
  np.testing.assert_array_equal(np.any(out != 5.0, axis=-1), union)
  np.testing.assert_array_equal(np.all(out != 5.0, axis=-1), union)
  noise = out[union]  # (pixels, 3)
  assert noise.size > 5000
  assert abs(noise.mean()) < 0.05
  assert abs(noise.std() - 1) < 0.05
  assert abs(np.mean(np.abs(noise) < 1) - 0.6827) < 0.02
  assert abs(np.corrcoef(noise[:, 0], noise[:, 1])[0, 1]) < 0.05
  # Another key gives other noise.
  out2 = np.asarray(fn(images, _BOXES, jax.random.key(1), mode="pixel"))
  assert not np.any(out2[union] == out[union])


def test_apply_random_erasing_rand_and_const():
  images = jnp.full((4, 40, 48, 3), 5.0, jnp.float32)
  fn = jax.jit(augment.apply_random_erasing, static_argnames="mode")
  union = _box_union(_BOXES, 40, 48)
  out = np.asarray(fn(images, _BOXES, jax.random.key(0), mode="rand"))
  np.testing.assert_array_equal(np.any(out != 5.0, axis=-1), union)
  # Element 0: the second box is on top; each box one colour per channel.
  second = _box_union(_BOXES[:1, 1:], 40, 48)[0]
  first_only = _box_union(_BOXES[:1, :1], 40, 48)[0] & ~second
  c1, c0 = out[0][second], out[0][first_only]
  assert np.all(c1 == c1[0]) and np.all(c0 == c0[0])
  assert len(set(c1[0]) | set(c0[0])) == 6
  out = np.asarray(fn(images, _BOXES, jax.random.key(0), mode="const"))
  np.testing.assert_array_equal(
    out, np.broadcast_to(np.where(union[..., None], 0.0, 5.0), out.shape)
  )
  with pytest.raises(ValueError):
    augment.apply_random_erasing(images, _BOXES, jax.random.key(0), "foo")


# ----------------------------------------------------------------------------
# The fine-tuning transform.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "interp,re_count,auto_augment",
  [
    ("bicubic", 1, "rand-m9-mstd0.5-inc1"),  # BEiT's setting.
    ("random", 3, "rand-m9-mstd0.5-inc1"),
    ("bicubic", 2, None),  # No RandAugment, no colour jitter.
  ],
)
def test_finetune_transform_matches_timm(interp, re_count, auto_augment, monkeypatch):
  image = photo()
  size = 64
  ours = augment.FinetuneTrainTransform(
    size,
    interpolation=interp,
    auto_augment=auto_augment,
    color_jitter=0.4 if auto_augment else None,
    re_prob=0.6,
    re_count=re_count,
  )
  primary, secondary, final = transforms_imagenet_train(
    size,
    hflip=0.5,
    color_jitter=0.4 if auto_augment else None,
    auto_augment=auto_augment,
    interpolation=interp,
    mean=pixels.IMAGENET_MEAN,
    std=pixels.IMAGENET_STD,
    re_prob=0.6,
    re_mode="pixel",
    re_count=re_count,
    separate=True,
  )
  erasing = final.transforms[-1]
  assert isinstance(erasing, timm_re.RandomErasing)
  boxes = 0
  for seed in range(30):
    draws = Draws(seed)
    patch_timm_random(monkeypatch, draws)
    want = secondary(primary(Image.fromarray(image)))
    recorder = _BoxRecorder()
    erasing._erase(recorder, 3, size, size, torch.float32)
    rng = np.random.default_rng(seed)
    out = ours(image, rng)
    np.testing.assert_array_equal(out["image"], np.asarray(want), err_msg=f"seed {seed}")
    n = len(recorder.boxes)
    assert [tuple(b) for b in out["erase_boxes"][:n].tolist()] == (recorder.boxes)
    assert np.all(out["erase_boxes"][n:] == 0)
    assert rng.random() == draws.g.random()
    boxes += n > 0
  assert 5 < boxes < 30


def test_finetune_transform_output_and_determinism():
  image = photo()
  t = augment.FinetuneTrainTransform(96)
  assert t.output_keys() == ("image", "erase_boxes")
  a = t(image, np.random.default_rng(7))
  b = t(image, np.random.default_rng(7))
  c = t(image, np.random.default_rng(8))
  assert set(a) == set(t.output_keys())
  assert a["image"].dtype == np.uint8 and a["image"].shape == (96, 96, 3)
  assert a["erase_boxes"].dtype == np.int32
  assert a["erase_boxes"].shape == (1, 4)
  assert a["image"].flags.c_contiguous
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["erase_boxes"], b["erase_boxes"])
  assert not np.array_equal(a["image"], c["image"])
  # Picklable for Grain workers, and the copy draws the same.
  t2 = pickle.loads(pickle.dumps(t))
  np.testing.assert_array_equal(t2(image, np.random.default_rng(7))["image"], a["image"])


def test_finetune_transform_options():
  image = photo()
  # Erasing draws come last: re_prob 0 keeps the image and gives zero boxes.
  on = augment.FinetuneTrainTransform(64, re_prob=1.0, re_count=2)
  off = augment.FinetuneTrainTransform(64, re_prob=0.0, re_count=2)
  for seed in range(5):
    a = on(image, np.random.default_rng(seed))
    b = off(image, np.random.default_rng(seed))
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["erase_boxes"][0, 2] > 0
    assert b["erase_boxes"].shape == (2, 4) and not b["erase_boxes"].any()
  # Without RandAugment the colour jitter runs (and only then).
  plain = augment.FinetuneTrainTransform(64, auto_augment="", color_jitter=None, re_prob=0)
  jitter = augment.FinetuneTrainTransform(64, auto_augment=None, color_jitter=0.4, re_prob=0)
  assert plain.rand_augment is None and plain.jitter is None
  assert jitter.jitter is not None and jitter.jitter.enabled
  assert on.jitter is None and on.rand_augment is not None
  differ = sum(
    not np.array_equal(
      plain(image, np.random.default_rng(s))["image"],
      jitter(image, np.random.default_rng(s))["image"],
    )
    for s in range(5)
  )
  assert differ == 5
  with pytest.raises(ValueError):
    augment.FinetuneTrainTransform(64, auto_augment="original-mstd0.5")
  with pytest.raises(ValueError):
    augment.FinetuneTrainTransform(64, re_mode="foo")
