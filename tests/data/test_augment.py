"""Tests for beit_jax.data.augment (timm RandAugment / RandomErasing ports).

The references are the installed timm's own functions, driven by an adapter
that feeds them the draws augment.py makes from a numpy Generator (same
mapping as documented in augment.py). For BEiT's ``rand-m9-mstd0.5-inc1`` the
installed timm 1.x and the timm 0.3.2 unilm pins behave identically.
"""

import functools
import pickle

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import timm.data.auto_augment as timm_aa
import timm.data.random_erasing as timm_re
import timm.data.transforms as timm_transforms
from timm.data.transforms_factory import transforms_imagenet_train
import torch

from beit_jax.data import augment
from beit_jax.data import sources
from beit_jax.data import transforms

BICUBIC = Image.Resampling.BICUBIC
BILINEAR = Image.Resampling.BILINEAR


@functools.cache
def _photo(name: str = 'chelsea') -> np.ndarray:
  paths = dict(sources.builtin_photo_paths())  # scikit-image (pinned) ships them.
  assert name in paths, f'built-in photo {name!r} missing: reinstall scikit-image'
  with open(paths[name], 'rb') as f:
    return sources.decode_image(f.read())


@functools.cache
def _small_photo() -> Image.Image:
  # Non-square, so an x/y mix-up shows.
  return Image.fromarray(_photo()).resize((64, 48), BICUBIC)


class _Draws:
  """Python ``random`` / ``np.random.choice`` / ``torch.rand`` from a Generator.

  Maps each call to the numpy draw augment.py makes in its place.
  """

  def __init__(self, seed):
    self.g = np.random.default_rng(seed)

  def random(self):
    return float(self.g.random())

  def uniform(self, a, b):
    return float(self.g.uniform(a, b))

  def randint(self, a, b):
    return int(self.g.integers(a, b + 1))

  def gauss(self, mu, sigma):
    return float(self.g.normal(mu, sigma))

  def choice(self, seq):
    return seq[int(self.g.integers(len(seq)))]

  def np_choice(self, a, size=None, replace=True, p=None):
    assert replace and p is None
    return [a[int(i)] for i in self.g.integers(0, len(a), size=size)]

  def torch_rand(self, *size):
    assert size in ((1,), ((1,),))
    return torch.tensor([self.g.random()])


def _patch_timm_random(monkeypatch, draws):
  for module in (timm_aa, timm_re, timm_transforms):
    monkeypatch.setattr(module, 'random', draws)
  monkeypatch.setattr(np.random, 'choice', draws.np_choice)
  monkeypatch.setattr(torch, 'rand', draws.torch_rand)


class _FixedSign:
  """timm's ``random`` for a fixed-magnitude op: ``random() > 0.5`` negates."""

  def __init__(self, negate):
    self.value = 0.75 if negate else 0.25

  def random(self):
    return self.value


class _BoxRecorder:
  """Stands in for the image tensor in timm ``RandomErasing._erase``."""

  def __init__(self):
    self.boxes = []

  def __setitem__(self, key, value):
    _, ys, xs = key
    self.boxes.append((ys.start, xs.start, ys.stop - ys.start,
                       xs.stop - xs.start))
    assert value.shape[0] == 3


def _hparams(interpolation=BICUBIC):
  hp = {'translate_const': 100, 'img_mean': (124, 116, 104)}
  if interpolation is not None:
    hp['interpolation'] = interpolation
  return hp


# ----------------------------------------------------------------------------
# Single ops at fixed magnitudes equal timm's.
# ----------------------------------------------------------------------------

_ALL_OPS = sorted(
    set(augment.RAND_TRANSFORMS) | set(augment.RAND_INCREASING_TRANSFORMS)
    | {'TranslateX', 'TranslateY', 'PosterizeOriginal'})


