"""timm 0.3.2's RandAugment (``rand-m9-mstd0.5-inc1`` in unilm BEiT's fine-tuning), on PIL.

All randomness comes from the element's ``np.random.Generator``, drawn in the order timm
draws from Python's ``random`` / ``np.random``: ``random.random()`` -> ``rng.random()``,
``random.uniform(a, b)`` -> ``rng.uniform(a, b)``, ``random.randint(a, b)`` ->
``rng.integers(a, b + 1)``, ``random.gauss(m, s)`` -> ``rng.normal(m, s)``,
``random.choice(seq)`` -> ``seq[rng.integers(len)]``, ``np.random.choice(ops, n)`` ->
``rng.integers(0, len(ops), n)``. Given the same stream of draws the outputs equal timm's
pixel for pixel.

timm 0.3.2 vs the timm 1.x in the test environment (this module follows 0.3.2; for BEiT's
``rand-m9-mstd0.5-inc1`` the two agree exactly):

* 0.3.2 parses ``inc{X}`` as ``bool(str)``, so ``inc0`` *also* selects the increasing op
  set (1.x: ``bool(int(X))``). Without an ``inc`` section the plain set is used.
* 0.3.2 has no ``mmax`` (magnitude is always clipped to [0, 10]), no ``mstd > 100`` ->
  uniform sampling (it is a Gaussian with that std), no ``p`` (per-op probability is
  always 0.5) and no ``t`` sections; weighted op choice is ``w0`` (1.x: ``tweights``,
  other weights and increasing names).
* 1.x clamps the ``*Increasing`` enhance factor with ``max(0.1, .)`` and solarize
  thresholds / adds with ``min``; with magnitude <= 10 these only matter for
  ``1.0 - 0.9 = 0.09999999999999998`` vs 0.1, which PIL's blend (float32 alpha) maps to
  the same pixels.
* ``_MAX_LEVEL`` (0.3.2) was renamed ``_LEVEL_DENOM`` (1.x); both are 10.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from beit_jax import pixels
from beit_jax.data import transforms

MAX_LEVEL = 10.0  # timm's _MAX_LEVEL: magnitudes are in [0, 10].
_FILL = (128, 128, 128)
_HPARAMS_DEFAULT = {"translate_const": 250, "img_mean": _FILL}
# timm's 'random' interpolation: bilinear or bicubic, drawn per call.
RANDOM_INTERPOLATION = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)

# timm 0.3.2 _RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS (same order, so the
# w0 weights below apply by position to either set, as in timm).
RAND_TRANSFORMS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "Posterize",
  "Solarize",
  "SolarizeAdd",
  "Color",
  "Contrast",
  "Brightness",
  "Sharpness",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)
RAND_INCREASING_TRANSFORMS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "PosterizeIncreasing",
  "SolarizeIncreasing",
  "SolarizeAdd",
  "ColorIncreasing",
  "ContrastIncreasing",
  "BrightnessIncreasing",
  "SharpnessIncreasing",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)
# timm 0.3.2 _RAND_CHOICE_WEIGHTS_0, keyed by the RAND_TRANSFORMS names.
_RAND_CHOICE_WEIGHTS_0 = {
  "Rotate": 0.3,
  "ShearX": 0.2,
  "ShearY": 0.2,
  "TranslateXRel": 0.1,
  "TranslateYRel": 0.1,
  "Color": 0.025,
  "Sharpness": 0.025,
  "AutoContrast": 0.025,
  "Solarize": 0.005,
  "SolarizeAdd": 0.005,
  "Contrast": 0.005,
  "Brightness": 0.005,
  "Equalize": 0.005,
  "Posterize": 0,
  "Invert": 0,
}

# Ops whose argument is randomly negated (timm's _randomly_negate).
_SIGNED_OPS = frozenset(
  {
    "Rotate",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "TranslateXRel",
    "TranslateYRel",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
  }
)
# Ops that resample (timm's _check_args_tf: random.choice when interpolation
# is a tuple, i.e. the 'random' interpolation).
_GEOMETRIC_OPS = frozenset(
  {
    "Rotate",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "TranslateXRel",
    "TranslateYRel",
  }
)


# ----------------------------------------------------------------------------
# Ops (timm 0.3.2 auto_augment.py, level functions and PIL ops verbatim).
# ----------------------------------------------------------------------------


def _level_args(
  name: str, level: float, hparams: Mapping[str, Any], negate: bool
) -> tuple[Any, ...]:
  """timm's ``LEVEL_TO_ARG[name](level, hparams)`` with the sign given."""

  def sign(v):
    return -v if negate else v

  if name in ("AutoContrast", "Equalize", "Invert"):
    return ()
  if name == "Rotate":  # [-30, 30] degrees.
    return (sign((level / MAX_LEVEL) * 30.0),)
  if name == "Posterize":  # [0, 4] bits kept, decreasing severity.
    return (int((level / MAX_LEVEL) * 4),)
  if name == "PosterizeIncreasing":  # [4, 0] bits kept.
    return (4 - int((level / MAX_LEVEL) * 4),)
  if name == "PosterizeOriginal":  # [4, 8] bits kept.
    return (int((level / MAX_LEVEL) * 4) + 4,)
  if name == "Solarize":  # threshold [0, 256].
    return (int((level / MAX_LEVEL) * 256),)
  if name == "SolarizeIncreasing":
    return (256 - int((level / MAX_LEVEL) * 256),)
  if name == "SolarizeAdd":  # add [0, 110].
    return (int((level / MAX_LEVEL) * 110),)
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):  # [0.1, 1.9].
    return ((level / MAX_LEVEL) * 1.8 + 0.1,)
  if name in (
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
  ):
    # 0.3.2: no max(0.1, .) clamp (timm 1.x adds one).
    return (1.0 + sign((level / MAX_LEVEL) * 0.9),)
  if name in ("ShearX", "ShearY"):  # [-0.3, 0.3].
    return (sign((level / MAX_LEVEL) * 0.3),)
  if name in ("TranslateX", "TranslateY"):  # pixels, +-translate_const.
    return (sign((level / MAX_LEVEL) * float(hparams["translate_const"])),)
  if name in ("TranslateXRel", "TranslateYRel"):  # fraction, +-0.45.
    return (sign((level / MAX_LEVEL) * hparams.get("translate_pct", 0.45)),)
  raise ValueError(f"Unknown augmentation op {name!r}.")


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  if img.mode in ("L", "RGB"):
    if img.mode == "RGB":
      lut = lut * 3
    return img.point(lut)
  return img


