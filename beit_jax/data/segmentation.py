"""Semantic segmentation transforms on the host: mmseg 0.11's ADE20K train and test pipelines.

unilm BEiT's ADE20K config (``configs/_base_/datasets/ade20k.py``; mmseg 0.11, mmcv 1.3):
train = LoadAnnotations(reduce_zero_label=True), Resize((2048, 512), ratio_range=(0.5, 2)),
RandomCrop(512, cat_max_ratio=0.75), RandomFlip(0.5), PhotoMetricDistortion, Normalize,
Pad(512, 0, 255); test = Resize((2048, 512), keep_ratio), Normalize, scored against the
annotation at its original size. :class:`SegmentationTrainTransform` and
:class:`SegmentationEvalTransform` are those as ``(record, rng) -> {'image', 'label'}``
(uint8; the device normalises, ``beit_jax.pixels.normalize``), drawing from one
``np.random.Generator`` in mmseg's order: ratio; crop offsets (h, w) up to 11 times; flip;
the distortion's coins and values. Records: ``{'image': bytes, 'annotation': bytes | None,
'path', 'annotation_path'}`` from :mod:`beit_jax.data.segmentation_sources`.

mmseg computes with OpenCV, not a dependency here: its uint8 kernels are re-implemented in
numpy from OpenCV 4.x's source (read, not run, so bit equality is unverified):

* Resize, ``mmcv.imrescale``: ``f = min(long/max(h, w), short/min(h, w))``, size
  ``int(w*f + 0.5) x int(h*f + 0.5)``. Image: 8-bit ``INTER_LINEAR`` (2 taps at half-pixel
  centres, no antialiasing, 11-bit weights, the SIMD vertical rounding ``((b0*(S0>>4)>>16)
  + (b1*(S1>>4)>>16) + 2) >> 2`` and the scalar ``(S0*b0 + S1*b1 + 2**21) >> 22`` on row
  tails of 128-bit lanes; exact 2x shrinks go to ``INTER_AREA``; same size copies). PIL's
  BILINEAR differs: it antialiases when shrinking. Label: ``INTER_NEAREST``, source index
  ``min(floor(x * src/dst), src - 1)`` (PIL samples pixel centres instead).
* PhotoMetricDistortion runs on uint8 (Normalize comes after it): 8-bit ``BGR2HSV`` (H
  0..179, integer tables: exact) and ``HSV2BGR`` in float32, whose SIMD loop truncates
  ``x*255`` while each row's scalar tail rounds (``HSV_SIMD_PIXELS`` = 32: the AVX2
  dispatch; 16 on SSE-only CPUs). Other builds (NEON) may differ by one level.
* Decoding: PIL (libjpeg-turbo, like cv2's); EXIF orientation applied to images, as
  cv2.imread does, never to annotations (mmcv reads them 'unchanged' with pillow).
* Pad: mmseg pads after Normalize, so its padding is 0 *normalised* (the mean colour);
  ``pad_value`` here (default 0) is uint8, normalised later to -1 by ``'half'``.

Stricter than mmseg: annotations of several channels or above 255 (mmseg wraps them to
uint8), labels outside ``[0, num_classes)`` and 255, and image/annotation size mismatches
raise ValueError naming the file; a missing or undecodable file gives a
``pipeline.Undecodable``, skipped and counted by
:func:`beit_jax.data.segmentation_sources.make_train_dataset`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from beit_jax.data import decode, pipeline

IGNORE_INDEX = 255
HSV_SIMD_PIXELS = 32  # Pixels per SIMD block of OpenCV's HSV2RGB_b (AVX2); the row tail rounds.
_ONE = 2048  # INTER_RESIZE_COEF_SCALE.

# --- cv2.resize (uint8) and mmcv.imrescale.


def rescale_size(width: int, height: int, scale: Sequence[float]) -> tuple[int, int]:
  """``mmcv.rescale_size`` for a ``(long, short)`` scale: the keep-ratio ``(w, h)``."""
  factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
  return int(width * float(factor) + 0.5), int(height * float(factor) + 0.5)


def nearest_indices(src: int, dst: int) -> np.ndarray:
  """``cv2.INTER_NEAREST``'s source index of each of ``dst`` outputs."""
  ifx = 1.0 / (dst / src)
  return np.minimum(np.floor(np.arange(dst) * ifx).astype(np.int64), src - 1)


