"""Tests for beit_jax.data.masking (BEiT blockwise / random patch masks)."""

import math
import pickle
import random

import numpy as np
import pytest

from beit_jax.data import masking, pipeline, transforms

# ----------------------------------------------------------------------------
# Verbatim transcription of unilm beit/masking_generator.py (MaskingGenerator),
# with Python's `random` module replaced by an adapter drawing from a numpy
# Generator and `np.int` (removed in NumPy 1.24) replaced by `int`.
# ----------------------------------------------------------------------------


class _PyRandomAdapter:
  """``random.uniform`` / ``random.randint`` drawn from a numpy Generator."""

  def __init__(self, g):
    self.g = g

  def uniform(self, a, b):
    return a + (b - a) * self.g.random()

  def randint(self, a, b):
    return int(self.g.integers(a, b + 1))


class _UnilmMaskingGenerator:
  def __init__(
    self,
    input_size,
    num_masking_patches,
    min_num_patches=4,
    max_num_patches=None,
    min_aspect=0.3,
    max_aspect=None,
  ):
    if not isinstance(input_size, tuple):
      input_size = (input_size,) * 2
    self.height, self.width = input_size

    self.num_patches = self.height * self.width
    self.num_masking_patches = num_masking_patches

    self.min_num_patches = min_num_patches
    self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches

    max_aspect = max_aspect or 1 / min_aspect
    self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

  def get_shape(self):
    return self.height, self.width

  def _mask(self, mask, max_mask_patches, random):
    delta = 0
    for _ in range(10):
      target_area = random.uniform(self.min_num_patches, max_mask_patches)
      aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
      h = int(round(math.sqrt(target_area * aspect_ratio)))
      w = int(round(math.sqrt(target_area / aspect_ratio)))
      if w < self.width and h < self.height:
        top = random.randint(0, self.height - h)
        left = random.randint(0, self.width - w)

        num_masked = mask[top : top + h, left : left + w].sum()
        # Overlap
        if 0 < h * w - num_masked <= max_mask_patches:
          for i in range(top, top + h):
            for j in range(left, left + w):
              if mask[i, j] == 0:
                mask[i, j] = 1
                delta += 1

        if delta > 0:
          break
    return delta

  def __call__(self, random):
    mask = np.zeros(shape=self.get_shape(), dtype=int)
    mask_count = 0
    while mask_count < self.num_masking_patches:
      max_mask_patches = self.num_masking_patches - mask_count
      max_mask_patches = min(max_mask_patches, self.max_num_patches)

      delta = self._mask(mask, max_mask_patches, random)
      if delta == 0:
        break
      else:
        mask_count += delta

    return mask


def _unilm_mask(ref, seed):
  return ref(_PyRandomAdapter(np.random.default_rng(seed)))


# ----------------------------------------------------------------------------
# Exactness against unilm.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "args, kwargs, num_seeds",
  [
    # BEiT's pre-training setting (max_mask_patches < min_num_patches, the
    # a > b uniform, happens near the end of most masks).
    (((14, 14), 75, 16), {}, 2000),
    # Non-square grid, unilm's class defaults.
    (((10, 16), 60), {}, 2000),
    # Explicit max block size and asymmetric aspect range.
    (((8, 12), 40, 3), dict(max_num_patches=10, min_aspect=0.5, max_aspect=4.0), 500),
  ],
)
def test_blockwise_matches_unilm_transcription(args, kwargs, num_seeds):
  ours = masking.BlockwiseMaskGenerator(*args, **kwargs)
  ref = _UnilmMaskingGenerator(*args, **kwargs)
  counts = []
  for seed in range(num_seeds):
    got = ours(np.random.default_rng(seed))
    assert got.dtype == np.bool_ and got.shape == ref.get_shape()
    want = _unilm_mask(ref, seed)
    np.testing.assert_array_equal(got, want.astype(bool), err_msg=f"{seed=}")
    counts.append(int(got.sum()))
  # The comparison must cover both complete and early-stopped masks.
  assert max(counts) == ref.num_masking_patches
  assert min(counts) < ref.num_masking_patches


def test_blockwise_consumes_rng_like_unilm():
  """After a mask, both generators have drawn exactly the same numbers."""
  ours = masking.BlockwiseMaskGenerator(14, 75, 16)
  ref = _UnilmMaskingGenerator(14, 75, 16)
  g1, g2 = np.random.default_rng(7), np.random.default_rng(7)
  for _ in range(50):
    ours(g1)
    ref(_PyRandomAdapter(g2))
    assert g1.random() == g2.random()