def _posterize(img: Image.Image, bits: int) -> Image.Image:
  """``ImageOps.posterize``, also for 0 bits (an all-black image).

  timm passes 0 bits for Posterize below magnitude 2.5 and for
  PosterizeIncreasing at magnitude 10 (so ~1% of BEiT's RandAugment ops). The
  Pillow of timm 0.3.2's day masked with ``~255`` (black); Pillow 13 raises
  ValueError instead, so the LUT is built here.
  """
  if bits >= 8:
    return img
  mask = ~(2 ** (8 - bits) - 1)
  lut = [i & mask for i in range(256)]
  if img.mode in ("L", "RGB"):
    return img.point(lut * 3 if img.mode == "RGB" else lut)
  return ImageOps.posterize(img, bits)


def _affine(img, matrix, resample, fill):
  return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _apply(
  img: Image.Image,
  name: str,
  args: tuple[Any, ...],
  resample: Image.Resampling,
  fill: tuple[int, ...],
) -> Image.Image:
  """timm's ``NAME_TO_OP[name](img, *args, fillcolor=, resample=)``."""
  if name == "AutoContrast":
    return ImageOps.autocontrast(img)
  if name == "Equalize":
    return ImageOps.equalize(img)
  if name == "Invert":
    return ImageOps.invert(img)
  if name == "Rotate":
    return img.rotate(args[0], resample=resample, fillcolor=fill)
  if name.startswith("Posterize"):
    return _posterize(img, args[0])
  if name in ("Solarize", "SolarizeIncreasing"):
    return ImageOps.solarize(img, args[0])
  if name == "SolarizeAdd":
    return _solarize_add(img, args[0])
  enhancers = {
    "Color": ImageEnhance.Color,
    "Contrast": ImageEnhance.Contrast,
    "Brightness": ImageEnhance.Brightness,
    "Sharpness": ImageEnhance.Sharpness,
  }
  base = name.removesuffix("Increasing")
  if base in enhancers:
    return enhancers[base](img).enhance(args[0])
  if name == "ShearX":
    return _affine(img, (1, args[0], 0, 0, 1, 0), resample, fill)
  if name == "ShearY":
    return _affine(img, (1, 0, 0, args[0], 1, 0), resample, fill)
  if name == "TranslateX":
    return _affine(img, (1, 0, args[0], 0, 1, 0), resample, fill)
  if name == "TranslateY":
    return _affine(img, (1, 0, 0, 0, 1, args[0]), resample, fill)
  if name == "TranslateXRel":
    return _affine(img, (1, 0, args[0] * img.size[0], 0, 1, 0), resample, fill)
  if name == "TranslateYRel":
    return _affine(img, (1, 0, 0, 0, 1, args[0] * img.size[1]), resample, fill)
  raise ValueError(f"Unknown augmentation op {name!r}.")