def resize_nearest(label: np.ndarray, height: int, width: int) -> np.ndarray:
  """``cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)``."""
  if label.shape[:2] == (height, width):
    return label.copy()
  rows = nearest_indices(label.shape[0], height)
  cols = nearest_indices(label.shape[1], width)
  return label[rows[:, None], cols[None, :]]


def _linear_taps(src: int, dst: int, clamp: bool) -> tuple[np.ndarray, ...]:
  """Source indices and 11-bit weights of cv2's INTER_LINEAR, per output index."""
  scale = 1.0 / (dst / src)
  f = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
  s = np.floor(f)
  f = f - s
  s = s.astype(np.int64)
  if clamp:  # The x taps: cv2 zeroes the fraction at both borders; the y taps keep it.
    low, high = s < 0, s >= src - 1
    f[low | high] = 0
    s[low], s[high] = 0, src - 1
  w0 = np.rint((np.float32(1) - f) * np.float32(_ONE)).astype(np.int32)
  w1 = np.rint(f * np.float32(_ONE)).astype(np.int32)
  return np.clip(s, 0, src - 1), np.clip(s + 1, 0, src - 1), w0, w1


def _vector_end(width: int) -> int:
  """Where ``VResizeLinearVec_32s8u`` (16 then 8 lanes) stops in a row of ``width`` values."""
  x = (width // 16) * 16
  while x < width - 8:
    x += 8
  return x


def resize_bilinear(
  image: np.ndarray,
  height: int,
  width: int,
  rows: tuple[int, int] | None = None,
  cols: tuple[int, int] | None = None,
) -> np.ndarray:
  """``cv2.resize(image, (width, height))`` (INTER_LINEAR) of an ``(H, W, C)`` uint8 array.

  ``rows``/``cols`` ``(start, stop)`` return only that window of the resized image (the same
  values as resizing everything and cropping, for less work).
  """
  h, w, c = image.shape
  r0, r1 = rows or (0, height)
  c0, c1 = cols or (0, width)
  if (h, w) == (height, width):
    return image[r0:r1, c0:c1].copy()
  if (h, w) == (2 * height, 2 * width):  # cv2 switches to INTER_AREA: 2x2 means.
    s = image[2 * r0 : 2 * r1, 2 * c0 : 2 * c1].astype(np.int32)
    total = s[0::2, 0::2] + s[0::2, 1::2] + s[1::2, 0::2] + s[1::2, 1::2]
    return ((total + 2) >> 2).astype(np.uint8)
  xi0, xi1, xw0, xw1 = (t[c0:c1] for t in _linear_taps(w, width, clamp=True))
  yi0, yi1, yw0, yw1 = (t[r0:r1] for t in _linear_taps(h, height, clamp=False))

  def horizontal(source_rows: np.ndarray) -> np.ndarray:
    s = image[source_rows].astype(np.int32)
    return s[:, xi0] * xw0[None, :, None] + s[:, xi1] * xw1[None, :, None]

  h0, h1 = horizontal(yi0), horizontal(yi1)
  b0, b1 = yw0[:, None, None], yw1[:, None, None]
  vector = ((((h0 >> 4) * b0) >> 16) + (((h1 >> 4) * b1) >> 16) + 2) >> 2
  scalar = (h0 * b0 + h1 * b1 + (1 << 21)) >> 22
  flat = np.arange(c0, c1)[:, None] * c + np.arange(c)[None, :]
  out = np.where((flat >= _vector_end(width * c))[None], scalar, vector)
  return np.clip(out, 0, 255).astype(np.uint8)


# --- cv2.cvtColor BGR<->HSV (uint8, H in 0..179) and mmseg's PhotoMetricDistortion.

_SDIV = np.array([0] + [round((255 << 12) / i) for i in range(1, 256)], np.int64)
_HDIV = np.array([0] + [round((180 << 12) / (6.0 * i)) for i in range(1, 256)], np.int64)
_HSCALE = np.float32(6) / np.float32(180)
_INV255 = np.float32(1) / np.float32(255)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
  """OpenCV's 8-bit RGB -> HSV (``RGB2HSV_b``, hrange 180) of an ``(..., 3)`` uint8 array."""
  r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
  v = np.maximum(np.maximum(r, g), b)
  diff = v - np.minimum(np.minimum(r, g), b)
  s = (diff * _SDIV[v] + 2048) >> 12
  h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
  h = (h * _HDIV[diff] + 2048) >> 12
  h = np.where(h < 0, h + 180, h)
  return np.stack([h, s, v], axis=-1).astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray, simd_pixels: int = HSV_SIMD_PIXELS) -> np.ndarray:
  """OpenCV's 8-bit HSV -> RGB (``HSV2RGB_b``) of an ``(H, W, 3)`` uint8 array (H 0..179).

  float32 throughout; ``x * 255`` is truncated in the row's whole ``simd_pixels`` blocks
  (OpenCV's SIMD loop) and rounded half-to-even in the rest (its scalar tail; 0: all).
  """
  h = hsv[..., 0].astype(np.float32) * _HSCALE
  s = hsv[..., 1].astype(np.float32) * _INV255
  v = hsv[..., 2].astype(np.float32) * _INV255
  sector = np.floor(h)
  f = h - sector
  one = np.float32(1)
  tab = np.stack([v, v * (one - s), v * (one - s * f), v * (one - s * (one - f))])
  # (r, g, b) tab indices per sector 0..5 (OpenCV's sector_data lists them as b, g, r).
  order = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])
  picked = np.take_along_axis(tab, order[sector.astype(np.int64)].transpose(2, 0, 1), axis=0)
  scaled = np.moveaxis(picked, 0, -1) * np.float32(255)
  width = hsv.shape[1]
  vector_end = (width // simd_pixels) * simd_pixels if simd_pixels else 0
  rounded = (np.arange(width) >= vector_end)[None, :, None]
  out = np.where(rounded, np.rint(scaled), np.trunc(scaled))
  return np.clip(out, 0, 255).astype(np.uint8)


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """mmseg ``PhotoMetricDistortion.convert``: float32 ``x*alpha + beta``, clip, truncate."""
  out = img.astype(np.float32) * np.float32(alpha) + np.float32(beta)
  return np.clip(out, 0, 255).astype(np.uint8)


class PhotoMetricDistortion:
  """mmseg 0.11 ``PhotoMetricDistortion`` on an RGB uint8 image, draws from ``rng``.

  brightness (coin, ``beta ~ U(-32, 32)``) -> mode coin -> [mode 1: contrast (coin,
  ``alpha ~ U(0.5, 1.5)``)] -> saturation (coin; HSV; S = convert(S, ``U(0.5, 1.5)``);
  back) -> hue (coin; HSV; ``H = (H + randint[-18, 18)) % 180``, numpy's exclusive high
  as in mmseg; back) -> [mode 0: contrast]. Coins are ``rng.integers(2)``.
  """

  def __init__(
    self,
    brightness_delta: float = 32,
    contrast_range: Sequence[float] = (0.5, 1.5),
    saturation_range: Sequence[float] = (0.5, 1.5),
    hue_delta: int = 18,
    hsv_simd_pixels: int = HSV_SIMD_PIXELS,
  ):
    self.brightness = float(brightness_delta)
    self.contrast = tuple(contrast_range)
    self.saturation = tuple(saturation_range)
    self.hue = int(hue_delta)
    self.hsv_simd_pixels = int(hsv_simd_pixels)

  def _contrast(self, img: np.ndarray, rng: Any) -> np.ndarray:
    if rng.integers(2):
      return _convert(img, alpha=rng.uniform(*self.contrast))
    return img

  def __call__(self, img: np.ndarray, rng: Any) -> np.ndarray:
    if rng.integers(2):
      img = _convert(img, beta=rng.uniform(-self.brightness, self.brightness))
    mode = rng.integers(2)
    if mode == 1:
      img = self._contrast(img, rng)
    if rng.integers(2):
      hsv = rgb_to_hsv(img)
      hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*self.saturation))
      img = hsv_to_rgb(hsv, self.hsv_simd_pixels)
    if rng.integers(2):
      hsv = rgb_to_hsv(img)
      hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-self.hue, self.hue)) % 180
      img = hsv_to_rgb(hsv, self.hsv_simd_pixels)
    if mode == 0:
      img = self._contrast(img, rng)
    return img