@pytest.mark.parametrize('name', _ALL_OPS)
def test_op_matches_timm_at_fixed_magnitude(name, monkeypatch):
  img = _small_photo()
  geometric = name in augment._GEOMETRIC_OPS
  interps = (BICUBIC, BILINEAR) if geometric else (BICUBIC,)
  changed = False
  for interp in interps:
    hp = _hparams(interp)
    for magnitude in (0, 2.5, 5, 9, 9.63, 10, 13):
      for negate in (False, True):
        monkeypatch.setattr(timm_aa, 'random', _FixedSign(negate))
        timm_op = timm_aa.AugmentOp(
            name, prob=1.0, magnitude=magnitude, hparams=hp)
        got = np.asarray(
            augment.apply_op(img, name, magnitude, hp, negate=negate))
        if name.startswith('Posterize') and timm_op.level_fn(
            min(10, magnitude), hp) == (0,):
          # 0 bits: Pillow 13 raises; older Pillow (timm 0.3.2's) gave black.
          with pytest.raises(ValueError):
            timm_op(img)
          want = np.zeros_like(got)
        else:
          want = np.asarray(timm_op(img))
        np.testing.assert_array_equal(
            got, want, err_msg=f'{name} m={magnitude} negate={negate}')
        changed |= not np.array_equal(got, np.asarray(img))
  assert changed  # The op does something.


def test_random_interpolation_needs_explicit_resample():
  with pytest.raises(ValueError):
    augment.apply_op(_small_photo(), 'Rotate', 9, _hparams(None))


# ----------------------------------------------------------------------------
# Whole RandAugment equals timm's given the same draws.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('config,interp', [
    ('rand-m9-mstd0.5-inc1', BICUBIC),  # BEiT fine-tuning.
    ('rand-m9-mstd0.5-inc1', None),  # Random bilinear/bicubic per op.
    ('rand-m7-n3-mstd1', BILINEAR),  # Plain op set.
    ('rand-m10-n1', BICUBIC),  # No magnitude noise.
])
def test_rand_augment_matches_timm(config, interp, monkeypatch):
  img = _small_photo()
  ours = augment.rand_augment_transform(config, _hparams(interp))
  theirs = timm_aa.rand_augment_transform(config, _hparams(interp))
  assert [op.name for op in ours.ops] == [op.name for op in theirs.ops]
  changed = 0
  for seed in range(40):
    draws = _Draws(seed)
    _patch_timm_random(monkeypatch, draws)
    want = np.asarray(theirs(img))
    rng = np.random.default_rng(seed)
    got = np.asarray(ours(img, rng))
    np.testing.assert_array_equal(got, want, err_msg=f'seed {seed}')
    assert rng.random() == draws.g.random()  # Same number of draws.
    changed += not np.array_equal(got, np.asarray(img))
  assert changed > 10


def test_rand_augment_numpy_in_numpy_out():
  img = np.asarray(_small_photo())
  ra = augment.rand_augment_transform('rand-m9-mstd0.5-inc1', _hparams())
  out = ra(img, np.random.default_rng(3))
  assert isinstance(out, np.ndarray) and out.dtype == np.uint8
  assert out.shape == img.shape
  np.testing.assert_array_equal(
      out, np.asarray(ra(Image.fromarray(img), np.random.default_rng(3))))