def _resample_choices(hparams: Mapping[str, Any]) -> tuple[Image.Resampling, ...]:
  """timm's ``resample`` kwarg: ``hparams['interpolation']`` or random."""
  interp = hparams.get("interpolation", RANDOM_INTERPOLATION)
  if isinstance(interp, (list, tuple)):
    return tuple(
      transforms.pil_interpolation(i) if isinstance(i, str) else Image.Resampling(i) for i in interp
    )
  if isinstance(interp, str):
    return (transforms.pil_interpolation(interp),)
  return (Image.Resampling(interp),)


def _clip_magnitude(magnitude: float) -> float:
  return min(MAX_LEVEL, max(0, magnitude))  # timm 0.3.2's clip, verbatim.


def apply_op(
  img: Image.Image,
  name: str,
  magnitude: float,
  hparams: Mapping[str, Any] | None = None,
  *,
  negate: bool = False,
  resample: Image.Resampling | None = None,
) -> Image.Image:
  """One timm ``AugmentOp`` at a fixed magnitude and sign (no randomness).

  The magnitude is clipped to [0, 10], mapped to the op's argument by timm's
  level function (negated when ``negate`` and the op is signed) and the op is
  applied with fill ``hparams['img_mean']`` (default 128 grey).

  Args:
    img: RGB PIL image.
    name: A timm op name, e.g. ``'Rotate'`` or ``'SolarizeIncreasing'``.
    magnitude: Magnitude (timm's ``M``), clipped to [0, 10].
    hparams: timm augmentation hparams (see :func:`rand_augment_hparams`).
    negate: Negate the argument of a signed op (ignored by the others).
    resample: Resampling filter of geometric ops; None means
      ``hparams['interpolation']``, which must then be a single filter.

  Returns:
    The augmented PIL image.
  """
  hparams = _HPARAMS_DEFAULT if hparams is None else hparams
  if resample is None and name in _GEOMETRIC_OPS:
    choices = _resample_choices(hparams)
    if len(choices) != 1:
      raise ValueError("Random interpolation needs an explicit resample.")
    resample = choices[0]
  args = _level_args(name, _clip_magnitude(magnitude), hparams, negate)
  fill = tuple(hparams.get("img_mean", _FILL))
  return _apply(img, name, args, resample, fill)


