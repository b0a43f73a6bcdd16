"""Voronoi mosaics of labelled images: a semantic-segmentation task made from a classification
set, and :class:`BuiltinMosaicSource`, the package's default segmentation data (no download).

A mosaic is a ``size x size`` RGB image cut into 2-4 regions (the count uniform in [2, 4]):
the Voronoi cells of that many seed points drawn uniformly in the square (each pixel goes to
its nearest seed; the seeds are redrawn until every cell holds a pixel). Every region shows an
image of its own class (no two regions share a class), resized to ``size x size`` (PIL
bilinear) and seen through the region's mask; the pixel's label is that image's class.

Mosaic ``i`` of a split is made by its own ``np.random.default_rng(mosaic_seed(seed, split,
i))`` (``seed + i`` for train, ``seed + VAL_SEED_OFFSET + i`` for val, so that val does not
repeat train's partitions), so any one can be regenerated alone.
``benchmarks/segmentation_mosaics.py`` writes Tiny-ImageNet mosaics to disk with these.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from beit_jax.data import sources

MIN_REGIONS, MAX_REGIONS = 2, 4
VAL_SEED_OFFSET = 1_000_000
SPLITS = ("train", "val")


def mosaic_seed(seed: int, split: str, index: int) -> int:
  """The seed of ``np.random.default_rng`` for mosaic ``index`` of ``split``."""
  return seed + index + (VAL_SEED_OFFSET if split == "val" else 0)


def voronoi_regions(
  rng: np.random.Generator, size: int, num_regions: int, max_tries: int = 1000
) -> np.ndarray:
  """``(size, size)`` int map of region ids 0..num_regions-1: the Voronoi cells of
  ``num_regions`` seeds drawn uniformly in the square (pixel centres at ``+0.5``; a tie
  goes to the lower id), redrawn until no cell is empty."""
  centres = np.arange(size, dtype=np.float64) + 0.5
  for _ in range(max_tries):
    seeds = rng.uniform(0.0, size, size=(num_regions, 2))  # (y, x)
    d = (centres[None, :, None] - seeds[:, 0, None, None]) ** 2 + (
      centres[None, None, :] - seeds[:, 1, None, None]
    ) ** 2
    regions = np.argmin(d, axis=0)
    if len(np.unique(regions)) == num_regions:
      return regions
  raise ValueError(f"No {num_regions} non-empty Voronoi cells in {max_tries} draws of {size}px.")


def choose_images(rng: np.random.Generator, labels: np.ndarray, k: int) -> list[int]:
  """``k`` image indices drawn uniformly, redrawn until their classes are pairwise distinct."""
  chosen: list[int] = []
  used: set[int] = set()
  tries = 0
  while len(chosen) < k:
    i = int(rng.integers(len(labels)))
    if int(labels[i]) not in used:
      chosen.append(i)
      used.add(int(labels[i]))
    tries += 1
    if tries == 100 * k and len(np.unique(labels)) < k:
      raise ValueError(f"{k} regions need {k} distinct classes; labels hold fewer.")
  return chosen


def plan_mosaic(
  rng: np.random.Generator,
  labels: np.ndarray,
  size: int,
  min_regions: int = MIN_REGIONS,
  max_regions: int = MAX_REGIONS,
) -> tuple[np.ndarray, list[int]]:
  """The random part of :func:`make_mosaic`: ``(regions (size, size) int, image indices)``;
  region r shows image ``indices[r]``."""
  k = int(rng.integers(min_regions, max_regions + 1))
  regions = voronoi_regions(rng, size, k)
  return regions, choose_images(rng, labels, k)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """``image`` (H, W, 3) uint8 resized to (size, size, 3), PIL bilinear."""
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def compose(
  regions: np.ndarray, indices: Sequence[int], images, labels: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Paints region r with ``resize(images[indices[r]])``; its label is that image's class."""
  image = np.zeros((size, size, 3), np.uint8)
  label = np.zeros((size, size), np.uint8)
  for r, i in enumerate(indices):
    y = int(labels[i])
    if not 0 <= y <= 255:
      raise ValueError(f"Class {y} of image {i} does not fit in a uint8 mask.")
    mask = regions == r
    image[mask] = resize(np.asarray(images[i], np.uint8), size)[mask]
    label[mask] = y
  return image, label