class _ScriptedRng:
  """Stands in for a Generator: fixed ``random()``, lowest ``integers``."""

  def __init__(self, u):
    self.u = u

  def random(self):
    return self.u

  def integers(self, low, high):
    del high
    return low


def test_blockwise_rounds_half_to_even_like_python():
  # Aspect range [1, 1] gives r = 1; area 4 + (13 - 4) * 0.25 = 6.25 exactly,
  # so sqrt = 2.5 and Python's round gives h = w = 2 (half-up would give 3).
  ours = masking.BlockwiseMaskGenerator(14, 13, 4, min_aspect=1.0)
  ref = _UnilmMaskingGenerator(14, 13, 4, min_aspect=1.0)
  mask = np.zeros((14, 14), bool)
  assert ours._mask(mask, 13, _ScriptedRng(0.25)) == 4
  assert mask[:2, :2].all() and mask.sum() == 4
  ref_mask = np.zeros((14, 14), int)
  assert ref._mask(ref_mask, 13, _PyRandomAdapter(_ScriptedRng(0.25))) == 4
  np.testing.assert_array_equal(mask, ref_mask.astype(bool))


# ----------------------------------------------------------------------------
# Statistics and block shape.
# ----------------------------------------------------------------------------


def test_blockwise_statistics_unilm_setting():
  gen = masking.BlockwiseMaskGenerator(14, 75, 16)
  rng = np.random.default_rng(0)
  counts = np.array([gen(rng).sum() for _ in range(10_000)])
  # Reference simulation (Python `random`): mean 74.47, 66.6% exactly 75.
  assert counts.max() <= 75
  assert 74.0 <= counts.mean() <= 75.0, counts.mean()
  assert np.mean(counts == 75) >= 0.60, np.mean(counts == 75)
  assert counts.min() >= 50


def _min_reachable_block_area(min_area, min_aspect, max_aspect, height, width):
  """Smallest h*w that rounding can give from an area >= ``min_area``.

  With ``a = sqrt(A r)``, ``b = sqrt(A / r)`` and ``h = round(a)``, ``w =
  round(b)``: ``|a - h| <= 1/2`` and ``|b - w| <= 1/2``, so a block ``(h, w)``
  is reachable only if ``(h + 1/2)(w + 1/2) >= a b = A >= min_area`` and the
  ratio ``a / b = r`` can lie in the aspect range: ``(h + 1/2) / (w - 1/2) >=
  min_aspect`` and ``(h - 1/2) / (w + 1/2) <= max_aspect``. The minimum of h*w
  over the (h, w) passing these necessary conditions is a lower bound.
  """
  best = None
  for h in range(1, height):
    for w in range(1, width):
      if (h + 0.5) * (w + 0.5) < min_area:
        continue
      if (h + 0.5) / (w - 0.5) < min_aspect:
        continue
      if (h - 0.5) / (w + 0.5) > max_aspect:
        continue
      best = h * w if best is None else min(best, h * w)
  return best


def test_single_block_is_a_filled_rectangle_respecting_min_area():
  gen = masking.BlockwiseMaskGenerator(14, 75, 16)
  bound = _min_reachable_block_area(16, 0.3, 1 / 0.3, 14, 14)
  # E.g. h=2, w=6 comes from A=16, r=0.39 (a=2.5, b=6.4); h=3, w=4 cannot
  # ((3.5)(4.5) < 16).
  assert bound == 12
  rng = np.random.default_rng(1)
  areas = []
  for _ in range(3000):
    mask = np.zeros((14, 14), bool)
    delta = gen._mask(mask, 75, rng)
    assert delta == mask.sum()
    if delta == 0:
      continue
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    # The mask equals its bounding box, which is strictly smaller than the grid.
    assert delta == h * w
    assert mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
    assert h < 14 and w < 14
    areas.append(h * w)
  areas = np.array(areas)
  assert len(areas) > 2900
  assert areas.min() >= bound, areas.min()
  assert areas.max() <= 75
  assert areas.mean() >= 16, areas.mean()


def test_mask_never_overshoots_and_block_limit_respected():
  # One block may add at most max_num_patches patches: with max 8 and a large
  # target, every block adds <= 8, so the count is reached in many steps.
  gen = masking.BlockwiseMaskGenerator((9, 11), 50, 2, max_num_patches=8)
  rng = np.random.default_rng(3)
  for _ in range(300):
    mask = np.zeros(gen.shape, bool)
    count = 0
    while count < gen.num_masking_patches:
      cap = min(gen.num_masking_patches - count, gen.max_num_patches)
      delta = gen._mask(mask, cap, rng)
      assert 0 <= delta <= cap
      if delta == 0:
        break
      count += delta
    assert mask.sum() == count <= 50


