"""Sources of semantic segmentation records, and their Grain training stream.

Each source is a Grain ``RandomAccessDataSource`` of ``{'image': bytes, 'annotation': bytes |
None, 'path', 'annotation_path'}`` (encoded files as stored; decoding happens in the
pipeline's workers, in the transforms of :mod:`beit_jax.data.segmentation`), and carries
``num_classes`` and ``reduce_zero_label``, which describe its data to those transforms:

* :func:`ade20k_source`: ADE20K as mmseg lays it out (``ADEChallengeData2016``).
* :func:`mask_folder_source`: any ``images/`` + ``masks/`` pair of folders.
* :class:`SegmentationFolderSource`: the two above, any two folders paired by stem.
* :class:`TfdsSegmentationSource`: a prepared TFDS ArrayRecord split (see its warning on
  TFDS's ``scene_parse150``).
* :class:`beit_jax.data.mosaics.BuiltinMosaicSource`: mosaics of the built-in photos (the
  default, no download).

:func:`make_segmentation_source` picks one from a data config.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

from beit_jax import paths
from beit_jax.data import mosaics

ADE20K_NUM_CLASSES = 150
BUILTIN_NUM_IMAGES = 512  # Train mosaics of data.source='builtin' when data.num_images is 0.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _read(path: str) -> bytes:
  try:
    return paths.read_bytes(path)
  except OSError as e:
    logging.warning("Could not read %s: %s", path, e)
    return b""


def _by_stem(root: str, suffixes: Sequence[str]) -> dict[str, str]:
  """``relative path without suffix -> path`` of the files below ``root`` with a suffix."""
  found: dict[str, str] = {}
  prefix = len(root.rstrip("/")) + 1
  for file in paths.list_files(root):
    stem, ext = os.path.splitext(file[prefix:])
    if ext.lower() not in suffixes:
      continue
    if stem in found:
      raise ValueError(f"Two files share the stem {stem!r}: {found[stem]} and {file}.")
    found[stem] = file
  return found


class SegmentationFolderSource:
  """Images and their annotation maps in two folders, paired by relative path and stem.

  ``image_dir/<sub/path>/<stem>.<jpg|png|...>`` pairs with
  ``annotation_dir/<sub/path>/<stem><annotation_suffix>`` (mmseg's ``CustomDataset``: the
  image suffix replaced), sorted by image path. An image without its annotation is logged
  and yields ``annotation=None`` (skipped and counted by the pipeline, the missing file
  named), or raises FileNotFoundError with ``on_missing='error'``. Elements:
  ``{'image': bytes, 'annotation': bytes | None, 'path', 'annotation_path'}``.
  ``num_classes`` and ``reduce_zero_label`` describe the data for the transforms.
  """

  def __init__(
    self,
    image_dir: str | os.PathLike,
    annotation_dir: str | os.PathLike,
    *,
    image_suffixes: Sequence[str] = IMAGE_SUFFIXES,
    annotation_suffix: str = ".png",
    on_missing: str = "skip",
    num_classes: int | None = None,
    reduce_zero_label: bool = False,
  ):
    image_dir, annotation_dir = os.fspath(image_dir), os.fspath(annotation_dir)
    if on_missing not in ("skip", "error"):
      raise ValueError(f"on_missing must be 'skip' or 'error', got {on_missing!r}.")
    for what, folder in (("image", image_dir), ("annotation", annotation_dir)):
      if not paths.isdir(folder):
        raise FileNotFoundError(f"The {what} folder {folder!r} does not exist.")
    images = _by_stem(image_dir, tuple(s.lower() for s in image_suffixes))
    annotations = _by_stem(annotation_dir, (annotation_suffix.lower(),))
    if not images:
      raise FileNotFoundError(f"No images ({', '.join(image_suffixes)}) in {image_dir!r}.")
    root = annotation_dir.rstrip("/")
    self._items = [
      (images[s], annotations.get(s), annotations.get(s) or f"{root}/{s}{annotation_suffix}")
      for s in sorted(images, key=lambda s: images[s])
    ]
    missing = [expected for _, found, expected in self._items if found is None]
    if missing:
      message = (
        f"{len(missing)} of {len(images)} image(s) in {image_dir} have no annotation file,"
        f" e.g. {', '.join(missing[:3])}"
      )
      if on_missing == "error":
        raise FileNotFoundError(message + ".")
      logging.warning("%s; they will be skipped (and counted) as undecodable.", message)
    unused = len(set(annotations) - set(images))
    if unused:
      logging.warning("%d annotation(s) in %s have no image.", unused, annotation_dir)
    self.image_dir, self.annotation_dir = image_dir, annotation_dir
    self.num_classes = num_classes
    self.reduce_zero_label = reduce_zero_label

  @property
  def paths(self) -> list[str]:
    return [image for image, _, _ in self._items]

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index: int) -> dict[str, Any]:
    image, annotation, expected = self._items[index]
    return {
      "image": _read(image),
      "annotation": None if annotation is None else _read(annotation),
      "path": image,
      "annotation_path": expected,
    }

  def __repr__(self) -> str:
    return f"SegmentationFolderSource(image_dir={self.image_dir!r}, num_images={len(self)})"


_ADE_SPLITS = {"train": "training", "training": "training", "val": "validation"}


def ade20k_source(root: str | os.PathLike, split: str = "training", **kwargs: Any):
  """ADE20K (SceneParse150) as mmseg lays it out: ``ADEChallengeData2016/images/<split>/*.jpg``
  and ``annotations/<split>/*.png`` (0 = other, 1..150 the classes: ``reduce_zero_label``).

  ``root`` is the ``ADEChallengeData2016`` folder or its parent; ``split`` is 'training' or
  'validation' ('train', 'val' also). Keyword arguments go to :class:`SegmentationFolderSource`.
  """
  root = paths.expand(os.fspath(root))
  if not paths.isdir(os.path.join(root, "images")):
    root = os.path.join(root, "ADEChallengeData2016")
  split = _ADE_SPLITS.get(split, split)
  images, annotations = (os.path.join(root, d, split) for d in ("images", "annotations"))
  if not (paths.isdir(images) and paths.isdir(annotations)):
    raise FileNotFoundError(
      f"ADE20K split {split!r} not found: expected {images}/*.jpg and {annotations}/*.png"
      " (the ADEChallengeData2016 release)."
    )
  kwargs = {"image_suffixes": (".jpg",), "annotation_suffix": ".png", **kwargs}
  kwargs.setdefault("num_classes", ADE20K_NUM_CLASSES)
  kwargs.setdefault("reduce_zero_label", True)
  return SegmentationFolderSource(images, annotations, **kwargs)


def mask_folder_source(
  root: str | os.PathLike, images: str = "images", masks: str = "masks", **kwargs: Any
):
  """``root/images/...`` with ``root/masks/...`` of the same stems (a
  :class:`SegmentationFolderSource`; keyword arguments go to it)."""
  root = paths.expand(os.fspath(root))
  return SegmentationFolderSource(os.path.join(root, images), os.path.join(root, masks), **kwargs)


class TfdsSegmentationSource:
  """A prepared TFDS ArrayRecord split whose image and annotation stay encoded.

  ``tfds.data_source``-style access (``builder.as_data_source`` with ``SkipDecoding`` on
  both features, so no TensorFlow). TFDS's ``scene_parse150`` (1.0.0) declares
  ``{'image': Image(jpeg), 'annotation': Image(png, shape (None, None, 3))}``, but its
  builder stores ChallengeData2017's ``annotations_instance`` PNGs: R = one of the 100
  *instance* categories (0 = none, so walls, sky, floor... are 0), G = instance id. It is
  not the 150-class ADEChallengeData2016 map BEiT reports mIoU on: use
  :func:`ade20k_source` for that. ``annotation_channel`` picks a channel of a multi-channel
  annotation (0 for scene_parse150's R); its splits are 'train' and 'test' (ADE val).
  """

  def __init__(
    self,
    name: str,
    split: str,
    data_dir: str | None = None,
    *,
    image_key: str = "image",
    annotation_key: str = "annotation",
    annotation_channel: int | None = None,
    num_classes: int | None = None,
    reduce_zero_label: bool = False,
  ):
    data_dir = data_dir or None
    paths.check_storage({"data_dir": data_dir})
    where = f"TFDS dataset {name!r} (split {split!r}, data_dir {data_dir!r})"
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends.
      raise FileNotFoundError(f"{where} was not found.") from e
    if not builder.is_prepared():
      raise FileNotFoundError(
        f"{where} is not prepared in {builder.data_dir!r}: build it with"
        f" `tfds build --file_format=array_record {name}` first."
      )
    if name.split("/")[0].split(":")[0] == "scene_parse150":
      logging.warning(
        "TFDS scene_parse150 holds the 100-category *instance* masks (R channel), not the"
        " 150-class ADE20K semantic maps; use ade20k_source for BEiT's ADE20K numbers."
      )
    decoders = {image_key: tfds.decode.SkipDecoding(), annotation_key: tfds.decode.SkipDecoding()}
    self._source = builder.as_data_source(split=split, decoders=decoders)
    self._name, self._split = name, split
    self._keys = (image_key, annotation_key)
    self.annotation_channel = annotation_channel
    self.num_classes = num_classes
    self.reduce_zero_label = reduce_zero_label

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[index]
    name = f"{self._name}/{self._split}[{index}]"
    return {
      "image": bytes(example[self._keys[0]]),
      "annotation": bytes(example[self._keys[1]]),
      "path": name,
      "annotation_path": f"{name}:{self._keys[1]}",
      "annotation_channel": self.annotation_channel,
    }

  def __repr__(self) -> str:
    return f"TfdsSegmentationSource(name={self._name!r}, split={self._split!r}, n={len(self)})"


# --- Config -> source.

SEGMENTATION_SOURCES = ("builtin", "ade20k", "masks", "tfds")


def _num_classes(data_config: Any, kind: str) -> int:
  """``data.num_classes`` as an int (0 = the source's own), checked."""
  value = getattr(data_config, "num_classes", 0) or 0
  if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
    raise ValueError(f"data.num_classes is {value!r}: set --config.data.num_classes to an integer.")
  if value < 0:
    raise ValueError(f"data.num_classes is {value}: set --config.data.num_classes to 0 or more.")
  if not value and kind in ("masks", "tfds"):
    raise ValueError(
      f"data.source={kind!r} needs the number of classes in its masks: set"
      " --config.data.num_classes."
    )
  return int(value)


def _at_least(num_classes: int, own: int, what: str) -> int:
  """``num_classes`` (0: ``own``), which must cover the ``own`` classes of the data."""
  if num_classes and num_classes < own:
    raise ValueError(
      f"data.num_classes={num_classes} is below the {own} classes of {what}: set"
      f" --config.data.num_classes to 0 (= {own}) or at least {own}."
    )
  return num_classes or own


def make_segmentation_source(data_config: Any, split: str) -> Any | None:
  """Builds the segmentation source of ``split`` from a data config.

  Reads ``data_config.source``: ``'builtin'`` (:class:`mosaics.BuiltinMosaicSource`;
  ``num_images`` train mosaics, absent or 0 = :data:`BUILTIN_NUM_IMAGES`, for another split
  ``max(64, num_images // 8)`` mosaics of the 'val' seeds), ``'ade20k'``
  (:func:`ade20k_source` of ``path``, ``split`` mapped as it maps it), ``'masks'``
  (:func:`mask_folder_source` of ``path/<split>`` when that folder exists, else of ``path``
  for ``train_split``; another split without its folder gives None, logged) or ``'tfds'``
  (:class:`TfdsSegmentationSource` of ``name`` in ``data_dir``, with ``annotation_channel``
  if set and >= 0). ``num_classes`` (0 = the source's own: 150 for ADE20K, the photos for
  builtin; required for masks and tfds) and ``reduce_zero_label`` (masks, tfds; ADE20K forces
  True, builtin False) describe the labels; ``train_split`` tells train from eval.

  Returns the source (with int ``num_classes`` and ``reduce_zero_label`` attributes), or None
  when ``split`` is empty or is a missing eval split of a masks folder. Raises ValueError for
  a misconfiguration (saying what to set), FileNotFoundError for missing data.
  """
  kind = str(getattr(data_config, "source", "")).lower()
  if kind not in SEGMENTATION_SOURCES:
    raise ValueError(
      f"Unknown segmentation data.source {getattr(data_config, 'source', None)!r}: set"
      " --config.data.source to 'builtin', 'ade20k', 'masks' or 'tfds'."
    )
  if not split:
    return None
  num_classes = _num_classes(data_config, kind)
  reduce_zero = bool(getattr(data_config, "reduce_zero_label", False))
  train_split = getattr(data_config, "train_split", "train")
  if kind == "builtin":
    num_images = int(getattr(data_config, "num_images", 0) or BUILTIN_NUM_IMAGES)
    if num_images < 1:
      raise ValueError(
        f"data.num_images is {num_images}: set --config.data.num_images to the number of"
        f" built-in train mosaics (0 = {BUILTIN_NUM_IMAGES})."
      )
    if split == train_split:
      source = mosaics.BuiltinMosaicSource(num_images, split="train")
    else:
      source = mosaics.BuiltinMosaicSource(max(64, num_images // 8), split="val")
    if reduce_zero:
      logging.warning("data.reduce_zero_label is ignored for data.source='builtin' (0 is a class).")
    source.num_classes = _at_least(num_classes, source.num_classes, "the built-in photos")
    return source
  if kind in ("ade20k", "masks"):
    path = paths.expand(str(getattr(data_config, "path", "") or ""))
    if not path:
      folder = (
        "the ADEChallengeData2016 folder or its parent"
        if kind == "ade20k"
        else "the folder of <split>/images + <split>/masks, or of images + masks"
      )
      raise ValueError(f"data.source={kind!r} needs its folder: set --config.data.path ({folder}).")
    if kind == "ade20k":
      classes = _at_least(num_classes, ADE20K_NUM_CLASSES, "ADE20K")
      return ade20k_source(path, split, num_classes=classes, reduce_zero_label=True)
    split_dir = os.path.join(path, split)
    if paths.isdir(split_dir):
      return mask_folder_source(split_dir, num_classes=num_classes, reduce_zero_label=reduce_zero)
    if split == train_split:
      if not paths.isdir(os.path.join(path, "images")):
        raise FileNotFoundError(
          f"No masks data for split {split!r}: expected {split_dir}/images + {split_dir}/masks"
          f" or {path}/images + {path}/masks."
        )
      return mask_folder_source(path, num_classes=num_classes, reduce_zero_label=reduce_zero)
    logging.info("No %s folder for split %r; skipping evaluation.", split_dir, split)
    return None
  name = str(getattr(data_config, "name", "") or "")
  if not name:
    raise ValueError(
      "data.source='tfds' needs the dataset: set --config.data.name (its TFDS name)."
    )
  channel = getattr(data_config, "annotation_channel", None)
  return TfdsSegmentationSource(
    name,
    split,
    str(getattr(data_config, "data_dir", "") or "") or None,
    annotation_channel=None if channel is None or int(channel) < 0 else int(channel),
    num_classes=num_classes,
    reduce_zero_label=reduce_zero,
  )