# --- Annotations.


def decode_annotation(
  data: bytes | np.ndarray | None,
  *,
  name: str = "",
  channel: int | None = None,
  max_pixels: int = decode.DEFAULT_MAX_PIXELS,
) -> np.ndarray | None:
  """A class-index map ``(H, W)`` uint8 from an encoded annotation (PIL, values as stored).

  'L' and 'P' PNGs give their stored values (palette indices, no palette conversion), 16-bit
  ones their values when all are < 256. A multi-channel annotation needs ``channel``. Returns
  None for empty or undecodable data; raises ValueError for a map this cannot represent.
  """
  if data is None:
    return None
  if isinstance(data, np.ndarray):
    array = data
  else:
    if not data:
      return None
    try:
      with Image.open(io.BytesIO(data)) as img:
        if img.width * img.height > max_pixels:
          return None
        img.load()
        array = np.asarray(img)
    except Exception:  # PIL raises many types for bad data.
      return None
  if array.ndim == 3 and (channel is not None or array.shape[-1] == 1):
    array = array[..., channel or 0]
  if array.ndim != 2:
    raise ValueError(
      f"Annotation {name or '(array)'} has shape {array.shape}: expected one channel of class"
      " indices (a mode 'L' or 'P' PNG); pass annotation_channel for a multi-channel one."
    )
  if array.dtype != np.uint8:
    if array.size and (array.min() < 0 or array.max() > 255):
      raise ValueError(
        f"Annotation {name or '(array)'} holds values in [{array.min()}, {array.max()}]:"
        " class indices must fit in 8 bits (0..255, 255 = ignore)."
      )
    array = array.astype(np.uint8)
  return np.ascontiguousarray(array)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """mmseg's ``reduce_zero_label``: 0 -> 255, k -> k - 1, 255 stays 255."""
  label = label.copy()
  label[label == 0] = 255
  label = label - 1
  label[label == 254] = 255
  return label