# ----------------------------------------------------------------------------
# Determinism.
# ----------------------------------------------------------------------------


def test_blockwise_deterministic_per_seed_and_no_global_state():
  gen = masking.BlockwiseMaskGenerator(14, 75, 16)
  random.seed(0)
  np.random.seed(0)
  a = gen(np.random.default_rng(42))
  random.seed(1)
  np.random.seed(1)
  b = gen(np.random.default_rng(42))
  np.testing.assert_array_equal(a, b)
  masks = [gen(np.random.default_rng(s)).tobytes() for s in range(20)]
  assert len(set(masks)) == 20


class _Source:
  """Tiny in-memory source of decoded RGB images (passed through decode)."""

  def __init__(self, n):
    self._images = [
      np.random.default_rng(i).integers(0, 256, (40, 48, 3), np.uint8) for i in range(n)
    ]

  def __len__(self):
    return len(self._images)

  def __getitem__(self, index):
    return {"image": self._images[index], "label": index}


def _masked_transform():
  return masking.MaskedViewsTransform(
    transforms.TwoViewTransform(32, 16, color_jitter=0.0), masking.BlockwiseMaskGenerator(4, 6, 2)
  )


def _masks(seed, num_batches=3, batch=4):
  it = pipeline.make_train_iterator(
    _Source(8),
    _masked_transform(),
    global_batch_size=batch,
    seed=seed,
    process_index=0,
    process_count=1,
    read_threads=2,
    prefetch_buffer_size=8,
  )
  out = []
  for _ in range(num_batches):
    b = next(it)
    assert b["mask"].shape == (batch, 16) and b["mask"].dtype == np.bool_
    assert b["image"].shape == (batch, 32, 32, 3)
    assert b["tokenizer_image"].shape == (batch, 16, 16, 3)
    assert (b["mask"].sum(axis=1) <= 6).all()
    out.append(b["mask"])
  return np.stack(out)


def test_masks_deterministic_inside_grain_pipeline():
  a = _masks(seed=5)
  np.testing.assert_array_equal(a, _masks(seed=5))
  assert not np.array_equal(a, _masks(seed=6))
  # Each element has its own generator, so masks differ within a batch.
  for batch in a:
    assert len({row.tobytes() for row in batch}) > 1


def test_masked_views_transform_draws_mask_after_transform_with_same_rng():
  image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), np.uint8)
  tf = _masked_transform()
  out = tf(image, np.random.default_rng(9))
  assert tf.output_keys() == ("image", "tokenizer_image", "mask")
  assert tuple(out) == tf.output_keys()
  g = np.random.default_rng(9)
  views = tf.transform(image, g)
  expected_mask = tf.mask_generator(g)
  np.testing.assert_array_equal(out["image"], views["image"])
  np.testing.assert_array_equal(out["tokenizer_image"], views["tokenizer_image"])
  assert out["mask"].shape == (16,) and out["mask"].dtype == np.bool_
  np.testing.assert_array_equal(out["mask"], expected_mask.reshape(-1))


def test_masked_views_transform_custom_key_and_collision():
  base = transforms.TwoViewTransform(32, None, color_jitter=0.0)
  gen = masking.RandomMaskGenerator((2, 3), 2)
  tf = masking.MaskedViewsTransform(base, gen, mask_key="bool_masked_pos")
  image = np.zeros((40, 40, 3), np.uint8)
  out = tf(image, np.random.default_rng(0))
  assert set(out) == {"image", "bool_masked_pos"}
  assert out["bool_masked_pos"].shape == (6,)
  clash = masking.MaskedViewsTransform(base, gen, mask_key="image")
  with pytest.raises(ValueError, match="already outputs"):
    clash(image, np.random.default_rng(0))


def test_masked_views_transform_pickles():
  tf = _masked_transform()
  tf2 = pickle.loads(pickle.dumps(tf))
  image = np.random.default_rng(1).integers(0, 256, (40, 48, 3), np.uint8)
  for seed in range(5):
    a = tf(image, np.random.default_rng(seed))
    b = tf2(image, np.random.default_rng(seed))
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert tf2.output_keys() == tf.output_keys()


# ----------------------------------------------------------------------------
# Random masking.
# ----------------------------------------------------------------------------


