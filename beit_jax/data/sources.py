"""Random-access image sources and robust image decoding.

Every source follows Grain's ``RandomAccessDataSource`` protocol (``__len__``
and ``__getitem__``) and yields ``{'image': bytes, 'label': np.int32}``, where
``image`` holds the *encoded* file exactly as stored. Decoding happens later,
inside the input pipeline's workers, through :func:`decode_image`, which never
raises for bad data: it returns ``None`` and the pipeline skips and counts the
element. Every source also exposes ``num_classes`` and ``class_names``.

Sources:

* :class:`ImageFolderSource`: an ImageNet-style folder ``root/<class>/<image>``.
* :class:`BuiltinPhotosSource`: the real photographs that ship inside the
  installed scikit-image and scikit-learn wheels (no download), so the quick
  start runs without any dataset.
* :func:`tfds_source` / :class:`TfdsSource`: a TFDS dataset prepared in the
  ArrayRecord format, read with ``tfds.decode.SkipDecoding()`` so the image
  bytes are never decoded by TFDS (this works without TensorFlow installed).

:func:`make_source` picks one from a data config, and
:func:`write_tfds_image_dataset` writes a small ArrayRecord TFDS dataset from
images without TensorFlow (for tests, or to convert an image folder).
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any, Union

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageOps

# PIL refuses (DecompressionBombError) images above twice its MAX_IMAGE_PIXELS,
# i.e. 178,956,970 pixels by default; the same limit is our default.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

Element = dict[str, Any]
ImageLike = Union[bytes, Image.Image, np.ndarray, str, os.PathLike]


# ----------------------------------------------------------------------------
# Decoding.
# ----------------------------------------------------------------------------


def _alpha_over_white(img: Image.Image) -> np.ndarray:
  """Composites an image with an alpha channel over a white background."""
  rgba = np.asarray(img.convert('RGBA'), dtype=np.float32)
  alpha = rgba[..., 3:4] / 255.0
  rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _high_bit_depth_to_uint8(img: Image.Image) -> np.ndarray:
  """Scales a 16/32-bit integer or float single-channel image to gray RGB.

  16-bit data (modes ``I;16*``, or ``I`` with all values in 0..65535, which is
  how 16-bit PNG/TIFF files decode) maps 0..65535 linearly onto 0..255; float
  data in 0..1 maps onto 0..255; anything else is stretched over its range.
  """
  values = np.asarray(img, dtype=np.float64)
  lo = float(values.min()) if values.size else 0.0
  hi = float(values.max()) if values.size else 0.0
  if img.mode.startswith('I;16') or (
      img.mode == 'I' and lo >= 0.0 and hi <= 65535.0):
    scaled = values * (255.0 / 65535.0)
  elif img.mode == 'F' and lo >= 0.0 and hi <= 1.0:
    scaled = values * 255.0
  elif hi > lo:
    scaled = (values - lo) * (255.0 / (hi - lo))
  else:
    scaled = np.zeros_like(values)
  gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
  return np.repeat(gray[..., None], 3, axis=-1)


def _to_rgb_uint8(img: Image.Image) -> np.ndarray:
  """Converts a decoded PIL image of any mode to an HxWx3 uint8 array."""
  mode = img.mode
  if mode == 'RGB':
    return np.asarray(img, dtype=np.uint8)
  if mode.startswith('I') or mode == 'F':
    return _high_bit_depth_to_uint8(img)
  if mode in ('RGBA', 'RGBa', 'LA', 'La', 'PA'):
    return _alpha_over_white(img)
  if mode == 'P' and 'transparency' in img.info:
    return _alpha_over_white(img.convert('RGBA'))
  # L, 1, P (opaque), CMYK, YCbCr, LAB, HSV: PIL's own conversion.
  return np.asarray(img.convert('RGB'), dtype=np.uint8)


def decode_image(
    data: bytes | np.ndarray, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray | None:
  """Decodes an encoded image file to an RGB uint8 array, or ``None``.

  The image is decoded with PIL, rotated/flipped upright according to its EXIF
  orientation tag (``ImageOps.exif_transpose``), and converted to RGB:

  * grayscale (``L``, ``1``), palette (``P``), ``CMYK``, ``YCbCr``: PIL's
    conversion to RGB;
  * images with an alpha channel (``RGBA``, ``LA``, ``P`` with a transparency
    entry): composited over a **white** background, so fully transparent pixels
    become white instead of showing whatever colour they happen to store
    (torchvision's ``convert('RGB')`` would keep that colour; the two agree on
    opaque pixels);
  * 16-bit images (``I;16*``, or ``I`` with values in 0..65535): scaled by
    255/65535 and rounded, so 65535 maps to 255 (not clipped); other ``I``/``F``
    images are scaled by their value range.

  Args:
    data: The encoded file content, or an already decoded (H, W, 3) uint8
      array (returned as is; sources that hold few images decode them once).
    max_pixels: Images with more pixels than this are rejected (decompression
      bomb guard). PIL also rejects images above 2 * ``Image.MAX_IMAGE_PIXELS``
      by itself, so larger values only take effect if that is raised too.

  Returns:
    An ``(H, W, 3)`` uint8 array, or ``None`` when ``data`` is empty, truncated,
    not an image, too large, or cannot be decoded for any other reason. Bad
    data never raises.
  """
  if isinstance(data, np.ndarray):
    ok = data.dtype == np.uint8 and data.ndim == 3 and data.shape[2] == 3
    return data if ok and 0 < data.shape[0] * data.shape[1] <= max_pixels else None
  if not data:
    return None
  try:
    with Image.open(io.BytesIO(data)) as img:
      width, height = img.size
      if width <= 0 or height <= 0 or width * height > max_pixels:
        return None
      img.load()
      try:
        upright = ImageOps.exif_transpose(img)
      except Exception:  # pylint: disable=broad-except
        # A corrupt EXIF block should not throw away a decodable image.
        upright = img
      array = _to_rgb_uint8(upright)
  except Exception:  # pylint: disable=broad-except
    # PIL raises many types (OSError, SyntaxError, ValueError,
    # DecompressionBombError, struct.error, ...) for bad data.
    return None
  if array.ndim != 3 or array.shape[-1] != 3 or array.size == 0:
    return None
  return np.ascontiguousarray(array)


def _read_bytes(path: str) -> bytes:
  """Reads a file; unreadable files give ``b''`` (skipped as undecodable)."""
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError as e:
    logging.warning('Could not read %s: %s', path, e)
    return b''


# ----------------------------------------------------------------------------
# Image folder.
# ----------------------------------------------------------------------------


def _is_hidden(name: str) -> bool:
  return name.startswith('.')


def _list_files(directory: str) -> list[str]:
  """All non-hidden files under ``directory`` (recursive), sorted."""
  files = []
  for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
    files.extend(
        os.path.join(dirpath, f) for f in filenames if not _is_hidden(f)
    )
  return sorted(files)


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
  """

  def __init__(self, root: str | os.PathLike):
    root = os.fspath(root)
    expected = (
        'expected an image folder laid out as ROOT/<class_name>/<image file>'
        ' (ImageNet style), or image files directly in ROOT for a single class'
    )
    if not os.path.isdir(root):
      raise FileNotFoundError(
          f'Image folder {root!r} does not exist or is not a directory; '
          f'{expected}.'
      )
    entries = sorted(e for e in os.listdir(root) if not _is_hidden(e))
    class_dirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    paths: list[str] = []
    labels: list[int] = []
    if class_dirs:
      loose = [e for e in entries if os.path.isfile(os.path.join(root, e))]
      if loose:
        logging.warning(
            'Image folder %s has class sub-folders; ignoring %d file(s)'
            ' directly in it (e.g. %s).', root, len(loose), loose[0])
      class_names = class_dirs
      for label, name in enumerate(class_dirs):
        files = _list_files(os.path.join(root, name))
        paths.extend(files)
        labels.extend([label] * len(files))
    else:
      class_names = [os.path.basename(os.path.normpath(root)) or 'images']
      paths = [
          os.path.join(root, e)
          for e in entries
          if os.path.isfile(os.path.join(root, e))
      ]
      labels = [0] * len(paths)
    if not paths:
      raise FileNotFoundError(
          f'Image folder {root!r} contains no files (found {len(class_dirs)}'
          f' class folder(s)); {expected}.'
      )
    self._root = root
    self._paths = paths
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
        'image': _read_bytes(self._paths[index]),
        'label': np.int32(self._labels[index]),
        'path': self._paths[index],
    }

  def __repr__(self) -> str:
    return (
        f'ImageFolderSource(root={self._root!r}, num_images={len(self)},'
        f' num_classes={self.num_classes})'
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
    'astronaut.png',  # 512x512 RGB, astronaut Eileen Collins.
    'brick.png',  # 512x512 gray, brick wall texture.
    'camera.png',  # 512x512 gray, cameraman.
    'cell.png',  # 660x550 gray, cell micrograph.
    'chelsea.png',  # 451x300 RGB, Chelsea the cat.
    'coffee.png',  # 600x400 RGB, coffee cup.
    'coins.png',  # 384x303 gray, Greek coins.
    'grass.png',  # 512x512 gray, grass texture.
    'gravel.png',  # 512x512 gray, gravel texture.
    'hubble_deep_field.jpg',  # 1000x872 RGB, Hubble deep field.
    'ihc.png',  # 512x512 RGB, immunohistochemistry micrograph.
    'moon.png',  # 512x512 gray, moon surface.
    'motorcycle_left.png',  # 741x500 RGB, stereo pair left.
    'motorcycle_right.png',  # 741x500 RGB, stereo pair right.
    'retina.jpg',  # 1411x1411 RGB, retina fundus.
    'rocket.jpg',  # 640x427 RGB, rocket launch.
)
# Photographs shipped in the scikit-learn wheel (sklearn/datasets/images).
SKLEARN_PHOTOS = (
    'china.jpg',  # 640x427 RGB, Chinese temple.
    'flower.jpg',  # 640x427 RGB, flower.
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
      ('skimage', 'data', SKIMAGE_PHOTOS),
      ('sklearn', os.path.join('datasets', 'images'), SKLEARN_PHOTOS),
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
  the arrays (which `decode_image` passes through).
  """

  def __init__(self):
    found = builtin_photo_paths()
    if not found:
      raise FileNotFoundError(
          'No built-in photos found: scikit-image (skimage/data/*.png|jpg) and'
          ' scikit-learn (sklearn/datasets/images/*.jpg) are not installed or'
          ' do not ship their sample images.'
      )
    self._class_names = [name for name, _ in found]
    self._paths = [path for _, path in found]
    # 18 photos: decode once, not at every epoch.
    self._images = [decode_image(_read_bytes(path)) for path in self._paths]

  @property
  def paths(self) -> list[str]:
    return list(self._paths)

  def __getitem__(self, index: int) -> Element:
    return {'image': self._images[index], 'label': np.int32(index)}

  def __repr__(self) -> str:
    return f'BuiltinPhotosSource(num_images={len(self)})'


# ----------------------------------------------------------------------------
# TFDS (ArrayRecord).
# ----------------------------------------------------------------------------


class TfdsSource:
  """A TFDS ArrayRecord split whose images stay encoded (``SkipDecoding``).

  ``tfds.decode.SkipDecoding()`` works without TensorFlow on the ArrayRecord
  data source: TFDS parses the serialized ``tf.train.Example`` with its
  pure-numpy example parser and returns the stored image file as ``bytes``.
  The dataset must have been prepared with ``file_format='array_record'``
  (e.g. ``tfds build --file_format=array_record NAME`` or
  :func:`write_tfds_image_dataset`); TFRecord builds cannot be random-accessed.
  """

  def __init__(
      self,
      name: str,
      split: str,
      data_dir: str | None = None,
      *,
      label_key: str = 'label',
      image_key: str = 'image',
  ):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    data_dir = data_dir or None
    shown_dir = data_dir or (
        '<TFDS default: $TFDS_DATA_DIR or ~/tensorflow_datasets>')
    where = f'TFDS dataset {name!r} (split {split!r}, data_dir {shown_dir!r})'
    hint = (
        'Prepare it in the ArrayRecord format first, e.g. `tfds build'
        f' --file_format=array_record --data_dir=DIR {name}`,'
        f' `tfds.builder({name!r}, data_dir=DIR,'
        " file_format='array_record').download_and_prepare()`, or"
        ' beit_jax.data.sources.write_tfds_image_dataset for your own images.'
    )
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends.
      raise FileNotFoundError(f'{where} was not found. {hint}') from e
    if not builder.is_prepared():
      raise FileNotFoundError(
          f'{where} is not prepared (no data in {builder.data_dir!r}). {hint}'
      )
    file_format = builder.info.file_format
    format_name = str(getattr(file_format, 'value', file_format)).lower()
    if file_format is not None and format_name != 'array_record':
      raise ValueError(
          f'{where} was prepared as {file_format}, which does not support'
          f' random access. {hint}'
      )
    features = builder.info.features
    if image_key not in features:
      raise KeyError(
          f'{where} has no image feature {image_key!r}; features are'
          f' {list(features.keys())}.'
      )
    try:
      self._source = builder.as_data_source(
          split=split, decoders={image_key: tfds.decode.SkipDecoding()}
      )
    except (ValueError, KeyError) as e:
      raise ValueError(
          f'{where}: cannot read split {split!r}; available splits are'
          f' {list(builder.info.splits.keys())}. ({e})'
      ) from e
    self._name = name
    self._split = split
    self._data_dir = data_dir
    self._image_key = image_key
    self._label_key = label_key if label_key in features else None
    if self._label_key is None:
      self._class_names = ['0']
    else:
      label_feature = features[label_key]
      names = getattr(label_feature, 'names', None)
      num = getattr(label_feature, 'num_classes', None)
      if names:
        self._class_names = list(names)
      elif num:
        self._class_names = [str(i) for i in range(num)]
      else:
        self._class_names = []

  @property
  def num_classes(self) -> int:
    """Number of classes (1 when the dataset has no label feature)."""
    return len(self._class_names)

  @property
  def class_names(self) -> list[str]:
    return list(self._class_names)

  def __len__(self) -> int:
    return len(self._source)

  def _convert(self, example: Mapping[str, Any]) -> Element:
    image = example[self._image_key]
    label = 0 if self._label_key is None else example[self._label_key]
    return {'image': bytes(image), 'label': np.int32(label)}

  def __getitem__(self, index: int) -> Element:
    return self._convert(self._source[index])

  def __repr__(self) -> str:
    return (
        f'TfdsSource(name={self._name!r}, split={self._split!r},'
        f' data_dir={self._data_dir!r}, num_images={len(self)})'
    )


def tfds_source(
    name: str,
    split: str,
    data_dir: str | None = None,
    *,
    label_key: str = 'label',
    image_key: str = 'image',
) -> TfdsSource:
  """Opens a prepared TFDS ArrayRecord split with undecoded image bytes.

  Equivalent to ``tfds.data_source(name, split=split, data_dir=data_dir,
  decoders={'image': tfds.decode.SkipDecoding()})`` (and never downloads),
  wrapped so elements are ``{'image': bytes, 'label': np.int32}``.

  Args:
    name: TFDS dataset name (optionally ``name/config:version``).
    split: Split, with TFDS slicing syntax allowed (``'train[:10%]'``).
    data_dir: TFDS data dir; ``None`` or ``''`` for the TFDS default.
    label_key: Label feature; if the dataset has none, every label is 0.
    image_key: Encoded image feature.

  Returns:
    A :class:`TfdsSource`.

  Raises:
    FileNotFoundError: The dataset is unknown or not prepared in ``data_dir``.
    ValueError: Wrong file format or unknown split.
  """
  return TfdsSource(
      name, split, data_dir, label_key=label_key, image_key=image_key
  )


def _encode_for_tfds(image: ImageLike) -> bytes:
  """Encoded bytes for one image: bytes/paths verbatim, arrays/PIL as PNG."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    return bytes(image)
  if isinstance(image, (str, os.PathLike)):
    with open(image, 'rb') as f:
      return f.read()
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  if isinstance(image, Image.Image):
    if image.mode != 'RGB':
      image = image.convert('RGB')
    buf = io.BytesIO()
    image.save(buf, format='PNG')
    return buf.getvalue()
  raise TypeError(f'Unsupported image type {type(image)}.')


def write_tfds_image_dataset(
    name: str,
    data_dir: str | os.PathLike,
    splits: Mapping[str, Sequence[tuple[ImageLike, int]]],
    num_classes: int | None = None,
    *,
    class_names: Sequence[str] | None = None,
    version: str = '1.0.0',
) -> str:
  """Writes a small image classification TFDS dataset as ArrayRecord, no TF.

  Defines a throw-away ``GeneratorBasedBuilder`` (not registered, so it can be
  called repeatedly) with features ``{'image': Image, 'label': ClassLabel}`` and
  ``file_format='array_record'``, then runs ``download_and_prepare``. Images
  given as encoded bytes or file paths are stored verbatim (any format that
  :func:`decode_image` reads; the declared shape is ``(None, None, 3)``, which
  only matters to TFDS's own decoder); numpy arrays and PIL images are
  converted to RGB and stored as PNG (TFDS's own array encoder would need
  TensorFlow). Read it back with ``tfds_source(name, split, data_dir)``.

  Example, converting an image folder::

    src = ImageFolderSource('/data/my_images/train')
    write_tfds_image_dataset('my_images', '/data/tfds',
                             {'train': list(zip(src.paths, src.labels))},
                             class_names=src.class_names)

  Args:
    name: snake_case dataset name (``[a-z][a-z0-9_]*``).
    data_dir: TFDS data dir to write ``name/version/`` into.
    splits: Split name -> list of ``(image, label)``; image is encoded bytes, a
      file path, an ``HxWx3`` uint8 array or a PIL image.
    num_classes: Number of classes; defaults to ``len(class_names)`` or
      ``max(label) + 1``.
    class_names: Optional class names.
    version: Dataset version string.

  Returns:
    The directory of the prepared dataset (``data_dir/name/version``).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise ValueError(f'TFDS dataset name must be snake_case, got {name!r}.')
  if not splits:
    raise ValueError('splits must contain at least one split.')
  if class_names is not None:
    class_names = [str(c) for c in class_names]
    if num_classes is None:
      num_classes = len(class_names)
  if num_classes is None:
    all_labels = [int(lbl) for items in splits.values() for _, lbl in items]
    num_classes = max(all_labels, default=0) + 1
  split_items = {k: list(v) for k, v in splits.items()}

  def info(self):
    label = (
        tfds.features.ClassLabel(names=class_names)
        if class_names is not None
        else tfds.features.ClassLabel(num_classes=num_classes)
    )
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': label,
        }),
        supervised_keys=('image', 'label'),
    )

  def split_generators(self, dl_manager):
    del dl_manager
    return {k: self._generate_examples(k) for k in split_items}

  def generate_examples(self, split_name):
    del self
    for i, (image, label) in enumerate(split_items[split_name]):
      yield i, {'image': _encode_for_tfds(image), 'label': int(label)}

  def body(ns):
    ns.update(
        name=name,
        VERSION=tfds.core.Version(version),
        _info=info,
        _split_generators=split_generators,
        _generate_examples=generate_examples,
        # A module name without dots that is not imported: TFDS then finds no
        # code path, so it looks for no checksums/metadata next to our code
        # (its package-resource lookup would need `importlib_resources`).
        __module__='beit_jax_tfds_image_writer',
    )

  camel = ''.join(part.capitalize() for part in name.split('_')) or 'Images'
  builder_cls = types.new_class(
      camel,
      (tfds.core.GeneratorBasedBuilder,),
      {'skip_registration': True},
      body,
  )
  builder = builder_cls(
      data_dir=os.fspath(data_dir), file_format='array_record')
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


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
  if kind == 'builtin':
    return BuiltinPhotosSource()
  if kind == 'folder':
    path = os.path.expanduser(str(data_config.path))
    if not path:
      raise ValueError("data.source='folder' needs data.path (the image root).")
    split_dir = os.path.join(path, split)
    if os.path.isdir(split_dir):
      return ImageFolderSource(split_dir)
    if split == data_config.train_split:
      return ImageFolderSource(path)
    logging.info(
        'No %s folder for split %r; skipping evaluation.', split_dir, split)
    return None
  if kind == 'tfds':
    if not data_config.name:
      raise ValueError("data.source='tfds' needs data.name (the TFDS name).")
    return tfds_source(
        str(data_config.name),
        split,
        data_dir=str(data_config.data_dir) or None,
        label_key=str(getattr(data_config, 'label_key', 'label') or 'label'),
    )
  raise ValueError(
      f"Unknown data.source {data_config.source!r}; expected 'builtin',"
      " 'folder' or 'tfds'."
  )
