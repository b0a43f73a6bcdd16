"""Tests for beit_jax.data.randaugment (timm 0.3.2 RandAugment port).

The references are the installed timm's own functions, driven by an adapter
(tests/data/timm_draws.py) that feeds them the draws randaugment.py makes from a numpy
Generator (the mapping documented in randaugment.py). For BEiT's
``rand-m9-mstd0.5-inc1`` the installed timm 1.x and the timm 0.3.2 unilm pins behave
identically.
"""

import functools

import numpy as np
import pytest
import timm.data.auto_augment as timm_aa
from PIL import Image
from timm.data.transforms_factory import transforms_imagenet_train

from beit_jax import pixels
from beit_jax.data import randaugment
from tests.data.timm_draws import Draws, patch_timm_random, photo

BICUBIC = Image.Resampling.BICUBIC
BILINEAR = Image.Resampling.BILINEAR


@functools.cache
def _small_photo() -> Image.Image:
  # Non-square, so an x/y mix-up shows.
  return Image.fromarray(photo()).resize((64, 48), BICUBIC)


class _FixedSign:
  """timm's ``random`` for a fixed-magnitude op: ``random() > 0.5`` negates."""

  def __init__(self, negate):
    self.value = 0.75 if negate else 0.25

  def random(self):
    return self.value


def _hparams(interpolation=BICUBIC):
  hp = {"translate_const": 100, "img_mean": (124, 116, 104)}
  if interpolation is not None:
    hp["interpolation"] = interpolation
  return hp


# ----------------------------------------------------------------------------
# Single ops at fixed magnitudes equal timm's.
# ----------------------------------------------------------------------------

_ALL_OPS = sorted(
  set(randaugment.RAND_TRANSFORMS)
  | set(randaugment.RAND_INCREASING_TRANSFORMS)
  | {"TranslateX", "TranslateY", "PosterizeOriginal"}
)


@pytest.mark.parametrize("name", _ALL_OPS)
def test_op_matches_timm_at_fixed_magnitude(name, monkeypatch):
  img = _small_photo()
  geometric = name in randaugment._GEOMETRIC_OPS
  interps = (BICUBIC, BILINEAR) if geometric else (BICUBIC,)
  changed = False
  for interp in interps:
    hp = _hparams(interp)
    for magnitude in (0, 2.5, 5, 9, 9.63, 10, 13):
      for negate in (False, True):
        monkeypatch.setattr(timm_aa, "random", _FixedSign(negate))
        timm_op = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hp)
        got = np.asarray(randaugment.apply_op(img, name, magnitude, hp, negate=negate))
        if name.startswith("Posterize") and timm_op.level_fn(min(10, magnitude), hp) == (0,):
          # 0 bits: Pillow 13 raises; older Pillow (timm 0.3.2's) gave black.
          with pytest.raises(ValueError):
            timm_op(img)
          want = np.zeros_like(got)
        else:
          want = np.asarray(timm_op(img))
        np.testing.assert_array_equal(got, want, err_msg=f"{name} m={magnitude} negate={negate}")
        changed |= not np.array_equal(got, np.asarray(img))
  assert changed  # The op does something.


def test_random_interpolation_needs_explicit_resample():
  with pytest.raises(ValueError):
    randaugment.apply_op(_small_photo(), "Rotate", 9, _hparams(None))


# ----------------------------------------------------------------------------
# Whole RandAugment equals timm's given the same draws.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "config,interp",
  [
    ("rand-m9-mstd0.5-inc1", BICUBIC),  # BEiT fine-tuning.
    ("rand-m9-mstd0.5-inc1", None),  # Random bilinear/bicubic per op.
    ("rand-m7-n3-mstd1", BILINEAR),  # Plain op set.
    ("rand-m10-n1", BICUBIC),  # No magnitude noise.
  ],
)
def test_rand_augment_matches_timm(config, interp, monkeypatch):
  img = _small_photo()
  ours = randaugment.rand_augment_transform(config, _hparams(interp))
  theirs = timm_aa.rand_augment_transform(config, _hparams(interp))
  assert [op.name for op in ours.ops] == [op.name for op in theirs.ops]
  changed = 0
  for seed in range(40):
    draws = Draws(seed)
    patch_timm_random(monkeypatch, draws)
    want = np.asarray(theirs(img))
    rng = np.random.default_rng(seed)
    got = np.asarray(ours(img, rng))
    np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")
    assert rng.random() == draws.g.random()  # Same number of draws.
    changed += not np.array_equal(got, np.asarray(img))
  assert changed > 10


