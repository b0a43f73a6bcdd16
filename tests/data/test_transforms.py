"""Tests for beit_jax.data.transforms."""

import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from beit_jax.data import transforms


def _position_image(height: int = 96, width: int = 128) -> np.ndarray:
  """R encodes x, G encodes y (linear ramps), B is constant."""
  ys, xs = np.mgrid[0:height, 0:width]
  img = np.zeros((height, width, 3), np.uint8)
  img[..., 0] = np.round(xs * 255.0 / (width - 1))
  img[..., 1] = np.round(ys * 255.0 / (height - 1))
  img[..., 2] = 128
  return img


def _noise_image(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------
# Two views share one crop box and one flip.
# ----------------------------------------------------------------------------


def test_two_views_come_from_same_box_and_flip():
  img = _position_image()
  t = transforms.TwoViewTransform(
    64, 32, interpolation="bicubic", second_interpolation="lanczos", color_jitter=0.0, flip_prob=0.5
  )
  flips = 0
  num_seeds = 60
  for seed in range(num_seeds):
    out = t(img, np.random.default_rng(seed))
    view = out["image"].astype(np.float64)
    tok = out["tokenizer_image"].astype(np.float64)
    assert out["image"].shape == (64, 64, 3)
    assert out["tokenizer_image"].shape == (32, 32, 3)
    assert out["image"].dtype == np.uint8
    assert out["tokenizer_image"].dtype == np.uint8
    # The ViT view, 2x2-average-pooled, is the tokenizer view (same content).
    pooled = view.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(pooled - tok).mean() < 2.0, seed
    # Corners and centre agree (interior pixels, away from resampling edges).
    for y, x in [(2, 2), (2, 29), (29, 2), (29, 29), (16, 16)]:
      np.testing.assert_allclose(pooled[y, x, :2], tok[y, x, :2], atol=6)
    # Flip direction agrees: R increases left->right unless flipped.
    view_flipped = view[16, 60, 0] < view[16, 3, 0]
    tok_flipped = tok[16, 30, 0] < tok[16, 1, 0]
    assert view_flipped == tok_flipped, seed
    # G (y) always increases downwards (no vertical flip).
    assert view[60, 32, 1] > view[3, 32, 1]
    flips += int(view_flipped)
  # ~50% flips: Binomial(60, .5) is within [15, 45] with prob > 0.9999.
  assert 15 <= flips <= 45


def test_two_view_matches_reference_composition():
  """Draw order jitter -> flip -> box, crop then PIL resize, exactly."""
  img = _noise_image(1, 50, 70)
  t = transforms.TwoViewTransform(
    24,
    12,
    scale=(0.2, 1.0),
    interpolation="bicubic",
    second_interpolation="lanczos",
    color_jitter=0.4,
    flip_prob=0.5,
  )
  for seed in range(20):
    out = t(img, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    pil = Image.fromarray(img)
    order = rng.permutation(4)
    factors = [rng.uniform(0.6, 1.4) for _ in range(3)]
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    for op in order:
      if op < 3:
        pil = enhancers[op](pil).enhance(factors[op])
    if rng.random() < 0.5:
      pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top, left, h, w = transforms.random_resized_crop_box(pil.height, pil.width, rng, (0.2, 1.0))
    crop = pil.crop((left, top, left + w, top + h))
    np.testing.assert_array_equal(out["image"], np.asarray(crop.resize((24, 24), Image.BICUBIC)))
    np.testing.assert_array_equal(
      out["tokenizer_image"], np.asarray(crop.resize((12, 12), Image.LANCZOS))
    )


_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def _reference_two_views(t, image, rng):
  """unilm's DataAugmentationForBEiT as PIL runs it: jitter the whole image, flip the
  whole image, then crop and resize (the algorithm before the crop-first shortcut)."""
  pil = Image.fromarray(image)
  if t.jitter.enabled:
    order, factors = t.jitter.get_params(rng)
    for op in order:
      if op < 3 and factors[op] is not None:
        pil = _ENHANCERS[op](pil).enhance(factors[op])
  if rng.random() < t.flip_prob:
    pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  top, left, h, w = transforms.random_resized_crop_box(pil.height, pil.width, rng, t.scale, t.ratio)
  crop = pil.crop((left, top, left + w, top + h))
  return {
    "image": np.asarray(crop.resize((t.size, t.size), t.interpolation)),
    "tokenizer_image": np.asarray(crop.resize((t.second_size,) * 2, t.second_interpolation)),
  }


def _photo_like_image(seed: int, height: int, width: int) -> np.ndarray:
  """Smooth colour ramps with noise, dark and bright areas (so jitter clips)."""
  rng = np.random.default_rng(seed)
  ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
  base = np.stack([xs, ys, 1 - xs * ys], axis=-1) * rng.uniform(150, 330, 3)
  return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("jitter", [0.4, 0.9])
def test_two_view_bit_identical_to_jittering_the_whole_image(jitter):
  """The crop-first shortcut (jitter and flip only the crop, the contrast grey from
  the whole image's luma histogram) gives PIL's whole-image results byte for byte:
  every order of the three ops, flips, boxes touching the edges, whole-image boxes
  (scale up to 1 on a near-square image) and clipping factors (jitter 0.9)."""
  t = transforms.TwoViewTransform(32, 16, scale=(0.05, 1.0), color_jitter=jitter)
  orders, flips = set(), 0
  for seed in range(120):
    image = _photo_like_image(seed, 40 + seed % 7, 44 + (seed * 5) % 23)
    out = t(image, np.random.default_rng(seed))
    ref = _reference_two_views(t, image, np.random.default_rng(seed))
    for key in ("image", "tokenizer_image"):
      np.testing.assert_array_equal(out[key], ref[key], err_msg=f"seed {seed} {key}")
    rng = np.random.default_rng(seed)
    order, _ = t.jitter.get_params(rng)
    orders.add(tuple(o for o in order if o < 3))
    flips += rng.random() < 0.5
  assert len(orders) == 6 and 30 < flips < 90


def test_jittered_crop_is_the_crop_of_the_jittered_image():
  img = Image.fromarray(_photo_like_image(0, 30, 41))
  boxes = [(0, 0, 30, 41), (0, 0, 5, 7), (25, 34, 5, 7), (3, 0, 20, 41), (0, 9, 30, 11)]
  for order in ([0, 1, 2, 3], [1, 0, 3, 2], [2, 0, 1, 3], [3, 2, 1, 0], [0, 2, 1, 3]):
    for factors in ([1.35, 0.62, 1.3], [0.7, 1.4, None], [None, 1.2, 0.65]):
      whole = img
      for op in order:
        if op < 3 and factors[op] is not None:
          whole = _ENHANCERS[op](whole).enhance(factors[op])
      for top, left, h, w in boxes:
        crop = transforms.ColorJitter.jittered_crop(img, (top, left, h, w), order, factors)
        expected = whole.crop((left, top, left + w, top + h))
        np.testing.assert_array_equal(np.asarray(crop), np.asarray(expected))


def test_two_view_without_second_size_and_single_view():
  img = _noise_image(2)
  out = transforms.TwoViewTransform(16, None)(img, np.random.default_rng(0))
  assert set(out) == {"image"}
  single = transforms.SingleViewTransform(20, key="tokenizer_image")
  out = single(img, np.random.default_rng(0))
  assert set(out) == {"tokenizer_image"}
  assert out["tokenizer_image"].shape == (20, 20, 3)
  assert out["tokenizer_image"].dtype == np.uint8
  # Same seed -> same output; the rng is the only source of randomness.
  again = single(img, np.random.default_rng(0))
  np.testing.assert_array_equal(out["tokenizer_image"], again["tokenizer_image"])


def test_transforms_do_not_use_global_random_state():
  img = _noise_image(3)
  t = transforms.TwoViewTransform(16, 8)
  np.random.seed(0)
  a = t(img, np.random.default_rng(5))
  np.random.seed(123)
  b = t(img, np.random.default_rng(5))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_interpolation_names():
  for name in ("bicubic", "bilinear", "lanczos", "nearest", "box", "hamming"):
    transforms.pil_interpolation(name)
  assert transforms.pil_interpolation("lanczos") == Image.Resampling.LANCZOS
  with pytest.raises(ValueError, match="interpolation"):
    transforms.pil_interpolation("area")


# ----------------------------------------------------------------------------
# random_resized_crop_box.
# ----------------------------------------------------------------------------


def test_crop_box_statistics_large_image():
  rng = np.random.default_rng(0)
  height, width = 1000, 1200
  areas, ratios = [], []
  for _ in range(2000):
    top, left, h, w = transforms.random_resized_crop_box(height, width, rng)
    assert 0 <= top and top + h <= height
    assert 0 <= left and left + w <= width
    areas.append(h * w / (height * width))
    ratios.append(w / h)
  areas, ratios = np.array(areas), np.array(ratios)
  assert areas.min() >= 0.08 - 0.002 and areas.max() <= 1.0
  assert ratios.min() >= 0.75 - 0.01 and ratios.max() <= 4 / 3 + 0.01
  # Uniform area on [0.08, 1] minus some rejections of large boxes.
  assert 0.45 < areas.mean() < 0.56
  assert (areas < 0.2).mean() > 0.08
  # log-uniform ratio: median close to 1.
  assert abs(np.median(np.log(ratios))) < 0.05


@pytest.mark.parametrize(
  "height,width,expected",
  [
    (10, 1000, (0, 493, 10, 13)),  # very wide: h = H, w = round(H * 4/3)
    (1000, 10, (493, 0, 13, 10)),  # very tall: w = W, h = round(W / 3/4)
  ],
)
def test_crop_box_fallback_extreme_aspect(height, width, expected):
  rng = np.random.default_rng(0)
  for _ in range(20):
    assert transforms.random_resized_crop_box(height, width, rng) == expected


def test_crop_box_fallback_whole_image_when_ratio_in_range():
  # scale > 1 can never fit: fallback; a 30x36 image has ratio 1.2 in range.
  box = transforms.random_resized_crop_box(30, 36, np.random.default_rng(0), scale=(1.5, 2.0))
  assert box == (0, 0, 30, 36)


class _ScriptedRng:
  """Replays a fixed stream of U[0, 1) draws through numpy's Generator API."""

  def __init__(self, draws):
    self._draws = list(draws)
    self.used = 0

  def _next(self):
    u = self._draws[self.used]
    self.used += 1
    return u

  def uniform(self, low, high):
    return low + self._next() * (high - low)

  def integers(self, low, high):  # [low, high)
    return low + int(math.floor(self._next() * (high - low)))


def _torchvision_get_params(width, height, scale, ratio, uniform, randint):
  """torchvision.transforms.RandomResizedCrop.get_params, verbatim logic."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * uniform(scale[0], scale[1])
    aspect_ratio = math.exp(uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      i = randint(0, height - h)  # inclusive, like random.randint
      j = randint(0, width - w)
      return i, j, h, w
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w = width
    h = height
  i = (height - h) // 2
  j = (width - w) // 2
  return i, j, h, w


def test_crop_box_matches_torchvision_algorithm_on_same_draws():
  stream_rng = np.random.default_rng(42)
  sizes = [(224, 224), (300, 500), (500, 300), (40, 37), (20, 90), (7, 5)]
  scales = [(0.08, 1.0), (0.5, 1.0), (0.9, 1.4)]
  for trial in range(600):
    height, width = sizes[trial % len(sizes)]
    scale = scales[trial % len(scales)]
    draws = stream_rng.random(40)
    ours_rng = _ScriptedRng(draws)
    ours = transforms.random_resized_crop_box(height, width, ours_rng, scale=scale)
    ref_rng = _ScriptedRng(draws)
    ref = _torchvision_get_params(
      width,
      height,
      scale,
      (3 / 4, 4 / 3),
      ref_rng.uniform,
      lambda a, b, rng=ref_rng: rng.integers(a, b + 1),
    )
    assert ours == ref, (trial, height, width, scale)
    assert ours_rng.used == ref_rng.used


# ----------------------------------------------------------------------------
# ColorJitter.
# ----------------------------------------------------------------------------


def test_color_jitter_equals_direct_pil_composition():
  img = _noise_image(4)
  cj = transforms.ColorJitter(0.4, 0.3, 0.2)
  orders = set()
  for seed in range(30):
    out = cj(img, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    order = [int(i) for i in rng.permutation(4)]
    b = rng.uniform(0.6, 1.4)
    c = rng.uniform(0.7, 1.3)
    s = rng.uniform(0.8, 1.2)
    assert 0.6 <= b <= 1.4 and 0.7 <= c <= 1.3 and 0.8 <= s <= 1.2
    orders.add(tuple(o for o in order if o < 3))
    pil = Image.fromarray(img)
    for op in order:
      if op == 0:
        pil = ImageEnhance.Brightness(pil).enhance(b)
      elif op == 1:
        pil = ImageEnhance.Contrast(pil).enhance(c)
      elif op == 2:
        pil = ImageEnhance.Color(pil).enhance(s)
    np.testing.assert_array_equal(out, np.asarray(pil))
  assert len(orders) >= 4  # the order is re-drawn each call


def test_color_jitter_order_matters():
  """Sanity check that the permuted order is observable (not a no-op)."""
  img = _noise_image(5)
  pil = Image.fromarray(img)
  bc = ImageEnhance.Contrast(ImageEnhance.Brightness(pil).enhance(1.4)).enhance(0.6)
  cb = ImageEnhance.Brightness(ImageEnhance.Contrast(pil).enhance(0.6)).enhance(1.4)
  a = transforms.ColorJitter.apply(pil, [0, 1, 2, 3], [1.4, 0.6, None])
  b = transforms.ColorJitter.apply(pil, [1, 3, 0, 2], [1.4, 0.6, None])
  np.testing.assert_array_equal(np.asarray(a), np.asarray(bc))
  np.testing.assert_array_equal(np.asarray(b), np.asarray(cb))
  assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_color_jitter_zero_is_identity_and_draws_nothing():
  img = _noise_image(6)
  rng = np.random.default_rng(0)
  state = rng.bit_generator.state
  out = transforms.ColorJitter(0.0, 0.0, 0.0)(img, rng)
  np.testing.assert_array_equal(out, img)
  assert rng.bit_generator.state == state
  _, factors = transforms.ColorJitter(0.4, 0.0, 0.0).get_params(rng)
  assert factors[0] is not None and factors[1] is None and factors[2] is None


def test_color_jitter_factor_ranges():
  cj = transforms.ColorJitter(1.5, 0.4, 0.1)
  assert cj.ranges == ((0.0, 2.5), (0.6, 1.4), (0.9, 1.1))
  rng = np.random.default_rng(0)
  draws = np.array([cj.get_params(rng)[1] for _ in range(500)])
  assert draws[:, 0].min() >= 0.0 and draws[:, 0].min() < 0.05
  assert draws[:, 0].max() <= 2.5 and draws[:, 0].max() > 2.4
  assert draws[:, 1].min() >= 0.6 and draws[:, 1].max() <= 1.4


# ----------------------------------------------------------------------------
# CenterCropTransform.
# ----------------------------------------------------------------------------


def test_center_crop_transform_matches_timm_eval():
  img = _noise_image(7, 305, 200)  # H=305, W=200
  t = transforms.CenterCropTransform(64, key="image", interpolation="bicubic", crop_pct=0.875)
  out = t(img)["image"]
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  # Short side 200 -> int(64 / .875) = 73, long 305 -> int(73 * 305 / 200).
  resized = Image.fromarray(img).resize((73, 111), Image.BICUBIC)
  # torchvision CenterCrop: int(round(23.5)) = 24 (not 23), int(round(4.5)) = 4.
  top, left = 24, 4
  expected = np.asarray(resized.crop((left, top, left + 64, top + 64)))
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(t(img, np.random.default_rng(3))["image"], out)


def test_center_crop_crop_pct_one_keeps_full_short_side():
  img = _position_image(40, 80)
  out = transforms.CenterCropTransform(40, interpolation="nearest")(img)
  # No resize (short side already 40); centre 40 columns of 80.
  np.testing.assert_array_equal(out["image"], img[:, 20:60])


def test_parallel_views_merges_center_crops():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  views = transforms.ParallelViews(
    transforms.CenterCropTransform(32, key="image"),
    transforms.CenterCropTransform(16, key="tokenizer_image", interpolation="lanczos"),
  )
  out = views(image)
  assert views.output_keys() == ("image", "tokenizer_image")
  np.testing.assert_array_equal(out["image"], transforms.CenterCropTransform(32)(image)["image"])
  assert out["tokenizer_image"].shape == (16, 16, 3)
  with pytest.raises(ValueError, match="colliding"):
    transforms.ParallelViews(transforms.CenterCropTransform(32), transforms.CenterCropTransform(16))