def test_parse_config():
  ra = augment.rand_augment_transform('rand-m9-mstd0.5-inc1', _hparams())
  assert [op.name for op in ra.ops] == list(augment.RAND_INCREASING_TRANSFORMS)
  assert ra.num_layers == 2 and ra.choice_weights is None
  assert all(op.magnitude == 9 and op.magnitude_std == 0.5 and op.prob == 0.5
             for op in ra.ops)
  ra = augment.rand_augment_transform('rand-n3-mstd0')
  assert [op.name for op in ra.ops] == list(augment.RAND_TRANSFORMS)
  assert ra.num_layers == 3
  assert all(op.magnitude == 10 and op.magnitude_std == 0 for op in ra.ops)
  # timm 0.3.2 quirk: bool('0') is True, so inc0 also selects increasing ops.
  ra = augment.rand_augment_transform('rand-m9-inc0')
  assert [op.name for op in ra.ops] == list(augment.RAND_INCREASING_TRANSFORMS)
  # hparams magnitude_std wins over mstd (setdefault) and is not mutated.
  hp = dict(_hparams(), magnitude_std=2.0)
  ra = augment.rand_augment_transform('rand-m9-mstd0.5', hp)
  assert ra.ops[0].magnitude_std == 2.0
  hp = _hparams()
  augment.rand_augment_transform('rand-m9-mstd0.5', hp)
  assert 'magnitude_std' not in hp
  for bad in ('rand-m9-x3', 'augmix-m9', 'rand-w1'):
    with pytest.raises(ValueError):
      augment.rand_augment_transform(bad)


def test_hparams_equal_timm_create_transform():
  for size, mean, interp in ((224, transforms.IMAGENET_MEAN, 'bicubic'),
                             (384, (0.5, 0.5, 0.5), 'bilinear'),
                             (224, transforms.IMAGENET_MEAN, 'random')):
    _, secondary, _ = transforms_imagenet_train(
        size, auto_augment='rand-m9-mstd0.5-inc1', interpolation=interp,
        mean=mean, separate=True)
    want = dict(secondary.transforms[0].ops[0].hparams)
    want.pop('magnitude_std')
    assert augment.rand_augment_hparams(size, mean, interp) == want
  assert augment.rand_augment_hparams(224) == {
      'translate_const': 100, 'img_mean': (124, 116, 104),
      'interpolation': BICUBIC}


# ----------------------------------------------------------------------------
# Op and magnitude distributions.
# ----------------------------------------------------------------------------


def test_op_and_magnitude_distribution():
  ra = augment.rand_augment_transform('rand-m9-mstd0.5-inc1', _hparams())
  rng = np.random.default_rng(0)
  n = 20000
  draws = [ra.get_params(rng) for _ in range(n)]
  assert all(len(d) == 2 for d in draws)
  names = [op.name for op in ra.ops]
  flat = [x for d in draws for x in d]
  counts = np.array([sum(x.name == k for x in flat) for k in names])
  expected = 2 * n / 15
  sigma = np.sqrt(2 * n * (1 / 15) * (14 / 15))
  assert np.all(np.abs(counts - expected) < 5 * sigma), counts
  # With replacement: both layers pick the same op 1/15 of the time.
  same = np.mean([d[0].name == d[1].name for d in draws])
  assert abs(same - 1 / 15) < 5 * np.sqrt((1 / 15) * (14 / 15) / n)
  applied = [x for x in flat if x.applied]
  assert abs(len(applied) / len(flat) - 0.5) < 0.01
  assert all(x.magnitude is None for x in flat if not x.applied)
  mags = np.array([x.magnitude for x in applied])
  assert mags.min() >= 0 and mags.max() == 10
  # N(9, 0.5) clipped to [0, 10]: the median and IQR are unaffected.
  assert abs(np.median(mags) - 9) < 0.02
  q75, q25 = np.percentile(mags, [75, 25])
  assert abs((q75 - q25) / 1.349 - 0.5) < 0.02
  assert abs(np.mean(mags == 10) - 0.02275) < 0.005  # P(N(9, .5) > 10).
  signed = [x for x in applied if x.name in augment._SIGNED_OPS]
  assert abs(np.mean([x.negate for x in signed]) - 0.5) < 0.02
  assert not any(x.negate for x in applied
                 if x.name not in augment._SIGNED_OPS)
  assert all(x.resample == BICUBIC for x in applied
             if x.name in augment._GEOMETRIC_OPS)