def check_label_values(
  label: np.ndarray, num_classes: int | None, ignore_index: int = IGNORE_INDEX, name: str = ""
) -> None:
  """Raises ValueError naming ``name`` and the value if one is not a class or ignored."""
  if num_classes is None:
    return
  present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
  bad = [int(v) for v in present if v >= num_classes and v != ignore_index]
  if bad:
    raise ValueError(
      f"Annotation {name or '(array)'} has label value {bad[0]} (values found: {bad[:8]}),"
      f" outside [0, {num_classes}) and not the ignore index {ignore_index}; check"
      " num_classes and reduce_zero_label."
    )


# --- The train and test pipelines.


def random_crop_box(
  label: np.ndarray,
  crop_size: Sequence[int],
  rng: Any,
  cat_max_ratio: float = 0.75,
  ignore_index: int = IGNORE_INDEX,
) -> tuple[int, int, int]:
  """mmseg ``RandomCrop``'s box: ``(top, left, checks)``.

  Offsets ``top ~ randint[0, H - h]``, ``left ~ randint[0, W - w]``; with ``cat_max_ratio <
  1`` up to 10 boxes are checked, the first whose labels (ignore index left out) hold more
  than one class, the largest under ``cat_max_ratio`` of them, is kept; after 10 failures
  an 11th box is drawn and used unchecked.
  """
  margin_h = max(label.shape[0] - crop_size[0], 0)
  margin_w = max(label.shape[1] - crop_size[1], 0)

  def draw() -> tuple[int, int]:
    return int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))

  top, left = draw()
  checks = 0
  if cat_max_ratio < 1.0:
    for _ in range(10):
      checks += 1
      crop = label[top : top + crop_size[0], left : left + crop_size[1]]
      counts = np.bincount(crop.ravel(), minlength=256)
      counts[ignore_index] = 0
      counts = counts[counts > 0]
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      top, left = draw()
  return top, left, checks