class OpDraw(NamedTuple):
  """The random draws of one chosen op (``magnitude`` None when skipped)."""

  name: str
  applied: bool
  magnitude: float | None = None
  negate: bool = False
  resample: Image.Resampling | None = None


class AugmentOp:
  """timm 0.3.2 ``AugmentOp``, randomness from a numpy Generator.

  Per call: skip when ``rng.random() > prob``; magnitude ``rng.normal(M,
  magnitude_std)`` when ``hparams['magnitude_std'] > 0`` (else ``M``), clipped
  to [0, 10]; signed ops negate their argument when ``rng.random() > 0.5``;
  geometric ops pick the filter with ``rng.integers`` when the interpolation
  is random.
  """

  def __init__(
    self,
    name: str,
    prob: float = 0.5,
    magnitude: float = 10,
    hparams: Mapping[str, Any] | None = None,
  ):
    hparams = _HPARAMS_DEFAULT if hparams is None else hparams
    _level_args(name, 0.0, {"translate_const": 0}, False)  # Validates name.
    self.name = name
    self.prob = prob
    self.magnitude = magnitude
    self.hparams = dict(hparams)
    self.magnitude_std = self.hparams.get("magnitude_std", 0)
    self.resample_choices = _resample_choices(self.hparams)

  def __repr__(self) -> str:
    return (
      f"AugmentOp(name={self.name}, p={self.prob}, m={self.magnitude}, mstd={self.magnitude_std})"
    )

  def get_params(self, rng: np.random.Generator) -> OpDraw:
    if self.prob < 1.0 and rng.random() > self.prob:
      return OpDraw(self.name, False)
    magnitude = self.magnitude
    if self.magnitude_std and self.magnitude_std > 0:
      # 0.3.2: always Gaussian (1.x samples U(0, M) when mstd is inf / > 100).
      magnitude = float(rng.normal(magnitude, self.magnitude_std))
    magnitude = _clip_magnitude(magnitude)  # 0.3.2: [0, 10], no magnitude_max.
    negate = self.name in _SIGNED_OPS and bool(rng.random() > 0.5)
    resample = None
    if self.name in _GEOMETRIC_OPS:
      choices = self.resample_choices
      resample = choices[0] if len(choices) == 1 else choices[int(rng.integers(len(choices)))]
    return OpDraw(self.name, True, magnitude, negate, resample)

  def apply(self, img: Image.Image, draw: OpDraw) -> Image.Image:
    if not draw.applied:
      return img
    return apply_op(
      img, self.name, draw.magnitude, self.hparams, negate=draw.negate, resample=draw.resample
    )

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return self.apply(img, self.get_params(rng))


class RandAugment:
  """timm ``RandAugment``: ``num_layers`` ops per image, each an AugmentOp.

  Ops are chosen uniformly with replacement (timm's ``np.random.choice(ops,
  n)``) or, with ``choice_weights``, without replacement by weight.
  ``__call__`` takes and returns a PIL image or an ``(H, W, 3)`` uint8 array.
  """

  def __init__(
    self,
    ops: Sequence[AugmentOp],
    num_layers: int = 2,
    choice_weights: Sequence[float] | None = None,
  ):
    self.ops = list(ops)
    self.num_layers = int(num_layers)
    self.choice_weights = None if choice_weights is None else np.asarray(choice_weights, float)

  def __repr__(self) -> str:
    ops = ", ".join(op.name for op in self.ops)
    return f"RandAugment(n={self.num_layers}, ops=[{ops}])"

  def get_params(self, rng: np.random.Generator) -> tuple[OpDraw, ...]:
    """Draws the ops and their parameters, in timm's order."""
    if self.choice_weights is None:
      idx = rng.integers(0, len(self.ops), size=self.num_layers)
    else:
      idx = rng.choice(len(self.ops), self.num_layers, replace=False, p=self.choice_weights)
    return tuple(self.ops[int(i)].get_params(rng) for i in idx)

  def apply(self, img: Image.Image, draws: Sequence[OpDraw]) -> Image.Image:
    ops = {op.name: op for op in self.ops}
    for draw in draws:
      img = ops[draw.name].apply(img, draw)
    return img

  def __call__(self, img: Any, rng: np.random.Generator) -> Any:
    pil = transforms.as_pil(img)
    out = self.apply(pil, self.get_params(rng))
    return out if isinstance(img, Image.Image) else np.asarray(out, np.uint8)