def test_weighted_choice_is_without_replacement():
  ra = augment.rand_augment_transform('rand-m9-w0')
  rng = np.random.default_rng(1)
  draws = [ra.get_params(rng) for _ in range(3000)]
  assert all(d[0].name != d[1].name for d in draws)
  names = {x.name for d in draws for x in d}
  assert 'Posterize' not in names and 'Invert' not in names
  rotate = np.mean([x.name == 'Rotate' for d in draws for x in d])
  assert 0.2 < rotate < 0.35


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


@pytest.mark.parametrize('height,width', [(224, 224), (31, 17), (8, 8),
                                          (5, 12)])
@pytest.mark.parametrize('min_count,max_count', [(1, 1), (1, 3), (2, 4)])
def test_erase_boxes_match_timm(height, width, min_count, max_count,
                                monkeypatch):
  ours = augment.RandomErasingBoxes(
      0.7, min_count=min_count, max_count=max_count)
  theirs = timm_re.RandomErasing(
      0.7, mode='const', min_count=min_count, max_count=max_count,
      device='cpu')
  placed = 0
  for seed in range(150):
    draws = _Draws(seed)
    monkeypatch.setattr(timm_re, 'random', draws)
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
      mask[i, top:top + h, left:left + w] = True
  return mask


_BOXES = np.array([
    [[2, 3, 10, 20], [5, 10, 30, 30]],  # Overlapping.
    [[0, 0, 0, 0], [4, 4, 0, 9]],  # Nothing (an h = 0 box).
    [[0, 0, 40, 48], [0, 0, 0, 0]],  # The whole image.
    [[39, 47, 1, 1], [0, 20, 40, 1]],  # A corner pixel and a column.
], np.int32)


def test_apply_random_erasing_pixel():
  images = jnp.full((4, 40, 48, 3), 5.0, jnp.float32)
  fn = jax.jit(augment.apply_random_erasing, static_argnames='mode')
  out = np.asarray(fn(images, _BOXES, jax.random.key(0), mode='pixel'))
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
  out2 = np.asarray(fn(images, _BOXES, jax.random.key(1), mode='pixel'))
  assert not np.any(out2[union] == out[union])


def test_apply_random_erasing_rand_and_const():
  images = jnp.full((4, 40, 48, 3), 5.0, jnp.float32)
  fn = jax.jit(augment.apply_random_erasing, static_argnames='mode')
  union = _box_union(_BOXES, 40, 48)
  out = np.asarray(fn(images, _BOXES, jax.random.key(0), mode='rand'))
  np.testing.assert_array_equal(np.any(out != 5.0, axis=-1), union)
  # Element 0: the second box is on top; each box one colour per channel.
  second = _box_union(_BOXES[:1, 1:], 40, 48)[0]
  first_only = _box_union(_BOXES[:1, :1], 40, 48)[0] & ~second
  c1, c0 = out[0][second], out[0][first_only]
  assert np.all(c1 == c1[0]) and np.all(c0 == c0[0])
  assert len(set(c1[0]) | set(c0[0])) == 6
  out = np.asarray(fn(images, _BOXES, jax.random.key(0), mode='const'))
  np.testing.assert_array_equal(
      out, np.broadcast_to(np.where(union[..., None], 0.0, 5.0), out.shape))
  with pytest.raises(ValueError):
    augment.apply_random_erasing(images, _BOXES, jax.random.key(0), 'foo')