class _Loader:
  """Decoding and checks shared by the transforms (keyword arguments of both):
  ``reduce_zero_label`` (mmseg's, at load), ``num_classes`` (None: values unchecked),
  ``ignore_index``, ``max_pixels`` (decompression-bomb limit)."""

  def __init__(
    self,
    *,
    reduce_zero_label: bool = False,
    num_classes: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    max_pixels: int = decode.DEFAULT_MAX_PIXELS,
  ):
    self.reduce_zero_label = bool(reduce_zero_label)
    self.num_classes = num_classes
    self.ignore_index = int(ignore_index)
    self.max_pixels = max_pixels

  def output_keys(self) -> tuple[str, ...]:
    return ("image", "label")

  def load(self, record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | pipeline.Undecodable:
    """``(image (H, W, 3) uint8 RGB, label (H, W) uint8)`` of a record, or an Undecodable
    (missing or undecodable file); ValueError for a size mismatch or a bad label value."""
    path = str(record.get("path", "")) or "an image"
    ann_path = str(record.get("annotation_path", "")) or f"the annotation of {path}"
    if record.get("annotation") is None:
      return pipeline.Undecodable(0, f"{path} (no annotation file {ann_path})")
    image = decode.decode_image(record["image"], max_pixels=self.max_pixels)
    if image is None:
      return pipeline.Undecodable(0, path)
    channel, limit = record.get("annotation_channel"), self.max_pixels
    label = decode_annotation(
      record["annotation"], name=ann_path, channel=channel, max_pixels=limit
    )
    if label is None:
      return pipeline.Undecodable(0, f"{ann_path} (undecodable annotation)")
    if label.shape != image.shape[:2]:
      raise ValueError(
        f"Annotation {ann_path} is {label.shape[1]}x{label.shape[0]} (WxH) but its image"
        f" {path} is {image.shape[1]}x{image.shape[0]}."
      )
    if self.reduce_zero_label:
      label = reduce_zero_label(label)
    check_label_values(label, self.num_classes, self.ignore_index, ann_path)
    return image, label


class SegmentationTrainTransform(_Loader):
  """mmseg 0.11's ADE20K train pipeline (after loading): ``(record, rng) -> dict``.

  Resize keep-ratio to ``img_scale * r``, ``r ~ U(ratio_range)`` (bilinear image, nearest
  label; see the module docstring) -> :func:`random_crop_box` -> horizontal flip with
  ``flip_prob`` (image and label) -> :class:`PhotoMetricDistortion` (``photometric``) ->
  pad bottom/right to ``crop_size`` with ``pad_value`` / ``ignore_index``. Returns
  ``{'image': (h, w, 3) uint8, 'label': (h, w) uint8, 'valid_hw': (2,) int32}`` with
  ``(h, w) = crop_size`` and ``valid_hw`` the height and width of the unpadded part (the
  device sets the padding to 0 after normalising, mmseg's Pad-after-Normalize), or a
  ``pipeline.Undecodable`` for a missing or undecodable file. Only the crop of the resized
  image is computed.
  """

  def __init__(
    self,
    crop_size: Sequence[int] = (512, 512),
    img_scale: Sequence[int] = (2048, 512),
    ratio_range: Sequence[float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: bool = True,
    pad_value: int = 0,
    **kwargs: Any,
  ):
    super().__init__(**kwargs)
    self.crop_size = (int(crop_size[0]), int(crop_size[1]))
    self.img_scale = tuple(img_scale)
    self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
    if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
      raise ValueError(f"Invalid ratio_range {self.ratio_range}.")
    self.cat_max_ratio = float(cat_max_ratio)
    self.flip_prob = float(flip_prob)
    self.photometric = PhotoMetricDistortion() if photometric else None
    self.pad_value = int(pad_value)

  def output_keys(self) -> tuple[str, ...]:
    return ("image", "label", "valid_hw")

  def __call__(self, record: dict[str, Any], rng: Any) -> dict[str, np.ndarray] | Any:
    loaded = self.load(record)
    if isinstance(loaded, pipeline.Undecodable):
      return loaded
    image, label = loaded
    lo, hi = self.ratio_range
    ratio = rng.random() * (hi - lo) + lo
    scale = (int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio))
    new_w, new_h = rescale_size(image.shape[1], image.shape[0], scale)
    seg = resize_nearest(label, new_h, new_w)
    top, left, _ = random_crop_box(seg, self.crop_size, rng, self.cat_max_ratio, self.ignore_index)
    bottom, right = min(top + self.crop_size[0], new_h), min(left + self.crop_size[1], new_w)
    seg = seg[top:bottom, left:right]
    img = resize_bilinear(image, new_h, new_w, (top, bottom), (left, right))
    if rng.random() < self.flip_prob:
      img, seg = img[:, ::-1].copy(), seg[:, ::-1].copy()
    if self.photometric is not None:
      img = self.photometric(img, rng)
    out_img = np.full(self.crop_size + (3,), self.pad_value, np.uint8)
    out_seg = np.full(self.crop_size, self.ignore_index, np.uint8)
    out_img[: img.shape[0], : img.shape[1]] = img
    out_seg[: seg.shape[0], : seg.shape[1]] = seg
    valid_hw = np.asarray(img.shape[:2], np.int32)
    return {"image": out_img, "label": out_seg, "valid_hw": valid_hw}


class SegmentationEvalTransform(_Loader):
  """mmseg 0.11's ADE20K test pipeline: keep-ratio resize of the image to ``img_scale``.

  ``(record, rng=None) -> {'image': (h', w', 3) uint8, 'label': (H, W) uint8}``: the short
  side becomes 512 unless the long side would pass 2048; the label stays at the image's
  original size (mmseg scores against the original annotation, after resizing the
  prediction back). Shapes vary per image, so evaluation goes one image at a time.
  """

  def __init__(self, img_scale: Sequence[int] = (2048, 512), **kwargs: Any):
    super().__init__(**kwargs)
    self.img_scale = tuple(img_scale)

  def __call__(self, record: dict[str, Any], rng: Any = None) -> dict[str, np.ndarray] | Any:
    loaded = self.load(record)
    if isinstance(loaded, pipeline.Undecodable):
      return loaded
    image, label = loaded
    new_w, new_h = rescale_size(image.shape[1], image.shape[0], self.img_scale)
    return {"image": resize_bilinear(image, new_h, new_w), "label": label}


class MultiScaleEvalTransform(_Loader):
  """mmseg's ``MultiScaleFlipAug`` test pipeline (the flips are made on the device):
  ``(record, rng=None) -> {'images': [one (h_r, w_r, 3) uint8 image per ratio], 'label':
  (H, W) uint8}``, image r resized keep-ratio to ``img_scale * ratios[r]`` (mmseg:
  ``img_scale = [(int(w * r), int(h * r)) for r in img_ratios]``), the label at the
  original size. ``ratios=(1.0,)`` is :class:`SegmentationEvalTransform`'s single scale;
  unilm's multi-scale test uses (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)."""

  def __init__(
    self,
    img_scale: Sequence[int] = (2048, 512),
    ratios: Sequence[float] = (1.0,),
    **kwargs: Any,
  ):
    super().__init__(**kwargs)
    if not ratios or min(ratios) <= 0:
      raise ValueError(f"ratios={tuple(ratios)} must be positive numbers.")
    self.scales = [(int(img_scale[0] * r), int(img_scale[1] * r)) for r in ratios]

  def __call__(self, record: dict[str, Any], rng: Any = None) -> dict[str, Any] | Any:
    loaded = self.load(record)
    if isinstance(loaded, pipeline.Undecodable):
      return loaded
    image, label = loaded
    images = []
    for scale in self.scales:
      new_w, new_h = rescale_size(image.shape[1], image.shape[0], scale)
      images.append(resize_bilinear(image, new_h, new_w))
    return {"images": images, "label": label, "path": str(record.get("path", ""))}


def eval_stream(
  source: Any,
  transform: Any,
  *,
  max_images: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  read_threads: int = 8,
) -> Any:
  """This process's slice (elements ``p, p + n, ...``) of the first ``max_images`` (0: all)
  of ``source`` through ``transform``, in order, decoded by ``read_threads`` threads:
  one element at a time (segmentation evaluates images of different sizes one by one),
  each the transform's dict or a ``pipeline.Undecodable`` (counted by the caller)."""
  ds = grain.MapDataset.source(source)
  if max_images:
    ds = ds[: min(int(max_images), len(source))]
  ds = ds[process_index::process_count].map(transform)
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads)
  return iter(ds.to_iter_dataset(options))
