"""Fine-tuning augmentation: timm 0.3.2's ImageNet train transform and random erasing.

unilm BEiT's ``run_class_finetuning.py`` (timm 0.3.2) trains with
``create_transform(224, is_training=True, color_jitter=0.4,
auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', re_prob=0.25,
re_mode='pixel', re_count=1)``, i.e. timm's ``transforms_imagenet_train``:

  RandomResizedCropAndInterpolation -> RandomHorizontalFlip(0.5) ->
  RandAugment (colour jitter only when auto_augment is off) -> ToTensor ->
  Normalize -> RandomErasing (on the normalised tensor).

:class:`FinetuneTrainTransform` runs everything up to RandAugment
(:mod:`beit_jax.data.randaugment`) on the host (PIL, uint8) inside Grain's ``random_map``
and draws the random-erasing boxes there too (:class:`RandomErasingBoxes`);
:func:`apply_random_erasing` fills the boxes on the device after normalisation (static
shapes, inside ``jit``). Host randomness comes from the element's ``np.random.Generator``,
with timm's draws mapped as in :mod:`beit_jax.data.randaugment` (``torch.rand(1) < p`` ->
``rng.random() < p``), so given the same stream of draws the outputs equal timm's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from beit_jax import pixels
from beit_jax.data import randaugment, transforms

# ----------------------------------------------------------------------------
# Random erasing.
# ----------------------------------------------------------------------------

ERASE_MODES = ("pixel", "rand", "const")


class RandomErasingBoxes:
  """timm ``RandomErasing._erase``'s box sampling, as a static-shape array.

  With probability ``probability`` (erase iff ``rng.random() <=
  probability``): ``count = randint[min_count, max_count]`` (no draw when they
  are equal); per box, up to 10 attempts of ``target = U(min_area, max_area) *
  H * W / count``, ``aspect = exp(U(log min_aspect, log max_aspect))``, ``h =
  int(round(sqrt(target * aspect)))``, ``w = int(round(sqrt(target /
  aspect)))``; the first with ``w < W and h < H`` is placed at ``top =
  randint[0, H - h]``, ``left = randint[0, W - w]`` (inclusive).

  ``__call__(height, width, rng)`` returns int32 ``(max_count, 4)`` rows
  ``(top, left, h, w)``: the placed boxes in order, then zero rows (a box with
  ``h == 0`` or ``w == 0`` erases nothing).
  """

  def __init__(
    self,
    probability: float = 0.5,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    min_count: int = 1,
    max_count: int | None = None,
  ):
    self.probability = float(probability)
    self.min_area = min_area
    self.max_area = max_area
    max_aspect = max_aspect or 1 / min_aspect
    self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
    self.min_count = int(min_count)
    self.max_count = int(max_count or min_count)
    if not 1 <= self.min_count <= self.max_count:
      raise ValueError(f"Need 1 <= min_count <= max_count, got {min_count}, {max_count}.")

  def __call__(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    boxes = np.zeros((self.max_count, 4), np.int32)
    if rng.random() > self.probability:
      return boxes
    area = height * width
    count = (
      self.min_count
      if self.min_count == self.max_count
      else int(rng.integers(self.min_count, self.max_count + 1))
    )
    placed = 0
    for _ in range(count):
      for _ in range(10):
        target_area = rng.uniform(self.min_area, self.max_area) * area / count
        aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
        h = int(round(math.sqrt(target_area * aspect_ratio)))
        w = int(round(math.sqrt(target_area / aspect_ratio)))
        if w < width and h < height:
          top = int(rng.integers(0, height - h + 1))
          left = int(rng.integers(0, width - w + 1))
          boxes[placed] = (top, left, h, w)
          placed += 1
          break
    return boxes


def apply_random_erasing(images: Any, boxes: Any, rng: Any, mode: str = "pixel") -> Any:
  """Fills erase boxes of normalised images, like timm's ``RandomErasing``.

  For use inside ``jit``: masks come from iota comparisons, so shapes are
  static. Boxes are applied in order (later ones overwrite earlier ones).

  Args:
    images: ``(B, H, W, C)`` float images, already normalised.
    boxes: ``(B, K, 4)`` int ``(top, left, h, w)`` from
      :class:`RandomErasingBoxes` (empty boxes change nothing).
    rng: JAX PRNG key.
    mode: ``'pixel'`` (per-pixel N(0, 1) noise), ``'rand'`` (one N(0, 1)
      colour per box and channel) or ``'const'`` (zeros).

  Returns:
    The images with the boxes filled, same shape and dtype.
  """
  mode = mode.lower()
  if mode not in ERASE_MODES:
    raise ValueError(f"Unknown erase mode {mode!r}; expected {ERASE_MODES}.")
  images = jnp.asarray(images)
  boxes = jnp.asarray(boxes)
  b, height, width, c = images.shape
  ys = jnp.arange(height)[None, :, None]
  xs = jnp.arange(width)[None, None, :]

  def box_mask(k):  # (B, H, W, 1) bool.
    top, left, h, w = (boxes[:, k, i][:, None, None] for i in range(4))
    inside = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)
    return inside[..., None]

  num_boxes = boxes.shape[1]
  if mode == "rand":
    keys = jax.random.split(rng, num_boxes)
    for k in range(num_boxes):
      colour = jax.random.normal(keys[k], (b, 1, 1, c), images.dtype)
      images = jnp.where(box_mask(k), colour, images)
    return images
  # Per-pixel i.i.d. noise (or zeros): one fill for the union of the boxes has
  # the same distribution as timm's box-by-box fills.
  mask = jnp.zeros((b, height, width, 1), bool)
  for k in range(num_boxes):
    mask = mask | box_mask(k)
  if mode == "pixel":
    fill = jax.random.normal(rng, images.shape, images.dtype)
  else:
    fill = jnp.zeros((), images.dtype)
  return jnp.where(mask, fill, images)


# ----------------------------------------------------------------------------
# The fine-tuning train transform.
# ----------------------------------------------------------------------------


class FinetuneTrainTransform:
  """timm 0.3.2 ``transforms_imagenet_train`` up to normalisation, on PIL.

  ``RandomResizedCropAndInterpolation(size, scale, ratio, interpolation)``
  (timm's box, :func:`transforms.random_resized_crop_box`; with
  ``'random'`` interpolation, bilinear or bicubic drawn after the box) ->
  horizontal flip when ``rng.random() < hflip`` (torchvision's ``torch.rand(1)
  < p``, after the crop as in timm) -> RandAugment from ``auto_augment`` with
  :func:`randaugment.rand_augment_hparams` (or, when ``auto_augment`` is empty,
  torchvision ``ColorJitter(color_jitter)``) -> random-erasing boxes drawn for
  the ``size x size`` output (``re_prob`` 0 draws nothing and gives zeros).

  Returns ``{'image': uint8 (size, size, 3), 'erase_boxes': int32 (re_count,
  4)}``; normalise and :func:`apply_random_erasing` with ``re_mode`` on the
  device.
  """

  def __init__(
    self,
    size: int = 224,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    interpolation: str = "bicubic",
    hflip: float = 0.5,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    color_jitter: float | Sequence[float] | None = 0.4,
    mean: Sequence[float] = pixels.IMAGENET_MEAN,
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    *,
    key: str = "image",
    boxes_key: str = "erase_boxes",
  ):
    """Initialises the transform.

    Args:
      size: Output side (timm ``input_size``).
      scale: RandomResizedCrop area range.
      ratio: RandomResizedCrop aspect range.
      interpolation: Crop-resize and RandAugment interpolation, or
        ``'random'`` (bilinear/bicubic per call, as timm).
      hflip: Horizontal flip probability (0 draws nothing).
      auto_augment: timm ``rand-...`` config, or None / '' for none.
      color_jitter: Brightness/contrast/saturation strength (scalar or a
        3-sequence), used only without auto_augment; None for none.
      mean: Normalisation mean: RandAugment fills with ``round(255 * mean)``
        (unilm passes ImageNet's, or (0.5,) * 3 without
        ``--imagenet_default_mean_and_std``).
      re_prob: Random erasing probability.
      re_mode: Random erasing fill, for :func:`apply_random_erasing`.
      re_count: Maximum boxes per image (count ~ randint[1, re_count]).
      key: Output key of the image.
      boxes_key: Output key of the erase boxes.
    """
    self.size = int(size)
    self.scale = tuple(float(s) for s in scale)
    self.ratio = tuple(float(r) for r in ratio)
    self.random_interpolation = interpolation == "random"
    self.interpolation = (
      randaugment.RANDOM_INTERPOLATION
      if self.random_interpolation
      else transforms.pil_interpolation(interpolation)
    )
    self.hflip = float(hflip)
    self.rand_augment = None
    self.jitter = None
    if auto_augment:
      if not auto_augment.startswith("rand"):
        raise ValueError(f"Only RandAugment (rand-...) is supported, got {auto_augment!r}.")
      self.rand_augment = randaugment.rand_augment_transform(
        auto_augment, randaugment.rand_augment_hparams(self.size, mean, interpolation)
      )
    elif color_jitter is not None:
      cj = (
        (float(color_jitter),) * 3
        if isinstance(color_jitter, (int, float))
        else tuple(color_jitter)
      )
      if len(cj) != 3:
        raise ValueError("color_jitter must be a scalar or 3 values (no hue).")
      self.jitter = transforms.ColorJitter(*cj)
    if re_mode.lower() not in ERASE_MODES:
      raise ValueError(f"Unknown erase mode {re_mode!r}.")
    self.re_mode = re_mode.lower()
    self.re_prob = float(re_prob)
    self.re_count = int(re_count)
    self.erasing = RandomErasingBoxes(self.re_prob, max_count=self.re_count)
    self.key = key
    self.boxes_key = boxes_key

  def output_keys(self) -> tuple[str, ...]:
    return (self.key, self.boxes_key)

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    img = transforms.as_pil(image)
    box = transforms.random_resized_crop_box(img.height, img.width, rng, self.scale, self.ratio)
    resample = self.interpolation
    if self.random_interpolation:
      resample = resample[int(rng.integers(len(resample)))]
    array = transforms.resized_crop(img, box, self.size, resample)
    if self.hflip > 0 and rng.random() < self.hflip:
      array = array[:, ::-1]
    if self.rand_augment is not None:
      array = self.rand_augment(np.ascontiguousarray(array), rng)
    elif self.jitter is not None:
      array = self.jitter(np.ascontiguousarray(array), rng)
    if self.re_prob > 0:
      boxes = self.erasing(self.size, self.size, rng)
    else:
      boxes = np.zeros((self.re_count, 4), np.int32)
    return {self.key: np.ascontiguousarray(array, dtype=np.uint8), self.boxes_key: boxes}
