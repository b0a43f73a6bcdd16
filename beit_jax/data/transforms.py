"""Host-side image augmentation and the evaluation views (numpy/PIL).

The random transforms are callables ``(image, rng) -> dict`` taking an ``(H, W, 3)``
uint8 array and the ``np.random.Generator`` that Grain's ``random_map`` supplies for the
element; they draw randomness from that generator only, so results are reproducible per
seed and element. They return uint8 arrays: images travel to the device as uint8 and are
normalised there with :func:`beit_jax.pixels.normalize`, inside the jitted step.

The pre-training transform reproduces unilm BEiT's ``DataAugmentationForBEiT``
(``ColorJitter(0.4, 0.4, 0.4)`` -> ``RandomHorizontalFlip(0.5)`` ->
``RandomResizedCropAndInterpolationWithTwoPic``: one crop box resized twice,
bicubic to 224 for the ViT and lanczos to 112 for the tokenizer) with the same
PIL operations as torchvision 0.8 / timm 0.3.2 (the versions unilm pins).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageStat

INTERPOLATIONS = {
  "nearest": Image.Resampling.NEAREST,
  "bilinear": Image.Resampling.BILINEAR,
  "bicubic": Image.Resampling.BICUBIC,
  "lanczos": Image.Resampling.LANCZOS,
  "box": Image.Resampling.BOX,
  "hamming": Image.Resampling.HAMMING,
}


def pil_interpolation(name: str) -> Image.Resampling:
  """The PIL resampling filter for an interpolation name."""
  try:
    return INTERPOLATIONS[name.lower()]
  except KeyError:
    raise ValueError(
      f"Unknown interpolation {name!r}; expected one of {sorted(INTERPOLATIONS)}."
    ) from None


def as_pil(image: np.ndarray | Image.Image) -> Image.Image:
  """An RGB PIL image from an ``(H, W, 3)`` uint8 array or any PIL image."""
  if isinstance(image, Image.Image):
    return image if image.mode == "RGB" else image.convert("RGB")
  array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f"Expected an (H, W, 3) uint8 image, got {array.shape} {array.dtype}.")
  return Image.fromarray(array)


# ----------------------------------------------------------------------------
# Colour jitter.
# ----------------------------------------------------------------------------


def _jitter_range(value: float, name: str) -> tuple[float, float] | None:
  """torchvision ``ColorJitter._check_input`` for a non-negative scalar."""
  if value < 0:
    raise ValueError(f"{name} jitter must be non-negative, got {value}.")
  lo, hi = max(0.0, 1.0 - value), 1.0 + value
  if lo == hi == 1.0:
    return None  # torchvision skips the op entirely.
  return (lo, hi)


class ColorJitter:
  """torchvision's ``ColorJitter(brightness, contrast, saturation)`` on PIL.

  Per call (torchvision >= 0.8 ``ColorJitter.get_params``): a random
  permutation of the four ops (brightness 0, contrast 1, saturation 2, hue 3),
  then one factor per enabled op drawn from ``U[max(0, 1 - x), 1 + x]`` (in the
  order brightness, contrast, saturation); the enabled ops are applied in the
  permuted order with ``ImageEnhance.Brightness`` / ``Contrast`` / ``Color``
  (torchvision's ``functional_pil.adjust_*``). An op with strength 0 is
  disabled and draws no factor. Hue is not supported (BEiT uses none).

  The results are PIL's, byte for byte, computed with less work
  (:meth:`jittered_crop`): all three ops are per-pixel blends (``Image.blend``
  with a black image, with a constant grey of the image's mean luma, and with the
  image's own luma), so a crop of the jittered image is the jittered crop, given
  the contrast op's grey level, which is the luma mean of the *whole* image as the
  preceding ops left it; brightness and contrast blend each channel value with a
  constant, so they are 256-entry tables (``Image.point``, 3x faster than a
  blend), made by running ``Image.blend`` itself on the 256 values.
  """

  def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0):
    self.ranges = (
      _jitter_range(float(brightness), "brightness"),
      _jitter_range(float(contrast), "contrast"),
      _jitter_range(float(saturation), "saturation"),
    )

  @property
  def enabled(self) -> bool:
    return any(r is not None for r in self.ranges)

  def get_params(self, rng: np.random.Generator) -> tuple[list[int], list[float | None]]:
    """Draws ``(order, factors)``; ``factors[i]`` is None for disabled ops."""
    order = [int(i) for i in rng.permutation(4)]
    factors = [None if r is None else float(rng.uniform(r[0], r[1])) for r in self.ranges]
    return order, factors

  @staticmethod
  def apply(img: Image.Image, order: Sequence[int], factors: Sequence[float | None]) -> Image.Image:
    """Applies the ops in ``order`` with ``factors`` (PIL in, PIL out)."""
    return ColorJitter.jittered_crop(img, (0, 0, img.height, img.width), order, factors)

  @staticmethod
  def jittered_crop(
    img: Image.Image,
    box: tuple[int, int, int, int],
    order: Sequence[int],
    factors: Sequence[float | None],
  ) -> Image.Image:
    """``apply(img, order, factors).crop(box)``, jittering only the crop.

    ``box`` is ``(top, left, h, w)``. The contrast op's grey level comes from the
    luma histogram of the crop plus that of the rest of the image (up to four
    strips), each as the ops before contrast left it, so the whole image is
    processed about once instead of once per op.
    """
    top, left, h, w = box
    region = img.crop((left, top, left + w, top + h))
    ops = [op for op in order if op < 3 and factors[op] is not None]
    for i, op in enumerate(ops):
      factor = factors[op]
      if op == _SATURATION:
        region = ImageEnhance.Color(region).enhance(factor)
        continue
      grey = 0 if op == _BRIGHTNESS else _luma_mean(img, box, region, ops[:i], factors)
      region = region.point(_blend_table(grey, factor) * len(region.getbands()))
    return region

  def jitter_pil(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    if not self.enabled:
      return img
    order, factors = self.get_params(rng)
    return self.apply(img, order, factors)

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Jitters an ``(H, W, 3)`` uint8 image; returns uint8."""
    return np.asarray(self.jitter_pil(as_pil(image), rng), dtype=np.uint8)


_BRIGHTNESS, _CONTRAST, _SATURATION = 0, 1, 2
_CHANNEL_VALUES = Image.frombytes("L", (256, 1), bytes(range(256)))


def _blend_table(grey: int, factor: float) -> list[int]:
  """``Image.blend(constant grey, v, factor)`` for each channel value v in 0..255."""
  constant = Image.new("L", (256, 1), grey)
  return list(Image.blend(constant, _CHANNEL_VALUES, factor).tobytes())


def _luma_mean(
  img: Image.Image,
  box: tuple[int, int, int, int],
  region: Image.Image,
  before: Sequence[int],
  factors: Sequence[float | None],
) -> int:
  """PIL ``ImageEnhance.Contrast``'s grey level of the whole image after the ops
  ``before``: ``int(mean luma + 0.5)``, from the histograms of ``region`` (the crop,
  already through ``before``) and of the rest of the image put through ``before``."""
  top, left, h, w = box
  width, height = img.size
  strips = (
    (0, 0, width, top),
    (0, top + h, width, height),
    (0, top, left, top + h),
    (left + w, top, width, top + h),
  )
  histogram = region.convert("L").histogram()
  for x0, y0, x1, y1 in strips:
    if x1 <= x0 or y1 <= y0:
      continue
    strip = ColorJitter.apply(img.crop((x0, y0, x1, y1)), before, factors)
    histogram = [a + b for a, b in zip(histogram, strip.convert("L").histogram())]
  return int(ImageStat.Stat(histogram).mean[0] + 0.5)


# ----------------------------------------------------------------------------
# Random resized crop.
# ----------------------------------------------------------------------------


def random_resized_crop_box(
  height: int,
  width: int,
  rng: np.random.Generator,
  scale: Sequence[float] = (0.08, 1.0),
  ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
  """torchvision/timm ``RandomResizedCrop.get_params``: ``(top, left, h, w)``.

  Up to 10 attempts: ``target_area = area * U(scale)``, ``aspect =
  exp(U(log ratio))``, ``w = int(round(sqrt(target_area * aspect)))``, ``h =
  int(round(sqrt(target_area / aspect)))``; the first box that fits is placed
  at ``top ~ randint[0, H - h]``, ``left ~ randint[0, W - w]`` (inclusive).
  Otherwise a centre crop of the whole image, clamped to the ratio range.

  Draw order per attempt: scale uniform, log-ratio uniform, then (if it fits)
  top and left integers, as in torchvision. A box must also be non-empty
  (torchvision's ``0 < w``, ``0 < h``; timm 0.3.2 omits that check, which only
  differs for images of a few pixels where timm would return an empty box).

  Args:
    height: Image height H.
    width: Image width W.
    rng: Random generator.
    scale: Range of the crop area as a fraction of the image area.
    ratio: Range of the crop aspect ratio (width / height).

  Returns:
    ``(top, left, h, w)`` in pixels.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * float(rng.uniform(scale[0], scale[1]))
    aspect_ratio = math.exp(float(rng.uniform(log_ratio[0], log_ratio[1])))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
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
  top = (height - h) // 2
  left = (width - w) // 2
  return top, left, h, w


def _resized(img: Image.Image, size: int, resample: Image.Resampling) -> np.ndarray:
  return np.asarray(img.resize((size, size), resample), dtype=np.uint8)


def resized_crop(
  img: Image.Image, box: tuple[int, int, int, int], size: int, resample: Image.Resampling
) -> np.ndarray:
  """torchvision ``F.resized_crop`` on PIL: crop, then resize to size x size."""
  top, left, h, w = box
  return _resized(img.crop((left, top, left + w, top + h)), size, resample)


# ----------------------------------------------------------------------------
# Training views.
# ----------------------------------------------------------------------------


class TwoViewTransform:
  """BEiT's pre-training augmentation: one crop box, two resized views.

  unilm ``DataAugmentationForBEiT``: ``ColorJitter(cj, cj, cj)`` on the whole
  image (skipped when ``color_jitter`` is 0) -> horizontal flip with
  probability ``flip_prob`` -> one :func:`random_resized_crop_box` -> the box
  cropped and resized (PIL) to ``size`` with ``interpolation`` for the ViT view
  and to ``second_size`` with ``second_interpolation`` for the tokenizer view.
  Randomness is drawn in that order from the given generator.

  Returns ``{'image': uint8 (size, size, 3), 'tokenizer_image': uint8
  (second_size, second_size, 3)}``; only ``'image'`` when ``second_size`` is
  None. No normalisation happens here.
  """

  def __init__(
    self,
    size: int,
    second_size: int | None = None,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    interpolation: str = "bicubic",
    second_interpolation: str = "lanczos",
    color_jitter: float = 0.4,
    flip_prob: float = 0.5,
    *,
    key: str = "image",
    second_key: str = "tokenizer_image",
  ):
    self.size = int(size)
    self.second_size = None if second_size is None else int(second_size)
    self.scale = tuple(float(s) for s in scale)
    self.ratio = tuple(float(r) for r in ratio)
    if not 0.0 < self.scale[0] <= self.scale[1]:
      raise ValueError(f"Invalid crop scale range {self.scale}.")
    if not 0.0 < self.ratio[0] <= self.ratio[1]:
      raise ValueError(f"Invalid crop ratio range {self.ratio}.")
    self.interpolation = pil_interpolation(interpolation)
    self.second_interpolation = pil_interpolation(second_interpolation)
    self.jitter = ColorJitter(color_jitter, color_jitter, color_jitter)
    self.flip_prob = float(flip_prob)
    self.key = key
    self.second_key = second_key

  def output_keys(self) -> tuple[str, ...]:
    if self.second_size is None:
      return (self.key,)
    return (self.key, self.second_key)

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    img = as_pil(image)
    jitter = self.jitter.get_params(rng) if self.jitter.enabled else None
    flip = rng.random() < self.flip_prob
    top, left, h, w = random_resized_crop_box(img.height, img.width, rng, self.scale, self.ratio)
    # Equal to jittering and flipping the whole image and then cropping (see
    # ColorJitter.jittered_crop), with less work: the box, drawn on the flipped
    # image, is mirrored onto the original, and only the crop is jittered and flipped.
    if flip:
      left = img.width - left - w
    box = (top, left, h, w)
    if jitter is None:
      crop = img.crop((left, top, left + w, top + h))
    else:
      crop = ColorJitter.jittered_crop(img, box, *jitter)
    if flip:
      crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = {self.key: _resized(crop, self.size, self.interpolation)}
    if self.second_size is not None:
      out[self.second_key] = _resized(crop, self.second_size, self.second_interpolation)
    return out


class SingleViewTransform:
  """Random-resized-crop + horizontal flip (+ optional jitter) to one size.

  Used to train the dVAE on ``'tokenizer_image'``. The same op sequence as
  :class:`TwoViewTransform` (jitter -> flip -> crop box -> resize); flipping
  before or after the crop gives the same distribution as torchvision's
  ``RandomResizedCrop -> RandomHorizontalFlip``.
  """

  def __init__(
    self,
    size: int,
    key: str = "image",
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    interpolation: str = "bicubic",
    flip_prob: float = 0.5,
    color_jitter: float = 0.0,
  ):
    self.key = key
    self._two_view = TwoViewTransform(
      size,
      None,
      scale,
      ratio,
      interpolation,
      color_jitter=color_jitter,
      flip_prob=flip_prob,
      key=key,
    )

  def output_keys(self) -> tuple[str, ...]:
    return (self.key,)

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return self._two_view(image, rng)


class CenterCropTransform:
  """Deterministic eval view (timm/torchvision eval style).

  Resize the shorter side to ``int(size / crop_pct)`` keeping the aspect
  (torchvision 0.8 ``F.resize`` with an int: the longer side is
  ``int(new_short * long / short)``), then centre-crop ``size x size`` with
  torchvision's ``CenterCrop`` offsets (``int(round((H - size) / 2))``).
  BEiT's ImageNet eval is ``size=224, crop_pct=224/256``.
  """

  def __init__(
    self,
    size: int,
    key: str = "image",
    interpolation: str = "bicubic",
    crop_pct: float = 1.0,
  ):
    if not 0.0 < crop_pct <= 1.0:
      raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    self.size = int(size)
    self.key = key
    self.interpolation = pil_interpolation(interpolation)
    self.crop_pct = float(crop_pct)
    self.resize_size = int(math.floor(self.size / self.crop_pct))

  def output_keys(self) -> tuple[str, ...]:
    return (self.key,)

  def __call__(
    self, image: np.ndarray, rng: np.random.Generator | None = None
  ) -> dict[str, np.ndarray]:
    del rng  # Deterministic.
    img = as_pil(image)
    w, h = img.size
    target = self.resize_size
    if not ((w <= h and w == target) or (h <= w and h == target)):
      if w < h:
        ow, oh = target, int(target * h / w)
      else:
        oh, ow = target, int(target * w / h)
      img = img.resize((ow, oh), self.interpolation)
    w, h = img.size
    top = int(round((h - self.size) / 2.0))
    left = int(round((w - self.size) / 2.0))
    crop = img.crop((left, top, left + self.size, top + self.size))
    return {self.key: np.asarray(crop, dtype=np.uint8)}


class ParallelViews:
  """Several transforms of the same image, outputs merged into one dict.

  E.g. the MIM eval views: a centre crop at the ViT size and one at the
  tokenizer size. Each transform is called with the same ``rng`` (in order);
  output keys must not collide.
  """

  def __init__(self, *views: Any):
    keys = [k for v in views for k in v.output_keys()]
    if len(set(keys)) != len(keys):
      raise ValueError(f"Views produce colliding keys: {keys}.")
    self.views = views

  def output_keys(self) -> tuple[str, ...]:
    return tuple(k for v in self.views for k in v.output_keys())

  def __call__(
    self, image: np.ndarray, rng: np.random.Generator | None = None
  ) -> dict[str, np.ndarray]:
    out = {}
    for view in self.views:
      out.update(view(image, rng))
    return out