def test_rand_augment_numpy_in_numpy_out():
  img = np.asarray(_small_photo())
  ra = randaugment.rand_augment_transform("rand-m9-mstd0.5-inc1", _hparams())
  out = ra(img, np.random.default_rng(3))
  assert isinstance(out, np.ndarray) and out.dtype == np.uint8
  assert out.shape == img.shape
  np.testing.assert_array_equal(out, np.asarray(ra(Image.fromarray(img), np.random.default_rng(3))))


def test_parse_config():
  ra = randaugment.rand_augment_transform("rand-m9-mstd0.5-inc1", _hparams())
  assert [op.name for op in ra.ops] == list(randaugment.RAND_INCREASING_TRANSFORMS)
  assert ra.num_layers == 2 and ra.choice_weights is None
  assert all(op.magnitude == 9 and op.magnitude_std == 0.5 and op.prob == 0.5 for op in ra.ops)
  ra = randaugment.rand_augment_transform("rand-n3-mstd0")
  assert [op.name for op in ra.ops] == list(randaugment.RAND_TRANSFORMS)
  assert ra.num_layers == 3
  assert all(op.magnitude == 10 and op.magnitude_std == 0 for op in ra.ops)
  # timm 0.3.2 quirk: bool('0') is True, so inc0 also selects increasing ops.
  ra = randaugment.rand_augment_transform("rand-m9-inc0")
  assert [op.name for op in ra.ops] == list(randaugment.RAND_INCREASING_TRANSFORMS)
  # hparams magnitude_std wins over mstd (setdefault) and is not mutated.
  hp = dict(_hparams(), magnitude_std=2.0)
  ra = randaugment.rand_augment_transform("rand-m9-mstd0.5", hp)
  assert ra.ops[0].magnitude_std == 2.0
  hp = _hparams()
  randaugment.rand_augment_transform("rand-m9-mstd0.5", hp)
  assert "magnitude_std" not in hp
  for bad in ("rand-m9-x3", "augmix-m9", "rand-w1"):
    with pytest.raises(ValueError):
      randaugment.rand_augment_transform(bad)


def test_hparams_equal_timm_create_transform():
  for size, mean, interp in (
    (224, pixels.IMAGENET_MEAN, "bicubic"),
    (384, (0.5, 0.5, 0.5), "bilinear"),
    (224, pixels.IMAGENET_MEAN, "random"),
  ):
    _, secondary, _ = transforms_imagenet_train(
      size, auto_augment="rand-m9-mstd0.5-inc1", interpolation=interp, mean=mean, separate=True
    )
    want = dict(secondary.transforms[0].ops[0].hparams)
    want.pop("magnitude_std")
    assert randaugment.rand_augment_hparams(size, mean, interp) == want
  assert randaugment.rand_augment_hparams(224) == {
    "translate_const": 100,
    "img_mean": (124, 116, 104),
    "interpolation": BICUBIC,
  }


# ----------------------------------------------------------------------------
# Op and magnitude distributions.
# ----------------------------------------------------------------------------


def test_op_and_magnitude_distribution():
  ra = randaugment.rand_augment_transform("rand-m9-mstd0.5-inc1", _hparams())
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
  signed = [x for x in applied if x.name in randaugment._SIGNED_OPS]
  assert abs(np.mean([x.negate for x in signed]) - 0.5) < 0.02
  assert not any(x.negate for x in applied if x.name not in randaugment._SIGNED_OPS)
  assert all(x.resample == BICUBIC for x in applied if x.name in randaugment._GEOMETRIC_OPS)


def test_weighted_choice_is_without_replacement():
  ra = randaugment.rand_augment_transform("rand-m9-w0")
  rng = np.random.default_rng(1)
  draws = [ra.get_params(rng) for _ in range(3000)]
  assert all(d[0].name != d[1].name for d in draws)
  names = {x.name for d in draws for x in d}
  assert "Posterize" not in names and "Invert" not in names
  rotate = np.mean([x.name == "Rotate" for d in draws for x in d])
  assert 0.2 < rotate < 0.35