def rand_augment_hparams(
  img_size: int | Sequence[int],
  mean: Sequence[float] = pixels.IMAGENET_MEAN,
  interpolation: str = "bicubic",
) -> dict[str, Any]:
  """timm ``transforms_imagenet_train``'s ``aa_params``.

  ``translate_const = int(min(img_size) * 0.45)`` (only used by the absolute
  TranslateX/Y ops, which RandAugment does not use), ``img_mean =
  min(255, round(255 * m))`` per channel (the fill of geometric ops), and the
  PIL ``interpolation`` unless it is ``'random'`` (then geometric ops pick
  bilinear or bicubic at random).
  """
  size = img_size if isinstance(img_size, int) else min(img_size)
  hparams = {
    "translate_const": int(size * 0.45),
    "img_mean": tuple(min(255, round(255 * x)) for x in mean),
  }
  if interpolation and interpolation != "random":
    hparams["interpolation"] = transforms.pil_interpolation(interpolation)
  return hparams


def rand_augment_transform(
  config_str: str, hparams: Mapping[str, Any] | None = None
) -> RandAugment:
  """timm 0.3.2 ``rand_augment_transform``: parses ``rand-m9-mstd0.5-inc1``.

  Dash-separated sections after ``rand``: ``m{int}`` magnitude (default 10),
  ``n{int}`` ops per image (default 2), ``mstd{float}`` magnitude std
  (``hparams.setdefault``), ``inc{X}`` increasing op set (0.3.2 tests
  ``bool(X)`` on the string, so ``inc0`` enables it too), ``w{int}`` weighted
  choice (only 0). Sections without a digit are skipped; other keys raise.
  """
  hparams = dict(_HPARAMS_DEFAULT if hparams is None else hparams)
  magnitude = MAX_LEVEL
  num_layers = 2
  weight_idx = None
  names = RAND_TRANSFORMS
  config = config_str.split("-")
  if config[0] != "rand":
    raise ValueError(f"Not a RandAugment config: {config_str!r}.")
  for c in config[1:]:
    cs = re.split(r"(\d.*)", c)
    if len(cs) < 2:
      continue
    key, val = cs[:2]
    if key == "mstd":
      hparams.setdefault("magnitude_std", float(val))
    elif key == "inc":
      if bool(val):  # 0.3.2 quirk: any non-empty string, 'inc0' included.
        names = RAND_INCREASING_TRANSFORMS
    elif key == "m":
      magnitude = int(val)
    elif key == "n":
      num_layers = int(val)
    elif key == "w":
      weight_idx = int(val)
    else:
      raise ValueError(f"Unknown RandAugment config section {c!r} in {config_str!r}.")
  ops = [AugmentOp(n, prob=0.5, magnitude=magnitude, hparams=hparams) for n in names]
  weights = None
  if weight_idx is not None:
    if weight_idx != 0:
      raise ValueError(f"Only RandAugment weights w0 exist, got w{weight_idx}.")
    # 0.3.2 looks the weights up by the plain names, for either op set.
    weights = np.asarray([_RAND_CHOICE_WEIGHTS_0[k] for k in RAND_TRANSFORMS])
    weights = weights / np.sum(weights)
  return RandAugment(ops, num_layers, choice_weights=weights)
