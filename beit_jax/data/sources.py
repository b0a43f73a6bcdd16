"""Random-access image sources, and the choice of one from a data config.

Every source follows Grain's ``RandomAccessDataSource`` protocol (``__len__`` and
``__getitem__``) and yields ``{'image': bytes, 'label': np.int32}``, where ``image`` holds
the *encoded* file exactly as stored (or, for the few built-in photos, the array decoded
once). Decoding happens later, inside the input pipeline's workers, through
:func:`beit_jax.data.decode.decode_image`. Every source also exposes ``num_classes`` and
``class_names``.

Sources:

* :class:`ImageFolderSource`: an ImageNet-style folder ``root/<class>/<image>``, local or
  on a bucket.
* :class:`BuiltinPhotosSource`: the real photographs that ship inside the installed
  scikit-image and scikit-learn wheels (no download), so the quick start runs without any
  dataset.
* :class:`beit_jax.data.tfds_source.TfdsSource`: a TFDS dataset prepared in the
  ArrayRecord format.

:func:`make_source` picks one from a data config.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np
from absl import logging

from beit_jax import paths
from beit_jax.data import decode, tfds_source

Element = dict[str, Any]


def _read_bytes(path: str) -> bytes:
  """Reads a file (local or on a bucket); unreadable files give ``b''`` (skipped as
  undecodable)."""
  try:
    return paths.read_bytes(path)
  except OSError as e:
    logging.warning("Could not read %s: %s", path, e)
    return b""


# ----------------------------------------------------------------------------
# Image folder.
# ----------------------------------------------------------------------------


def _is_hidden(name: str) -> bool:
  return name.startswith(".")


class _ListedSource:
  """Accessors shared by sources that list their files and class names."""

  _paths: list[str]
  _class_names: list[str]

  @property
  def num_classes(self) -> int:
    return len(self._class_names)

  @property
  def class_names(self) -> list[str]:
    return list(self._class_names)

  def __len__(self) -> int:
    return len(self._paths)


class ImageFolderSource(_ListedSource):
  """Images stored as files in an ImageNet-style folder tree.

  Layout: ``root/<class_name>/<any/sub/path>/<file>``. Classes are the sorted
  names of the (non-hidden) sub-folders of ``root`` and labels their index;
  files are listed recursively and sorted. Every non-hidden file counts
  (``.DS_Store``-like hidden files are ignored); files that are not images are
  returned as bytes too and fail to decode later, where the pipeline skips and
  counts them.

  If ``root`` has no sub-folders, the files directly in ``root`` form a single
  class named after ``root``. If it has sub-folders, files directly in ``root``
  are ignored (with a warning).

  ``root`` may be on a bucket (``gs://BUCKET/train``, through
  :mod:`beit_jax.paths`): the files are then listed in one recursive listing and
  read one request per image.
  """

  def __init__(self, root: str | os.PathLike):
    root = os.fspath(root)
    paths.check_storage({"image folder": root})
    expected = (
      "expected an image folder laid out as ROOT/<class_name>/<image file>"
      " (ImageNet style), or image files directly in ROOT for a single class"
    )
    if not paths.isdir(root):
      raise FileNotFoundError(
        f"Image folder {root!r} does not exist or is not a directory; {expected}."
      )
    entries = [e for e in paths.listdir(root) if not _is_hidden(e)]
    class_dirs = [e for e in entries if paths.isdir(os.path.join(root, e))]
    by_top: dict[str, list[str]] = {}  # First folder below root ('' = root) -> files.
    prefix = len(root.rstrip("/") or root) + 1
    for file in paths.list_files(root):
      top, sep, _ = file[prefix:].partition("/")
      by_top.setdefault(top if sep else "", []).append(file)
    files: list[str] = []
    labels: list[int] = []
    if class_dirs:
      loose = by_top.get("", [])
      if loose:
        logging.warning(
          "Image folder %s has class sub-folders; ignoring %d file(s) directly in it (e.g. %s).",
          root,
          len(loose),
          loose[0],
        )
      class_names = class_dirs
      for label, name in enumerate(class_dirs):
        files.extend(by_top.get(name, []))
        labels.extend([label] * len(by_top.get(name, [])))
    else:
      class_names = [paths.basename(os.path.normpath(root)) or "images"]
      files = by_top.get("", [])
      labels = [0] * len(files)
    if not files:
      raise FileNotFoundError(
        f"Image folder {root!r} contains no files (found {len(class_dirs)}"
        f" class folder(s)); {expected}."
      )
    self._root = root
    self._paths = files
    self._labels = np.asarray(labels, dtype=np.int32)
    self._class_names = list(class_names)

  @property
  def root(self) -> str:
    return self._root

  @property
  def paths(self) -> list[str]:
    """File paths, in element order."""
    return list(self._paths)

  @property
  def labels(self) -> np.ndarray:
    """int32 labels, in element order."""
    return self._labels.copy()

  def __getitem__(self, index: int) -> Element:
    return {
      "image": _read_bytes(self._paths[index]),
      "label": np.int32(self._labels[index]),
      "path": self._paths[index],
    }

  def __repr__(self) -> str:
    return (
      f"ImageFolderSource(root={self._root!r}, num_images={len(self)},"
      f" num_classes={self.num_classes})"
    )


# ----------------------------------------------------------------------------
# Built-in photos.
# ----------------------------------------------------------------------------

# Real photographs (min side >= 256 px) shipped in the scikit-image wheel.
# Excluded on purpose: synthetic or non-photo images (chessboard_GRAY/RGB,
# color, logo, phantom, horse silhouette), the artificially motion-blurred
# clock_motion, images whose shorter side is below 256 px (microaneurysms, page,
# text), and non-image or multi-frame files (xml, npy, npz, tif, gif).
SKIMAGE_PHOTOS = (
  "astronaut.png",  # 512x512 RGB, astronaut Eileen Collins.
  "brick.png",  # 512x512 gray, brick wall texture.
  "camera.png",  # 512x512 gray, cameraman.
  "cell.png",  # 660x550 gray, cell micrograph.
  "chelsea.png",  # 451x300 RGB, Chelsea the cat.
  "coffee.png",  # 600x400 RGB, coffee cup.
  "coins.png",  # 384x303 gray, Greek coins.
  "grass.png",  # 512x512 gray, grass texture.
  "gravel.png",  # 512x512 gray, gravel texture.
  "hubble_deep_field.jpg",  # 1000x872 RGB, Hubble deep field.
  "ihc.png",  # 512x512 RGB, immunohistochemistry micrograph.
  "moon.png",  # 512x512 gray, moon surface.
  "motorcycle_left.png",  # 741x500 RGB, stereo pair left.
  "motorcycle_right.png",  # 741x500 RGB, stereo pair right.
  "retina.jpg",  # 1411x1411 RGB, retina fundus.
  "rocket.jpg",  # 640x427 RGB, rocket launch.
)
# Photographs shipped in the scikit-learn wheel (sklearn/datasets/images).
SKLEARN_PHOTOS = (
  "china.jpg",  # 640x427 RGB, Chinese temple.
  "flower.jpg",  # 640x427 RGB, flower.
)


def _package_dir(package: str) -> str | None:
  """The directory of an installed top-level package, without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