def test_random_mask_generator_exact_count_and_uniform():
  gen = masking.RandomMaskGenerator((14, 14), 75)
  rng = np.random.default_rng(0)
  masks = np.stack([gen(rng) for _ in range(5000)])
  assert masks.dtype == np.bool_ and masks.shape == (5000, 14, 14)
  assert (masks.sum(axis=(1, 2)) == 75).all()
  freq = masks.mean(axis=0)
  # Per-position std is sqrt(p (1 - p) / 5000) ~ 0.0069; 0.035 is ~5 sigma.
  np.testing.assert_allclose(freq, 75 / 196, atol=0.035)
  np.testing.assert_array_equal(gen(np.random.default_rng(3)), gen(np.random.default_rng(3)))
  # Full masking is allowed.
  assert masking.RandomMaskGenerator(3, 9)(rng).all()


# ----------------------------------------------------------------------------
# Defaults, factory, validation.
# ----------------------------------------------------------------------------


def test_default_mask_counts():
  assert masking.default_mask_counts(14, 14) == (75, 16)
  # 8x8: round(64 * 75 / 196) = round(24.49) = 24, round(64 * 16 / 196) = 5.
  num, min_patches = masking.default_mask_counts(8, 8)
  assert (num, min_patches) == (24, 5)
  assert abs(num / 64 - 75 / 196) < 0.01
  # Non-square 16x24 (e.g. 256x384 images with 16-px patches).
  n = 16 * 24
  assert masking.default_mask_counts(16, 24) == (round(n * 75 / 196), round(n * 16 / 196))
  # Tiny grids stay valid.
  for h, w in [(1, 1), (1, 2), (2, 2), (3, 3)]:
    num, min_patches = masking.default_mask_counts(h, w)
    assert 1 <= min_patches <= num <= h * w
    masking.BlockwiseMaskGenerator((h, w), num, min_patches)
  for bad in [(0, 14), (14, -1), (14.0, 14)]:
    with pytest.raises(ValueError, match="positive integer"):
      masking.default_mask_counts(*bad)


def test_make_mask_generator():
  g = masking.make_mask_generator("blockwise", (14, 14), 75, 16)
  assert isinstance(g, masking.BlockwiseMaskGenerator)
  assert (g.num_masking_patches, g.min_num_patches) == (75, 16)
  assert g.shape == (14, 14) and g.num_patches == 196
  r = masking.make_mask_generator("random", 7, 20, 16)
  assert isinstance(r, masking.RandomMaskGenerator)
  assert r.shape == (7, 7) and r.num_patches == 49
  with pytest.raises(ValueError, match="'blockwise', 'random'"):
    masking.make_mask_generator("block", 14, 75, 16)


def test_properties_and_repr():
  g = masking.BlockwiseMaskGenerator((10, 16), 60)
  assert g.shape == (10, 16) and g.num_patches == 160
  assert g.max_num_patches == 60 and g.min_num_patches == 4
  assert g.log_aspect_ratio == pytest.approx((math.log(0.3), math.log(1 / 0.3)))
  assert "BlockwiseMaskGenerator" in repr(g) and "(10, 16)" in repr(g)
  assert "num_masking_patches=60" in repr(g)
  r = masking.RandomMaskGenerator(4, 6)
  assert repr(r) == ("RandomMaskGenerator(input_size=(4, 4), num_masking_patches=6)")


@pytest.mark.parametrize(
  "args, kwargs, match",
  [
    ((14, 0), {}, r"num_masking_patches must be in \[1, 196\]"),
    ((14, 197), {}, r"num_masking_patches must be in \[1, 196\]"),
    ((14, 75, 0), {}, r"min_num_patches must be in \[1"),
    ((14, 75, 76), {}, r"min_num_patches must be in \[1"),
    ((14, 75, 16), dict(min_aspect=0.0), "min_aspect must be > 0"),
    ((14, 75, 16), dict(max_aspect=-1.0), "max_aspect must be > 0"),
    ((14, 75, 16), dict(max_num_patches=0), "max_num_patches must be"),
    (((14, 14, 3), 75), {}, "input_size must be"),
    (((0, 14), 1), {}, "at least 1x1"),
  ],
)
def test_blockwise_validation(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    masking.BlockwiseMaskGenerator(*args, **kwargs)


def test_random_validation():
  with pytest.raises(ValueError, match=r"num_masking_patches must be in \[1, 16\]"):
    masking.RandomMaskGenerator(4, 17)
  with pytest.raises(ValueError, match="input_size must be"):
    masking.RandomMaskGenerator("14", 3)