def make_mosaic(
  rng: np.random.Generator,
  images,
  labels: np.ndarray,
  size: int = 128,
  min_regions: int = MIN_REGIONS,
  max_regions: int = MAX_REGIONS,
) -> tuple[np.ndarray, np.ndarray]:
  """One mosaic: ``(image uint8 (size, size, 3), label uint8 (size, size))``.

  ``images[i]`` is a decoded (H, W, 3) uint8 image of class ``labels[i]``; only the chosen
  ones are accessed. All randomness comes from ``rng``."""
  labels = np.asarray(labels)
  regions, indices = plan_mosaic(rng, labels, size, min_regions, max_regions)
  return compose(regions, indices, images, labels, size)


def random_square_crop(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
  """A square crop of ``image``: side ``~ randint[lo, short]`` with ``short`` its shorter side
  and ``lo = min(short, max(size, short // 4))`` (no upsampling when the photo allows), then
  top and left uniform; three draws from ``rng`` in that order."""
  h, w = image.shape[:2]
  short = min(h, w)
  side = int(rng.integers(min(short, max(size, short // 4)), short + 1))
  top = int(rng.integers(0, h - side + 1))
  left = int(rng.integers(0, w - side + 1))
  return image[top : top + side, left : left + side]


def _png(array: np.ndarray, mode: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array, mode).save(buf, format="PNG")
  return buf.getvalue()


class BuiltinMosaicSource:
  """Mosaics of the built-in photos (:class:`beit_jax.data.sources.BuiltinPhotosSource`, no
  download): a Grain random-access source of segmentation records.

  Each photo is one class (label = photo index; ``num_classes`` = the number of photos,
  ``class_names`` their names). Element ``i`` comes from
  ``np.random.default_rng(mosaic_seed(seed, split, i))`` alone: the plan of
  :func:`plan_mosaic` (region count, Voronoi seeds, photos), then for each region in order a
  :func:`random_square_crop` of its photo, which :func:`compose` resizes to ``size`` and paints
  through the region's mask, so mosaics differ in content, not only in layout. Elements are
  the records of :mod:`beit_jax.data.segmentation_sources`: ``{'image': PNG bytes (RGB),
  'annotation': PNG bytes (mode 'L', value = class), 'path': 'builtin-mosaic/<split>/<i>',
  'annotation_path': path + '.png'}``; ``reduce_zero_label`` is False (0 is a class). The
  photos are decoded once, at construction.
  """

  reduce_zero_label = False

  def __init__(self, num_images: int, size: int = 128, seed: int = 0, split: str = "train"):
    if split not in SPLITS:
      raise ValueError(f"BuiltinMosaicSource split must be 'train' or 'val', got {split!r}.")
    if int(num_images) < 1:
      raise ValueError(f"BuiltinMosaicSource needs num_images >= 1, got {num_images}.")
    if int(size) < 2:
      raise ValueError(f"BuiltinMosaicSource needs size >= 2 pixels, got {size}.")
    photos = sources.BuiltinPhotosSource()
    if len(photos) < MAX_REGIONS:
      raise FileNotFoundError(
        f"Only {len(photos)} built-in photos found; mosaics of up to {MAX_REGIONS} regions"
        f" need {MAX_REGIONS} (install scikit-image and scikit-learn)."
      )
    self._photos = [photos[i]["image"] for i in range(len(photos))]
    self._labels = np.arange(len(photos))
    self._class_names = photos.class_names
    self.num_classes = len(photos)  # An attribute: make_segmentation_source may raise it.
    self.num_images, self.size, self.seed, self.split = int(num_images), int(size), seed, split

  @property
  def class_names(self) -> list[str]:
    return list(self._class_names)

  def __len__(self) -> int:
    return self.num_images

  def mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Mosaic ``index``: ``(image uint8 (size, size, 3), label uint8 (size, size))``."""
    if index < 0:
      index += self.num_images
    if not 0 <= index < self.num_images:
      raise IndexError(f"mosaic {index} of {self.num_images}")
    rng = np.random.default_rng(mosaic_seed(self.seed, self.split, index))
    regions, indices = plan_mosaic(rng, self._labels, self.size)
    crops = [random_square_crop(rng, self._photos[i], self.size) for i in indices]
    return compose(regions, range(len(crops)), crops, np.asarray(indices), self.size)

  def __getitem__(self, index: int) -> dict[str, Any]:
    image, label = self.mosaic(index)
    path = f"builtin-mosaic/{self.split}/{index % self.num_images}"
    return {
      "image": _png(image, "RGB"),
      "annotation": _png(label, "L"),
      "path": path,
      "annotation_path": f"{path}.png",
    }

  def __repr__(self) -> str:
    return (
      f"BuiltinMosaicSource(num_images={self.num_images}, size={self.size}, seed={self.seed},"
      f" split={self.split!r}, num_classes={self.num_classes})"
    )