def builtin_photo_paths() -> list[tuple[str, str]]:
  """``(name, path)`` of the built-in photos that exist in this installation."""
  found = []
  for package, subdir, files in (
    ("skimage", "data", SKIMAGE_PHOTOS),
    ("sklearn", os.path.join("datasets", "images"), SKLEARN_PHOTOS),
  ):
    pkg_dir = _package_dir(package)
    if pkg_dir is None:
      continue
    for filename in files:
      path = os.path.join(pkg_dir, subdir, filename)
      if os.path.isfile(path):
        found.append((os.path.splitext(filename)[0], path))
  return found


class BuiltinPhotosSource(_ListedSource):
  """The real photos shipped inside the installed scikit-image/-learn wheels.

  Files are located from the installed packages' directories (no download, no
  ``pooch``): :data:`SKIMAGE_PHOTOS` from ``skimage/data`` and
  :data:`SKLEARN_PHOTOS` from ``sklearn/datasets/images`` (18 photos with both
  packages installed). The label of each photo is its index, and
  ``class_names`` are the file stems (``'astronaut'``, ..., ``'flower'``).
  Images are grayscale or RGB files; the shorter side is at least 256 px. They
  are decoded to RGB uint8 arrays once, at construction, and elements carry
  the arrays (which `decode.decode_image` passes through).
  """

  def __init__(self):
    found = builtin_photo_paths()
    if not found:
      raise FileNotFoundError(
        "No built-in photos found: scikit-image (skimage/data/*.png|jpg) and"
        " scikit-learn (sklearn/datasets/images/*.jpg) are not installed or"
        " do not ship their sample images."
      )
    self._class_names = [name for name, _ in found]
    self._paths = [path for _, path in found]
    # 18 photos: decode once, not at every epoch.
    self._images = [decode.decode_image(_read_bytes(path)) for path in self._paths]

  @property
  def paths(self) -> list[str]:
    return list(self._paths)

  def __getitem__(self, index: int) -> Element:
    return {"image": self._images[index], "label": np.int32(index)}

  def __repr__(self) -> str:
    return f"BuiltinPhotosSource(num_images={len(self)})"


# ----------------------------------------------------------------------------
# Config -> source.
# ----------------------------------------------------------------------------


def make_source(data_config: Any, split: str) -> Any | None:
  """Builds the source for ``split`` from a data config.

  Args:
    data_config: A ConfigDict (or any attribute object) with ``source``
      (``'builtin'``, ``'folder'`` or ``'tfds'``), ``name`` (TFDS name),
      ``data_dir`` (TFDS data dir, ``''`` = default), ``path`` (folder root),
      ``train_split`` and ``eval_split``.
    split: The split to open (normally ``data_config.train_split`` or
      ``data_config.eval_split``).

  Returns:
    A source, or ``None`` when ``split`` is empty, or is the eval split of a
    folder dataset that has no such sub-folder (the caller skips eval).

  Raises:
    FileNotFoundError / ValueError: The dataset is missing or misconfigured.
  """
  kind = str(data_config.source).lower()
  if not split:
    return None
  if kind == "builtin":
    return BuiltinPhotosSource()
  if kind == "folder":
    path = paths.expand(str(data_config.path))
    if not path:
      raise ValueError("data.source='folder' needs data.path (the image root).")
    split_dir = os.path.join(path, split)
    if paths.isdir(split_dir):
      return ImageFolderSource(split_dir)
    if split == data_config.train_split:
      return ImageFolderSource(path)
    logging.info("No %s folder for split %r; skipping evaluation.", split_dir, split)
    return None
  if kind == "tfds":
    if not data_config.name:
      raise ValueError("data.source='tfds' needs data.name (the TFDS name).")
    return tfds_source.TfdsSource(
      str(data_config.name),
      split,
      data_dir=str(data_config.data_dir) or None,
      label_key=str(getattr(data_config, "label_key", "label") or "label"),
    )
  raise ValueError(
    f"Unknown data.source {data_config.source!r}; expected 'builtin', 'folder' or 'tfds'."
  )