# ----------------------------------------------------------------------------
# The fine-tuning transform.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('interp,re_count,auto_augment', [
    ('bicubic', 1, 'rand-m9-mstd0.5-inc1'),  # BEiT's setting.
    ('random', 3, 'rand-m9-mstd0.5-inc1'),
    ('bicubic', 2, None),  # No RandAugment, no colour jitter.
])
def test_finetune_transform_matches_timm(interp, re_count, auto_augment,
                                         monkeypatch):
  image = _photo()
  size = 64
  ours = augment.FinetuneTrainTransform(
      size, interpolation=interp, auto_augment=auto_augment,
      color_jitter=0.4 if auto_augment else None, re_prob=0.6,
      re_count=re_count)
  primary, secondary, final = transforms_imagenet_train(
      size, hflip=0.5, color_jitter=0.4 if auto_augment else None,
      auto_augment=auto_augment, interpolation=interp,
      mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD,
      re_prob=0.6, re_mode='pixel', re_count=re_count, separate=True)
  erasing = final.transforms[-1]
  assert isinstance(erasing, timm_re.RandomErasing)
  boxes = 0
  for seed in range(30):
    draws = _Draws(seed)
    _patch_timm_random(monkeypatch, draws)
    want = secondary(primary(Image.fromarray(image)))
    recorder = _BoxRecorder()
    erasing._erase(recorder, 3, size, size, torch.float32)
    rng = np.random.default_rng(seed)
    out = ours(image, rng)
    np.testing.assert_array_equal(out['image'], np.asarray(want),
                                  err_msg=f'seed {seed}')
    n = len(recorder.boxes)
    assert [tuple(b) for b in out['erase_boxes'][:n].tolist()] == (
        recorder.boxes)
    assert np.all(out['erase_boxes'][n:] == 0)
    assert rng.random() == draws.g.random()
    boxes += n > 0
  assert 5 < boxes < 30


def test_finetune_transform_output_and_determinism():
  image = _photo()
  t = augment.FinetuneTrainTransform(96)
  assert t.output_keys() == ('image', 'erase_boxes')
  a = t(image, np.random.default_rng(7))
  b = t(image, np.random.default_rng(7))
  c = t(image, np.random.default_rng(8))
  assert set(a) == set(t.output_keys())
  assert a['image'].dtype == np.uint8 and a['image'].shape == (96, 96, 3)
  assert a['erase_boxes'].dtype == np.int32
  assert a['erase_boxes'].shape == (1, 4)
  assert a['image'].flags.c_contiguous
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['erase_boxes'], b['erase_boxes'])
  assert not np.array_equal(a['image'], c['image'])
  # Picklable for Grain workers, and the copy draws the same.
  t2 = pickle.loads(pickle.dumps(t))
  np.testing.assert_array_equal(
      t2(image, np.random.default_rng(7))['image'], a['image'])


def test_finetune_transform_options():
  image = _photo()
  # Erasing draws come last: re_prob 0 keeps the image and gives zero boxes.
  on = augment.FinetuneTrainTransform(64, re_prob=1.0, re_count=2)
  off = augment.FinetuneTrainTransform(64, re_prob=0.0, re_count=2)
  for seed in range(5):
    a = on(image, np.random.default_rng(seed))
    b = off(image, np.random.default_rng(seed))
    np.testing.assert_array_equal(a['image'], b['image'])
    assert a['erase_boxes'][0, 2] > 0
    assert b['erase_boxes'].shape == (2, 4) and not b['erase_boxes'].any()
  # Without RandAugment the colour jitter runs (and only then).
  plain = augment.FinetuneTrainTransform(
      64, auto_augment='', color_jitter=None, re_prob=0)
  jitter = augment.FinetuneTrainTransform(
      64, auto_augment=None, color_jitter=0.4, re_prob=0)
  assert plain.rand_augment is None and plain.jitter is None
  assert jitter.jitter is not None and jitter.jitter.enabled
  assert on.jitter is None and on.rand_augment is not None
  differ = sum(
      not np.array_equal(plain(image, np.random.default_rng(s))['image'],
                         jitter(image, np.random.default_rng(s))['image'])
      for s in range(5))
  assert differ == 5
  with pytest.raises(ValueError):
    augment.FinetuneTrainTransform(64, auto_augment='original-mstd0.5')
  with pytest.raises(ValueError):
    augment.FinetuneTrainTransform(64, re_mode='foo')
